#!/usr/bin/env bash
# DeepSpeed ZeRO training (train.parallel = "deepspeed", train.zero_stage = 1|2|3), growth included.
usage() {
  cat <<'TXT'
usage: launch/deepspeed.sh [--nproc N] [--stage 1|2|3] [--hostfile FILE] CONFIG [nanogrow train options...]

  One node:  torchrun --standalone --nproc_per_node=N -m nanogrow.cli train --config CONFIG
             --set train.parallel=deepspeed --set train.zero_stage=S ...
  Nodes:     python -m deepspeed.launcher.runner --hostfile FILE --num_gpus N --no_local_rank
             --module nanogrow.cli train ... (same arguments; nodes reachable by ssh)
  The trainer reads rank and world size from the environment either launcher sets; DeepSpeed joins that
  process group (nccl on CUDA, gloo on CPU). bf16 on CUDA (DeepSpeed's bf16 with fp32 masters), fp32 on CPU.
  --nproc N      processes (GPUs) per node (default: GPUs here, or 2 on CPU with gloo)
  --stage S      ZeRO stage (default 1): 1 shards optimizer state, 2 also gradients, 3 also parameters
  --hostfile F   multi-node: DeepSpeed hostfile ("node01 slots=8" per line)
  Growth under ZeRO needs growth.optimizer = "map" or "reset" (no per-element ages). A ZeRO checkpoint resumes
  at the same world size and stage; elsewhere: nanogrow consolidate CKPT --out DIR, then --resume DIR/ckpt_...
  env: PYTHON, DRY_RUN=1, TORCH_EXTENSIONS_DIR (cache of DeepSpeed's compiled ops; default ~/.cache/nanogrow/ext)
  install: DS_BUILD_OPS=0 pip install torch==<your torch> deepspeed   (name torch, or pip may swap it)
TXT
}
set -euo pipefail
source "$(dirname "$0")/_common.sh"
NPROC="" STAGE=1 HOSTFILE=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --nproc) NPROC=$2; shift 2 ;;
    --stage) STAGE=$2; shift 2 ;;
    --hostfile) HOSTFILE=$2; shift 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { usage; exit 2; }
CONFIG=$1; shift
[ -f "$CONFIG" ] || { echo "launch/deepspeed.sh: config $CONFIG not found" >&2; exit 2; }
case "$STAGE" in 1|2|3) ;; *) echo "launch/deepspeed.sh: --stage must be 1, 2 or 3, got $STAGE" >&2; exit 2 ;; esac
"$PYTHON" -c "import deepspeed" 2>/dev/null || [ "${DRY_RUN:-0}" = 1 ] || {
  echo "launch/deepspeed.sh: deepspeed is not installed for $PYTHON (see --help)" >&2; exit 2; }
if [ -z "$NPROC" ]; then NPROC=$(gpus_here); [ "$NPROC" -gt 0 ] || NPROC=2; fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/nanogrow/ext}
TRAIN=(train --config "$CONFIG" --set train.parallel=deepspeed --set "train.zero_stage=$STAGE" "$@")
if [ -z "$HOSTFILE" ]; then
  run "${TORCHRUN[@]}" --standalone --nproc_per_node="$NPROC" "${NANOGROW_MODULE[@]}" "${TRAIN[@]}"
else
  # --no_local_rank: the trainer takes LOCAL_RANK from the environment, not a --local_rank argument.
  run "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --num_gpus "$NPROC" --no_local_rank \
    --module nanogrow.cli "${TRAIN[@]}"
fi
