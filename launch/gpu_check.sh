#!/usr/bin/env bash
# The one-command GPU check: on one CUDA GPU, in about 8 minutes, every Triton kernel against its torch reference
# (time, peak memory, max error), a bf16 ~100M training run with torch kernels, Triton kernels and compile
# (tokens/s, MFU; flash-attn vs SDPA when flash-attn imports) and a growth event per operator under FSDP2, as one
# table. On a machine without CUDA it says so and exits 0.
#   usage: launch/gpu_check.sh      env: PYTHON (default .venv/bin/python, else python3), DRY_RUN=1
set -euo pipefail
source "$(dirname "$0")/_common.sh"
run "$PYTHON" "${NANOGROW_MODULE[@]}" bench gpu "$@"
