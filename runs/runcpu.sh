#!/usr/bin/env bash
# The whole nanochat pipeline at tiny size on a CPU, offline: tokenizer, pretraining, evaluation,
# mid-training, SFT, a few RL steps, chat evaluations and the report card (docs/runcpu.md).
#
#   NANOCHAT_DATA=../shared/data bash runs/runcpu.sh     # ~13-20 minutes on 2 CPU cores
#   BASE_STEPS=1000 DEPTH=6 bash runs/runcpu.sh          # bigger / longer: every knob below is an env var
#   RUNCPU_TINY=1 SKIP_SETUP=1 bash runs/runcpu.sh       # smallest settings (what the end-to-end test runs)
#
# The model is far too small to answer questions: the point is to see every stage run, the loss
# fall, the samples turn into English words, and a report card at the end. Benchmark numbers are
# near chance at this size.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
# A relative NANOCHAT_DATA / NANOCHAT_BASE_DIR means "from where you typed the command": made
# absolute here, once, so every stage sees the same folder whatever its working directory. A data
# root that does not exist yet is kept (downloads fill it), never silently dropped.
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) if [ -d "$1" ]; then (cd "$1" && pwd); else printf '%s\n' "$PWD/$1"; fi ;; esac; }
if [ -n "${NANOCHAT_DATA:-}" ]; then export NANOCHAT_DATA="$(abspath "$NANOCHAT_DATA")"; fi
if [ -n "${NANOCHAT_BASE_DIR:-}" ]; then export NANOCHAT_BASE_DIR="$(abspath "$NANOCHAT_BASE_DIR")"; fi

# --- environment ---------------------------------------------------------------------------------
if [ "${SKIP_SETUP:-0}" != "1" ]; then
    bash "$REPO/runs/setup.sh"          # creates .venv and installs torch (CPU) + nanochat
    . "$REPO/.venv/bin/activate"
fi
# Offline data: ../shared/data beside the repository if it is there; otherwise everything is
# downloaded into $NANOCHAT_BASE_DIR/data (pretraining shards below, tasks by the stages that use them).
if [ -z "${NANOCHAT_DATA:-}" ] && [ -d "$REPO/../shared/data" ]; then
    export NANOCHAT_DATA="$(cd "$REPO/../shared/data" && pwd)"
fi
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
DATA_ROOT="${NANOCHAT_DATA:-$NANOCHAT_BASE_DIR/data}"
# Threads: the physical cores if the machine is otherwise idle when the script starts (1-minute
# load below 0.5), else half the logical CPUs (1 on a 2-core machine): the data loader tokenizes
# in background threads, and an OpenMP thread that has to share its core with other work stalls
# every parallel op (docs/runcpu.md, "Threads"). Set OMP_NUM_THREADS yourself to override.
NPROC=$(nproc)
NPROC_HALF=$(( NPROC / 2 ))
[ "$NPROC_HALF" -gt 0 ] || NPROC_HALF=1
PHYSICAL=$( { lscpu -p=Core,Socket 2>/dev/null | grep -v '^#' | sort -u | wc -l; } || true)
[ "${PHYSICAL:-0}" -gt 0 ] || PHYSICAL=$(sysctl -n hw.physicalcpu 2>/dev/null || echo 0)
LOAD1=$(cut -d' ' -f1 "${RUNCPU_LOADAVG:-/proc/loadavg}" 2>/dev/null || echo 99)  # (RUNCPU_LOADAVG: for the tests)
[ "$PHYSICAL" -le "$NPROC" ] || PHYSICAL=$NPROC  # a container may see the host's cores but run on fewer
if [ "$PHYSICAL" -gt 0 ] && awk -v l="$LOAD1" 'BEGIN { exit !(l < 0.5) }'; then
    DEFAULT_THREADS=$PHYSICAL
else
    DEFAULT_THREADS=$NPROC_HALF
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$DEFAULT_THREADS}"

