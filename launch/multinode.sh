#!/usr/bin/env bash
# Multi-node training: torchrun with a c10d rendezvous. Run the same command on every node.
usage() {
  cat <<'TXT'
usage: launch/multinode.sh --nnodes N --endpoint HOST:PORT [--nproc P] [--id JOB_ID] [--parallel none|ddp|fsdp]
                           CONFIG [nanogrow train options...]

  Run on EVERY node; they meet at HOST:PORT (any node's address, usually the first; the port must be open
  between nodes). Runs
    torchrun --nnodes=N --nproc_per_node=P --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT --rdzv-id=JOB_ID \
             -m nanogrow.cli train --config CONFIG [--set train.parallel=...] ...
  --nnodes N      number of nodes, or MIN:MAX for an elastic range
  --nproc P       processes per node (default: GPUs on this node, or 2 on CPU)
  --id JOB_ID     rendezvous id shared by all nodes of one job (default: nanogrow)
  --max-restarts  torchrun restarts of the whole worker group on a failure (default 0: fail fast; use with
                  --resume auto so restarted workers continue from the last checkpoint)
  env: PYTHON, DRY_RUN=1, NCCL_* / GLOO_SOCKET_IFNAME to pick the network interface
example (2 nodes x 8 GPUs, on each node):
  launch/multinode.sh --nnodes 2 --nproc 8 --endpoint node01:29500 --id run42 --parallel fsdp \
      configs/gpt2-small.toml --resume auto
TXT
}
set -euo pipefail
source "$(dirname "$0")/_common.sh"
NNODES="" ENDPOINT="" NPROC="" ID=nanogrow PARALLEL="" RESTARTS=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --nnodes) NNODES=$2; shift 2 ;;
    --endpoint) ENDPOINT=$2; shift 2 ;;
    --nproc) NPROC=$2; shift 2 ;;
    --id) ID=$2; shift 2 ;;
    --parallel) PARALLEL=$2; shift 2 ;;
    --max-restarts) RESTARTS=$2; shift 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] && [ -n "$NNODES" ] && [ -n "$ENDPOINT" ] || { usage; exit 2; }
CONFIG=$1; shift
[ -f "$CONFIG" ] || { echo "launch/multinode.sh: config $CONFIG not found" >&2; exit 2; }
if [ -z "$NPROC" ]; then NPROC=$(gpus_here); [ "$NPROC" -gt 0 ] || NPROC=2; fi
EXTRA=()
[ -z "$PARALLEL" ] || EXTRA=(--set "train.parallel=$PARALLEL")
run "${TORCHRUN[@]}" --nnodes="$NNODES" --nproc_per_node="$NPROC" --rdzv-backend=c10d --rdzv-endpoint="$ENDPOINT" \
  --rdzv-id="$ID" --max-restarts="$RESTARTS" "${NANOGROW_MODULE[@]}" train --config "$CONFIG" "${EXTRA[@]}" "$@"
