#!/usr/bin/env bash
# The first-GPU check (docs/benchmarks.md, "GPU"):
#
#   bash bench/gpu_check.sh prepare                  # here, with the package index: fills .gpu_check/
#   bash bench/gpu_check.sh 1 [--device-type cpu] [--out DIR] [--only a,b]   # on the GPU machine
#   bash bench/gpu_check.sh 2 [--device-type cpu] [--out DIR]
#
# prepare puts into .gpu_check/ (git-ignored, a few MiB) what the GPU image lacks: CPython 3.12
# manylinux x86_64 wheels of the packages nanochat needs there (rustbpe: `train base` imports the
# tokenizer module) and one pretraining shard (train_base's tokenizer and data). Parts 1 and 2 use
# the `python3` on PATH, install those wheels into a temporary folder (no index, no network), put
# the repository on the import path (nanochat is not installed there) and point NANOCHAT_DATA at
# .gpu_check/data. --out defaults to $OUT when set (the device tool's result folder).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${GPU_CHECK_DIR:-$REPO/.gpu_check}"
WHEELS="rustbpe==0.1.0"  # what nanochat imports that the image lacks (fastapi/uvicorn: only `serve`, not checked here)
cmd="${1:-}"
[ $# -gt 0 ] && shift

case "$cmd" in
prepare)
    rm -rf "$DIR"
    mkdir -p "$DIR/wheels" "$DIR/data/pretrain"
    PIP=(python3 -m pip)
    "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$DIR/wheels" $WHEELS
    # one real shard: the same data root layout as ../shared/data (a single shard is both splits)
    src="${NANOCHAT_DATA:-$REPO/../shared/data}/pretrain"
    shard="$(ls "$src"/shard_*.parquet 2>/dev/null | head -1 || true)"
    if [ -z "$shard" ]; then
        echo "gpu_check prepare: no shard_*.parquet in $src (set NANOCHAT_DATA to a data root)" >&2
        exit 1
    fi
    cp "$shard" "$DIR/data/pretrain/"
    echo "prepared $DIR: $(du -sh "$DIR" | cut -f1) ($(ls "$DIR/wheels" | tr '\n' ' '); $(basename "$shard"))"
    ;;
1|2)
    if [ ! -d "$DIR/wheels" ]; then
        echo "gpu_check: $DIR is missing: run 'bash bench/gpu_check.sh prepare' where pip can reach the index, then carry it" >&2
        exit 1
    fi
    SITE="$(mktemp -d /tmp/gpu-check-site.XXXXXX)"
    trap 'rm -rf "$SITE"' EXIT
    if ! python3 -c "import rustbpe" 2>/dev/null; then  # a dev venv has it already (and may not be 3.12)
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$DIR"/wheels/*.whl
    fi
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    export NANOCHAT_DATA="$DIR/data" NANOCHAT_OFFLINE=1 PYTHONUNBUFFERED=1
    python3 -m bench.gpu_check --part "$cmd" "$@"  # the repository is on PYTHONPATH
    ;;
*)
    echo "usage: bash bench/gpu_check.sh prepare | 1 | 2 [--device-type cpu] [--out DIR] [--only CHECKS]" >&2
    exit 2
    ;;
esac
