#!/usr/bin/env bash
# Upstream's isoFLOP grid on one GPU node: 4 budgets (1e18, 2.15e18, 4.64e18, 1e19 FLOPs) x depths
# 10-20, every run under torchrun on all the node's GPUs with the micro-batch that fits its depth
# (--device-batch-size auto), ~52M val tokens and CORE at its end; then the fit and its pictures
# (docs/scaling.md). It prints the plan (runs, FLOPs, hours and dollars on 8xH100) before it starts.
#
#   bash runs/scaling_laws.sh                   # resumable: run it again after a crash or a kill
#   NPROC=1 bash runs/scaling_laws.sh           # one GPU (gradient accumulation, 8x the time)
#   bash runs/scaling_laws.sh --fp8             # anything after it goes to every `train base`
#
# Needs a tokenizer ($NANOCHAT_BASE_DIR/tokenizer: `nanochat tokenizer train`, as in runs/speedrun.sh)
# and the pretraining shards.
set -euo pipefail
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$NPROC" -gt 0 ] || NPROC=1
OUT=${OUT:-${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/scaling/grid}
export OMP_NUM_THREADS=1
nanochat scaling run --nproc-per-node "$NPROC" --out "$OUT" \
    --budgets 1e18,2.15e18,4.64e18,1e19 --depths 10,12,14,16,18,20 \
    -- --device-batch-size auto "$@"
nanochat scaling fit --csv "$OUT/results.csv" --target-flops 4e19
