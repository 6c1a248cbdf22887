#!/usr/bin/env bash
# The GPU speedrun: a GPT-2-grade chat model on one 8xGPU node (H100 class) in a few hours.
#
#   bash runs/speedrun.sh                       # 8 GPUs (default)
#   NPROC=1 bash runs/speedrun.sh               # one GPU: same result, ~8x longer (gradient accumulation)
#   DEPTH=20 bash runs/speedrun.sh              # a smaller, cheaper model
#   FP8= bash runs/speedrun.sh                  # bf16 only (a GPU without FP8 tensor cores)
#
# The pretraining is upstream's GPT-2 speedrun config (d24, 8 tokens per scaling parameter, FP8):
# 5,568 steps of 2^20 tokens, 2.79e19 FLOPs, ~2 h on 8xH100 at 50% MFU (docs/training.md, "Time
# to GPT-2 on paper"; upstream's record is 1.65 h). Print the plan without training:
#   nanochat train base --depth 24 --target-param-data-ratio 8 --fp8 --window-pattern SSSL --dry-run
#   WANDB_RUN=myrun bash runs/speedrun.sh       # log to wandb as well
#
# Multi-node: run the same training commands under torchrun with --nnodes/--node-rank/--rdzv-endpoint
# (see README); every stage is torchrun-ready.
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC=${NPROC:-8}
DEPTH=${DEPTH:-24}                 # d24 ~ GPT-2 (1.5B) CORE grade with the ClimbMix data
RATIO=${RATIO:-8}                  # training tokens per scaling parameter (train base's default is 12)
FP8=${FP8---fp8}                   # FP8 matmuls (H100 class); set FP8= to train in bf16
NUM_SHARDS=${NUM_SHARDS:-240}      # ~250M characters each; more than the d24 token budget (5.8B tokens at ratio 8)
WANDB_RUN=${WANDB_RUN:-dummy}
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}

# The exact packages of runs/requirements-gpu.txt: PyPI's torch 2.11.0 (CUDA 13.0 build, the
# version the GPU check ran with) and the runtime dependencies, no test extras; installed once
# (pip skips what the venv already has at those versions).
NANOCHAT_REQUIREMENTS=runs/requirements-gpu.txt bash runs/setup.sh
. .venv/bin/activate

TORCHRUN="torchrun --standalone --nproc_per_node=$NPROC -m nanochat"

nanochat report reset

# Data: the first 8 shards for the tokenizer now, the rest in the background while it trains.
nanochat data download -n 8
nanochat data download -n "$NUM_SHARDS" &
DOWNLOAD_PID=$!

nanochat tokenizer train --vocab-size 32768 --max-chars 2000000000
nanochat tokenizer eval

echo "waiting for the data download to finish..."
wait $DOWNLOAD_PID

# Base model (pretraining), then its evaluation: bits per byte, CORE, samples.
# --device-batch-size auto: the largest micro-batch that fits (upstream uses 16 on 80 GB H100s).
$TORCHRUN train base --depth "$DEPTH" --target-param-data-ratio "$RATIO" $FP8 --device-batch-size auto \
    --run "$WANDB_RUN"
$TORCHRUN eval base

# Mid-training (conversation format, tool use, identity), SFT, and their evaluations.
$TORCHRUN train mid --run "$WANDB_RUN"
$TORCHRUN eval chat -i mid
$TORCHRUN train sft --run "$WANDB_RUN"
$TORCHRUN eval chat -i sft

# Optional: RL on GSM8K (uncomment; it mostly improves GSM8K).
# $TORCHRUN train rl --run "$WANDB_RUN"
# $TORCHRUN eval chat -i rl -a GSM8K

nanochat report generate
echo
echo "done. Talk to it:   nanochat chat -i sft      or serve the web UI:   nanochat serve -i sft"