# --- knobs (env overrides) -----------------------------------------------------------------------
# RUNCPU_TINY=1 shrinks every default to seconds-per-stage sizes; any knob set explicitly wins.
if [ "${RUNCPU_TINY:-0}" = "1" ]; then
    : "${VOCAB_SIZE:=1024}" "${TOK_MAX_CHARS:=2000000}"
    : "${DEPTH:=2}" "${MAX_SEQ_LEN:=256}" "${DEVICE_BATCH_SIZE:=2}" "${TOTAL_BATCH_SIZE:=512}"
    : "${BASE_STEPS:=10}" "${BASE_EVAL_EVERY:=5}" "${EVAL_TOKENS:=2048}" "${SAMPLE_EVERY:=-1}"
    : "${CORE_MAX_PER_TASK:=2}" "${SPLIT_TOKENS:=2048}"
    : "${MID_STEPS:=4}" "${SFT_STEPS:=4}" "${SFT_TOTAL_BATCH_SIZE:=512}" "${CHAT_EVAL_TOKENS:=512}"
    : "${RL_STEPS:=2}" "${RL_EXAMPLES:=2}" "${RL_SAMPLES:=2}" "${RL_MAX_NEW_TOKENS:=16}" "${RL_EVAL_PROBLEMS:=2}"
    : "${CHAT_MAX_PROBLEMS:=2}" "${CHAT_MAX_NEW_TOKENS:=16}" "${COMPILE:=0}"
fi
VOCAB_SIZE=${VOCAB_SIZE:-8192}              # small vocab: the embedding and head dominate a tiny model
TOK_MAX_CHARS=${TOK_MAX_CHARS:-50000000}    # 50M characters: a few seconds of BPE training
DEPTH=${DEPTH:-4}                           # width 256, 2 heads of 128
MAX_SEQ_LEN=${MAX_SEQ_LEN:-512}
DEVICE_BATCH_SIZE=${DEVICE_BATCH_SIZE:-8}
TOTAL_BATCH_SIZE=${TOTAL_BATCH_SIZE:-4096}  # tokens per step: 8 x 512, no accumulation
BASE_STEPS=${BASE_STEPS:-200}
BASE_EVAL_EVERY=${BASE_EVAL_EVERY:-50}
EVAL_TOKENS=${EVAL_TOKENS:-16384}           # val tokens per bpb evaluation during training (4 batches)
SAMPLE_EVERY=${SAMPLE_EVERY:-100}
CORE_MAX_PER_TASK=${CORE_MAX_PER_TASK:-20}  # CORE items per task in eval base (x 20 tasks)
SPLIT_TOKENS=${SPLIT_TOKENS:-32768}         # train/val bpb tokens in eval base
MID_STEPS=${MID_STEPS:-40}
SFT_STEPS=${SFT_STEPS:-48}
SFT_TOTAL_BATCH_SIZE=${SFT_TOTAL_BATCH_SIZE:-8192}  # 16 rows x 512 per step: the setting measured best in docs/chat_training.md
SFT_LR_FRAC=${SFT_LR_FRAC:-0.02}             # SFT's default; higher ones undid mid-training's SpellingBee (same doc)
CHAT_EVAL_TOKENS=${CHAT_EVAL_TOKENS:-16384}
RL_STEPS=${RL_STEPS:-4}
RL_EXAMPLES=${RL_EXAMPLES:-4}
RL_SAMPLES=${RL_SAMPLES:-4}
RL_MAX_NEW_TOKENS=${RL_MAX_NEW_TOKENS:-64}
RL_EVAL_PROBLEMS=${RL_EVAL_PROBLEMS:-8}
CHAT_MAX_PROBLEMS=${CHAT_MAX_PROBLEMS:-50}
CHAT_MAX_NEW_TOKENS=${CHAT_MAX_NEW_TOKENS:-64}
COMPILE=${COMPILE:-0}
if [ "$COMPILE" = "1" ]; then COMPILE_FLAG=--compile; else COMPILE_FLAG=--no-compile; fi

echo "nanochat runcpu: data $DATA_ROOT, outputs in $NANOCHAT_BASE_DIR, $OMP_NUM_THREADS thread(s) (load $LOAD1, $PHYSICAL physical cores)"
echo "  depth $DEPTH, seq len $MAX_SEQ_LEN, vocab $VOCAB_SIZE, base $BASE_STEPS x $TOTAL_BATCH_SIZE tokens, mid $MID_STEPS, sft $SFT_STEPS, rl $RL_STEPS steps"
SECONDS=0
stage() { echo; echo "=== [$(date +%H:%M:%S) +${SECONDS}s] $*"; }

