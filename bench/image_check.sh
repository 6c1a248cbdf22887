#!/usr/bin/env bash
# Proves bench/gpu_check.sh in an environment like the GPU image (docs/benchmarks.md, "GPU"):
# CPython 3.12 with PyPI's torch 2.11 (a CUDA build; it runs on CPU) and only the image's packages
# that nanochat uses, nanochat not installed, no package index, no NANOCHAT_DATA. From a fresh
# clone of this repository's HEAD: prepare, then parts 1 and 2 with --device-type cpu.
#
#   bash bench/image_check.sh            # the venv is made once (multi-GB download), then reused
#   bash bench/image_check.sh --suite    # also the fast test suite (-m "not slow") in that venv
#   bash bench/image_check.sh --suite-only
#
# IMAGE_VENV (default ~/.cache/nanochat-image-venv) is the venv; PYTHON312 the interpreter to make it.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${IMAGE_VENV:-$HOME/.cache/nanochat-image-venv}"
DATA="${NANOCHAT_DATA:-$REPO/../shared/data}"
# the GPU image's packages that nanochat imports (docs: /work/.library/device/KINDS.md), and pytest
IMAGE_PACKAGES="torch==2.11.0 numpy pyarrow tiktoken requests tqdm filelock psutil pyyaml matplotlib safetensors tokenizers jinja2 httpx pytest"

if [ ! -x "$VENV/bin/python3" ]; then
    PY="${PYTHON312:-$(command -v python3.12 2>/dev/null || ls "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 2>/dev/null | head -1)}"
    "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 12)' || { echo "image_check: no python3.12 (set PYTHON312)" >&2; exit 1; }
    "$PY" -m venv "$VENV"
    "$VENV/bin/python3" -m pip install -q $IMAGE_PACKAGES
fi
"$VENV/bin/python3" -c 'import torch, sys; print(f"image-like venv: Python {sys.version.split()[0]}, torch {torch.__version__}")'

WORK="$(mktemp -d /tmp/nanochat-image-check.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
git clone -q "$REPO" "$WORK/nanochat"
cd "$WORK/nanochat"
t0=$(date +%s)
NANOCHAT_DATA="$DATA" bash bench/gpu_check.sh prepare
t1=$(date +%s)
# the image: its python3 first on PATH, no index, no data or base dir of ours
run() { env -u NANOCHAT_DATA -u NANOCHAT_BASE_DIR -u VIRTUAL_ENV PATH="$VENV/bin:/usr/bin:/bin" PIP_NO_INDEX=1 "$@"; }
status=0
if [ "${1:-}" != "--suite-only" ]; then
    run bash bench/gpu_check.sh 1 --device-type cpu --out "$WORK/out" || status=1
    t2=$(date +%s)
    run bash bench/gpu_check.sh 2 --device-type cpu --out "$WORK/out" || status=1
    t3=$(date +%s)
    echo "image_check: prepare $((t1 - t0))s, part 1 $((t2 - t1))s, part 2 $((t3 - t2))s ($(nproc) cores, $(date -u +%Y-%m-%d))"
fi
if [ "${1:-}" = "--suite" ] || [ "${1:-}" = "--suite-only" ]; then
    # the fast suite on torch 2.11: the image's packages (transformers is one) plus what the tests
    # import, in a target folder; the browser tests (test_ui.py: playwright + chromium) left out
    EXTRA="$WORK/extra"
    "$VENV/bin/python3" -m pip install -q --target "$EXTRA" rustbpe fastapi uvicorn prometheus_client scipy pytest-timeout openai transformers
    t4=$(date +%s)
    run env PYTHONPATH="$EXTRA:$WORK/nanochat" NANOCHAT_DATA="$DATA" OMP_NUM_THREADS=1 \
        python3 -m pytest -q -m "not slow" -p no:cacheprovider --ignore=tests/test_ui.py tests || status=1
    echo "image_check: fast suite $(( $(date +%s) - t4 ))s"
fi
exit $status
