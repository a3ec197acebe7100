#!/usr/bin/env bash
# Single-node training with torchrun --standalone (one process per GPU, or N CPU processes with gloo).
usage() {
  cat <<'TXT'
usage: launch/torchrun.sh [--nproc N] [--parallel none|ddp|fsdp] CONFIG [nanogrow train options...]

  Runs  torchrun --standalone --nproc_per_node=N -m nanogrow.cli train --config CONFIG [--set train.parallel=P] ...
  --nproc N      processes on this node (default: the number of GPUs, or 2 on a CPU-only machine)
  --parallel P   data-parallel backend: none (manual gradient all-reduce), ddp, fsdp (FSDP2)
  anything else is passed to `nanogrow train` (e.g. --set train.max_steps=100 --resume auto)

  env: PYTHON (default .venv/bin/python, else python3), DRY_RUN=1 prints the command only,
       OMP_NUM_THREADS (torchrun sets 1 per process when unset)
examples:
  launch/torchrun.sh configs/demo.toml
  launch/torchrun.sh --nproc 8 --parallel fsdp configs/gpt2-small.toml --set train.max_steps=2000
TXT
}
set -euo pipefail
source "$(dirname "$0")/_common.sh"
NPROC="" PARALLEL=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --nproc) NPROC=$2; shift 2 ;;
    --parallel) PARALLEL=$2; shift 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { usage; exit 2; }
CONFIG=$1; shift
[ -f "$CONFIG" ] || { echo "launch/torchrun.sh: config $CONFIG not found" >&2; exit 2; }
if [ -z "$NPROC" ]; then NPROC=$(gpus_here); [ "$NPROC" -gt 0 ] || NPROC=2; fi
EXTRA=()
[ -z "$PARALLEL" ] || EXTRA=(--set "train.parallel=$PARALLEL")
run "${TORCHRUN[@]}" --standalone --nproc_per_node="$NPROC" "${NANOGROW_MODULE[@]}" train --config "$CONFIG" \
  "${EXTRA[@]}" "$@"