# --- the pipeline --------------------------------------------------------------------------------
stage "report reset"
nanochat report reset

if ! ls "$DATA_ROOT"/pretrain/*.parquet >/dev/null 2>&1; then
    # with NANOCHAT_OFFLINE=1 this stops with an error naming the missing folder
    stage "download: 2 pretraining shards + the validation shard (~250M characters each)"
    nanochat data download -n 2
fi

stage "tokenizer: BPE with $VOCAB_SIZE tokens on $TOK_MAX_CHARS characters"
nanochat tokenizer train --vocab-size "$VOCAB_SIZE" --max-chars "$TOK_MAX_CHARS"
nanochat tokenizer eval

stage "pretraining"
nanochat train base --device-type cpu --depth "$DEPTH" --max-seq-len "$MAX_SEQ_LEN" \
    --window-pattern L --device-batch-size "$DEVICE_BATCH_SIZE" --total-batch-size "$TOTAL_BATCH_SIZE" \
    --num-iterations "$BASE_STEPS" --eval-every "$BASE_EVAL_EVERY" --eval-tokens "$EVAL_TOKENS" \
    --core-metric-every -1 --sample-every "$SAMPLE_EVERY" --lr-batch-scaling none $COMPILE_FLAG

stage "base model evaluation: bpb, samples, CORE"
nanochat eval base --device-type cpu --eval core,bpb,sample --max-per-task "$CORE_MAX_PER_TASK" --split-tokens "$SPLIT_TOKENS" \
    --device-batch-size "$DEVICE_BATCH_SIZE"

stage "mid-training"
nanochat train mid --device-type cpu --max-seq-len "$MAX_SEQ_LEN" --device-batch-size "$DEVICE_BATCH_SIZE" \
    --total-batch-size "$TOTAL_BATCH_SIZE" --num-iterations "$MID_STEPS" --eval-every -1 \
    --eval-tokens "$CHAT_EVAL_TOKENS" $COMPILE_FLAG

stage "chat evaluation of the mid-trained model"
nanochat eval chat --device-type cpu -i mid --max-problems "$CHAT_MAX_PROBLEMS" \
    --max-new-tokens "$CHAT_MAX_NEW_TOKENS"

stage "SFT"
nanochat train sft --device-type cpu --max-seq-len "$MAX_SEQ_LEN" --device-batch-size "$DEVICE_BATCH_SIZE" \
    --total-batch-size "$SFT_TOTAL_BATCH_SIZE" --num-iterations "$SFT_STEPS" --eval-every -1 \
    --eval-tokens "$CHAT_EVAL_TOKENS" --init-lr-frac "$SFT_LR_FRAC" --chatcore-every -1 $COMPILE_FLAG

stage "chat evaluation of the SFT model"
nanochat eval chat --device-type cpu -i sft --max-problems "$CHAT_MAX_PROBLEMS" \
    --max-new-tokens "$CHAT_MAX_NEW_TOKENS"

stage "RL on GSM8K"
nanochat train rl --device-type cpu --num-iterations "$RL_STEPS" --examples-per-step "$RL_EXAMPLES" \
    --num-samples "$RL_SAMPLES" --max-new-tokens "$RL_MAX_NEW_TOKENS" --device-batch-size "$DEVICE_BATCH_SIZE" \
    --eval-every -1 --eval-problems "$RL_EVAL_PROBLEMS" --eval-samples 2

stage "chat evaluation of the RL model"
nanochat eval chat --device-type cpu -i rl --max-problems "$CHAT_MAX_PROBLEMS" \
    --max-new-tokens "$CHAT_MAX_NEW_TOKENS"

stage "report card"
nanochat report generate

stage "done in ${SECONDS}s"
cat <<EOF
Report card: $NANOCHAT_BASE_DIR/report/report.md (and ./report.md)
Talk to the model in the terminal:
    . $REPO/.venv/bin/activate
    nanochat chat -i sft
or in the browser (http://127.0.0.1:8000/, also an OpenAI-compatible API at /v1):
    nanochat serve -i sft
EOF
