# Shared by the launch/*.sh scripts (sourced, not run): which Python, and how a nanogrow command is spelled.
# Python: $PYTHON if set, else the repo's .venv (launch/setup.sh), else python3 on PATH.
_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$_repo/.venv/bin/python" ]; then PYTHON="$_repo/.venv/bin/python"; else PYTHON=$(command -v python3); fi
fi
# torchrun is torch.distributed.run of that Python (no reliance on PATH); nanogrow is its CLI module.
TORCHRUN=("$PYTHON" -m torch.distributed.run)
NANOGROW_MODULE=(-m nanogrow.cli)
# With the rendezvous store shared with the workers (torch's default), a worker group restarted by --max-restarts
# can read the dead group's addresses and fail to connect (pytorch/pytorch#135712; measured here with gloo:
# tests/dist/chaos.py). A store of the workers' own costs nothing.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

gpus_here() {  # GPUs on this node (0 on a CPU machine)
  "$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0
}

run() {  # print the command, then run it unless DRY_RUN=1
  echo "+ $*" >&2
  [ "${DRY_RUN:-0}" = 1 ] || exec "$@"
}
