#!/usr/bin/env bash
# Create .venv and install nanochat into it (idempotent). Used by runcpu.sh, test.sh, speedrun.sh and CI.
#
# Default (a laptop, CI): torch is installed first with an exact CPU-friendly version so that the
# range in pyproject.toml is already satisfied (an open range would pull a multi-GB CUDA build),
# then `pip install -e .[dev]`. NANOCHAT_TORCH=skip keeps the venv's torch, NANOCHAT_TORCH=torch==X
# picks another.
#
# NANOCHAT_REQUIREMENTS=FILE (the GPU run: runs/requirements-gpu.txt): exactly the pinned packages
# of FILE (one pinned CUDA torch, installed once; no test extras), then nanochat itself without
# resolving anything again (--no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ -n "${NANOCHAT_REQUIREMENTS:-}" ]; then
    python -m pip install -q -r "$NANOCHAT_REQUIREMENTS"
    python -m pip install -q --no-deps -e .
    exit 0
fi
TORCH_SPEC=${NANOCHAT_TORCH:-torch==2.13.0}
if [ "$TORCH_SPEC" != "skip" ] && ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "$TORCH_SPEC"
fi
python -m pip install -q -e ".${NANOCHAT_EXTRAS:-[dev]}"
