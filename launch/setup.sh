#!/usr/bin/env bash
# Create ./.venv and install nanogrow with its test dependencies, without ever pulling a CUDA build of torch on a
# CPU machine: torch is installed first, pinned to the release this repo is tested with, and kept by a constraint.
# Idempotent: a second run only checks that everything is there.
#   NANOGROW_EXTRAS=dev  bash launch/setup.sh        # choose extras (default: dev,hf,triton,deepspeed,plot,tensorboard,
#                                                    # accelerate, what the tests use; wandb is not installed by
#                                                    # default; flash-attn is a GPU-only extra, not built here)
#   NANOGROW_TORCH=torch==2.13.0                     # what to install for torch (a cluster may keep its own)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${NANOGROW_EXTRAS:-dev,hf,triton,deepspeed,plot,tensorboard,accelerate}
export DS_BUILD_OPS=${DS_BUILD_OPS:-0}  # DeepSpeed: no CUDA ops at install; they are JIT-built where needed
TORCH=${NANOGROW_TORCH:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_q() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip_q "$TORCH" numpy  # numpy with torch: importing torch without it prints "Failed to initialize NumPy"
fi
constraints=$(mktemp)
.venv/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
PIP_CONSTRAINT="$constraints" pip_q -e ".[${EXTRAS}]"
rm -f "$constraints"
.venv/bin/python -c "import torch, nanogrow; print('nanogrow ready: torch', torch.__version__)"
