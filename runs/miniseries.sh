#!/usr/bin/env bash
# The miniseries on one GPU node: depths 10-20, each trained at 12 tokens per scaling parameter
# (train base's default ratio) under torchrun on all the node's GPUs with the micro-batch that fits
# its depth, CORE at the end of each; then bpb and CORE against size (docs/scaling.md). It prints
# the plan (runs, FLOPs, hours and dollars on 8xH100) before it starts.
#
#   bash runs/miniseries.sh                     # resumable: run it again after a crash or a kill
#   RATIO=8 DEPTHS=12,16,20,24 bash runs/miniseries.sh
#   bash runs/miniseries.sh --fp8               # anything after it goes to every `train base`
set -euo pipefail
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$NPROC" -gt 0 ] || NPROC=1
OUT=${OUT:-${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/scaling/series}
export OMP_NUM_THREADS=1
nanochat scaling series --nproc-per-node "$NPROC" --out "$OUT" \
    --depths "${DEPTHS:-10,12,14,16,18,20}" --ratio "${RATIO:-12}" \
    -- --device-batch-size auto "$@"
