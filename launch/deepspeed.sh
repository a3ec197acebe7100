#!/usr/bin/env bash
# DeepSpeed launcher. NOTE: ZeRO 1-3 training and growth exist (nanogrow/parallel/zero.py, tested), but the
# trainer does not use them yet (train.parallel = "zero1" | "zero2" | "zero3"); until it does, `nanogrow train`
# rejects the setting.
usage() {
  cat <<'TXT'
usage: launch/deepspeed.sh [--nproc N] [--stage 1|2|3] [--hostfile FILE] CONFIG [nanogrow train options...]

  Runs  deepspeed [--hostfile FILE] --num_gpus N --module nanogrow.cli train --config CONFIG
        --set train.parallel=zero<stage> ...
  NOT WIRED YET: ZeRO growth exists (nanogrow.parallel.zero: grow_zero through deepspeed.utils.safe_get_full_* /
  safe_set_full_*) but the trainer does not select it yet (issue #4).
  --nproc N      processes (GPUs) per node (default: GPUs here, or 2 on CPU with gloo)
  --stage S      ZeRO stage (default 1)
  --hostfile F   multi-node: DeepSpeed hostfile ("node01 slots=8" per line); nodes reachable by ssh
  env: PYTHON, DRY_RUN=1, TORCH_EXTENSIONS_DIR (cache of DeepSpeed's compiled ops; default ~/.cache/nanogrow/ext)
  install: DS_BUILD_OPS=0 pip install torch==<your torch> deepspeed   (name torch, or pip may swap it)
TXT
}
set -euo pipefail
source "$(dirname "$0")/_common.sh"
NPROC="" STAGE=1 HOSTFILE=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --nproc) NPROC=$2; shift 2 ;;
    --stage) STAGE=$2; shift 2 ;;
    --hostfile) HOSTFILE=(--hostfile "$2"); shift 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { usage; exit 2; }
CONFIG=$1; shift
[ -f "$CONFIG" ] || { echo "launch/deepspeed.sh: config $CONFIG not found" >&2; exit 2; }
"$PYTHON" -c "import deepspeed" 2>/dev/null || [ "${DRY_RUN:-0}" = 1 ] || {
  echo "launch/deepspeed.sh: deepspeed is not installed for $PYTHON (see --help)" >&2; exit 2; }
if [ -z "$NPROC" ]; then NPROC=$(gpus_here); [ "$NPROC" -gt 0 ] || NPROC=2; fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/nanogrow/ext}
echo "launch/deepspeed.sh: warning: the deepspeed backend is not wired into nanogrow train yet" >&2
run "$PYTHON" -m deepspeed.launcher.runner "${HOSTFILE[@]}" --num_gpus "$NPROC" --module nanogrow.cli train \
  --config "$CONFIG" --set "train.parallel=zero$STAGE" "$@"
