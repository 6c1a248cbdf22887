"""Evaluation speed: seconds per 100 CORE items and per 100 chat problems (categorical and
generative), as JSON.

    python -m bench.eval                                  # latest base checkpoint, else a random tiny model
    python -m bench.eval --source sft --device-type cuda --out eval_speed.json
    python -m bench.eval --random --depth 4               # a random model of that depth

The model: `--source/--model-tag/--step` pick a checkpoint; with none saved (or --random), a
randomly initialized GPT built from GPTConfig (width 64 x depth, the tokenizer's vocabulary) is
timed instead; the JSON says which. A random model's generative numbers are those of completions
that run to --max-new-tokens (it rarely emits <|assistant_end|>), i.e. the slow end.
Needs the tokenizer ($NANOCHAT_BASE_DIR/tokenizer) and the offline data ($NANOCHAT_DATA).
"""
import argparse
import dataclasses
import json
import math
import os
import platform
import sys

import torch

from bench.common import autocast_ctx, timed
from bench.common import random_model as bench_random_model
from nanochat.common import UserError, compute_init, get_compute_dtype


def random_model(tokenizer, device, depth, sequence_len):
    from nanochat.gpt import GPTConfig
    width = 64 * depth
    cfg = GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.get_vocab_size(), n_layer=depth,
                    n_head=max(1, width // 64), n_kv_head=max(1, width // 64), n_embd=width, window_pattern="L")
    return bench_random_model(cfg, device), dataclasses.asdict(cfg)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="base", choices=["base", "mid", "sft", "rl"])
    p.add_argument("--model-tag", default=None)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--random", action="store_true", help="time a random model even if checkpoints exist")
    p.add_argument("--depth", type=int, default=2, help="random model: layers (width 64 x depth)")
    p.add_argument("--sequence-len", type=int, default=512, help="random model: context length")
    p.add_argument("--device-type", default="", choices=["", "cpu", "cuda", "mps"])
    p.add_argument("--core-per-task", type=int, default=5, help="CORE items per task (20 tasks offline)")
    p.add_argument("--core-batch-tokens", type=int, default=16384)
    p.add_argument("--chat-problems", type=int, default=100, help="problems per chat measurement")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128, help="generative: longest completion")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    from nanochat.chat_eval import load_task, pick_problems, run_categorical, run_generative
    from nanochat.core_eval import evaluate_core
    from nanochat.engine import Engine
    from nanochat.tokenizer import get_tokenizer

    _, _, _, _, device = compute_init(args.device_type)
    model = None
    info = {}
    if not args.random:
        from nanochat.checkpoint import resolve_checkpoint
        from nanochat.models import build_model
        try:
            ckpt_dir, tag, step = resolve_checkpoint(args.source, args.model_tag, args.step)
            model, tokenizer, meta = build_model(ckpt_dir, step, device, phase="eval")
            info = {"model": f"{args.source}/{tag}", "step": step, "model_config": meta["model_config"]}
        except UserError as e:
            print(f"no checkpoint ({e}); timing a random model", file=sys.stderr)
    if model is None:
        tokenizer = get_tokenizer()
        model, cfg = random_model(tokenizer, device, args.depth, args.sequence_len)
        info = {"model": f"random d{args.depth}", "model_config": cfg}

    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or platform.machine(), "dtype": str(get_compute_dtype(device.type)),
              "torch": torch.__version__, "threads": torch.get_num_threads(), **info}

    with autocast_ctx(device), torch.no_grad():
        # warm up (first-call allocations, kernels) on a few items, untimed
        evaluate_core(model, tokenizer, device, max_per_task=1, batch_tokens=args.core_batch_tokens)

        core, secs = timed(lambda: evaluate_core(model, tokenizer, device, max_per_task=args.core_per_task,
                                                 batch_tokens=args.core_batch_tokens), device)
        n = sum(t["num_items"] for t in core["tasks"])
        result["core"] = {"items": n, "seconds": secs, "seconds_per_100": 100 * secs / max(n, 1),
                          "tasks": core["num_available"]}

        # categorical: half ARC-Easy, half MMLU (longer prompts)
        total_n, total_s = 0, 0.0
        for name in ("ARC-Easy", "MMLU"):
            task = load_task(name)
            idx = pick_problems(len(task), math.ceil(args.chat_problems / 2))
            (c, t), secs = timed(lambda: run_categorical(model, tokenizer, task, idx, device, args.batch_size), device)
            total_n, total_s = total_n + t, total_s + secs
        result["chat_categorical"] = {"problems": total_n, "seconds": total_s,
                                      "seconds_per_100": 100 * total_s / max(total_n, 1), "tasks": "ARC-Easy+MMLU"}

        engine = Engine(model, tokenizer)
        task = load_task("GSM8K")
        idx = pick_problems(len(task), args.chat_problems)
        (c, t), secs = timed(lambda: run_generative(engine, tokenizer, task, idx, 1, args.max_new_tokens,
                                                       0.0, None, args.batch_size), device)
        result["chat_generative"] = {"problems": t, "seconds": secs, "seconds_per_100": 100 * secs / max(t, 1),
                                     "task": "GSM8K", "max_new_tokens": args.max_new_tokens, "greedy": True}

    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
