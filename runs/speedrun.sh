#!/usr/bin/env bash
# The GPU speedrun: a GPT-2-grade chat model on one 8xGPU node (H100 class) in a few hours.
#
#   bash runs/speedrun.sh                       # 8 GPUs (default)
#   NPROC=1 bash runs/speedrun.sh               # one GPU: same result, ~8x longer (gradient accumulation)
#   DEPTH=20 bash runs/speedrun.sh              # a smaller, cheaper model
#   WANDB_RUN=myrun bash runs/speedrun.sh       # log to wandb as well
#
# Multi-node: run the same training commands under torchrun with --nnodes/--node-rank/--rdzv-endpoint
# (see README); every stage is torchrun-ready.
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC=${NPROC:-8}
DEPTH=${DEPTH:-24}                 # d24 ~ GPT-2 (1.5B) CORE grade with the ClimbMix data
NUM_SHARDS=${NUM_SHARDS:-240}      # ~250M characters each; enough for the d24 token budget
WANDB_RUN=${WANDB_RUN:-dummy}
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}

# torch: a GPU machine usually has one already; otherwise install the CUDA build from PyPI
NANOCHAT_TORCH=${NANOCHAT_TORCH:-torch} bash runs/setup.sh
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
$TORCHRUN train base --depth "$DEPTH" --run "$WANDB_RUN"
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
