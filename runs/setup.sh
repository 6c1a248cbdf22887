#!/usr/bin/env bash
# Create .venv and install nanochat into it (idempotent). Used by runcpu.sh, test.sh and CI.
# torch is installed first with an exact CPU-friendly version so that the range in pyproject.toml
# is already satisfied (an open range would pull a multi-GB CUDA build). On a GPU machine that
# already has torch, set NANOCHAT_TORCH=skip, or NANOCHAT_TORCH=torch==2.11.0 etc.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
TORCH_SPEC=${NANOCHAT_TORCH:-torch==2.13.0}
if [ "$TORCH_SPEC" != "skip" ] && ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "$TORCH_SPEC"
fi
python -m pip install -q -e ".${NANOCHAT_EXTRAS:-[dev]}"
