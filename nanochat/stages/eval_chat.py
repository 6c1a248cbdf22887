"""`nanochat eval chat`: ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval and their ChatCORE, and
SpellingBee beside it.

    nanochat eval chat -i sft                       # all six tasks, the latest sft checkpoint
    nanochat eval chat -i sft -a MMLU,GSM8K --max-problems 200
    nanochat eval chat -i rl -a GSM8K --num-samples 8 --temperature 1.0   # pass@8
    nanochat eval chat -i sft --lenient             # our looser GSM8K / HumanEval checkers
    torchrun --nproc_per_node=8 -m nanochat eval chat -i sft

How each task is scored, the centering and ChatCORE: nanochat/chat_eval.py (docs/evaluation.md).
ChatCORE (upstream nanochat's: the mean centered accuracy of the five tasks, SpellingBee not
included) is reported as such only when all five were run.

Results: $NANOCHAT_BASE_DIR/eval/chat_<source>.json and the report card's
"Chat evaluation <source>" section.
"""
import argparse
import json
import os
import sys
import time

from nanochat.chat_eval import CHATCORE_TASKS, RANDOM_BASELINES, TASK_NAMES, chatcore, evaluate_task, load_task, pick_problems
from nanochat.checkpoint import resolve_checkpoint
from nanochat.models import build_model
from nanochat.common import (UserError, add_common_flags, atomic_write_text, compute_cleanup, compute_init, get_base_dir,
                             print0)
from nanochat.engine import Engine
from nanochat.quant import add_weights_flag, describe_weights, weights_choice
from nanochat.report import get_report


def split_names(values):
    """['ARC-Easy|MMLU', 'GSM8K,HumanEval'] -> ['ARC-Easy', 'MMLU', 'GSM8K', 'HumanEval']"""
    names = []
    for v in values:
        names += [n.strip() for n in v.replace("|", ",").split(",") if n.strip()]
    return names


CLEAR = "\r\033[K" if sys.stdout.isatty() else ""


def make_progress(name, n):
    """Progress of rank 0's share: one updating line on a terminal, a line per ~10% in a log."""
    state = {"last": 0}

    def progress(done):
        if sys.stdout.isatty():
            print0(f"{CLEAR}{name}: {done}/{n} problems (rank 0)", end="")
        elif done * 10 // max(n, 1) > state["last"] * 10 // max(n, 1) and done < n:
            print0(f"{name}: {done}/{n} problems (rank 0)")
        state["last"] = done
    return progress


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nanochat eval chat",
                                     description="Chat benchmarks (ARC, MMLU, GSM8K, HumanEval, SpellingBee) and ChatCORE.")
    parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"],
                        help="which checkpoints to load (default: sft)")
    parser.add_argument("-a", "--task-name", nargs="*", default=None,
                        help=f"tasks, separated by spaces, commas or '|' (default: all of {' '.join(TASK_NAMES)})")
    parser.add_argument("--max-problems", type=int, default=-1,
                        help="at most N problems per task: the first N of a fixed seed-42 shuffle, as upstream (-1 = all)")
    parser.add_argument("--lenient", action="store_true",
                        help="GSM8K and HumanEval with our looser checkers instead of upstream's (docs/evaluation.md)")
    parser.add_argument("--num-samples", type=int, default=1, help="generative tasks: samples per problem (pass@k)")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per forward / rows decoding together")
    parser.add_argument("--temperature", type=float, default=0.0, help="generative sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=50, help="generative sampling: keep the k most likely tokens")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="generative: longest completion")
    add_weights_flag(parser)
    add_common_flags(parser)
    args = parser.parse_args(argv)
    names = split_names(args.task_name) if args.task_name else list(TASK_NAMES)
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown or not names:
        raise UserError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(TASK_NAMES)}")
    if args.num_samples < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--num-samples, --batch-size and --max-new-tokens must be at least 1")
    if args.num_samples > 1 and args.temperature == 0:
        print0("note: --num-samples > 1 with --temperature 0 gives k identical greedy samples")

    is_dist, rank, local_rank, world_size, device = compute_init(args.device_type)
    ckpt_dir, model_tag, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    model, tokenizer, meta = build_model(ckpt_dir, step, device, phase="eval",
                                         weights=weights_choice(args.weights, device.type)[0])
    engine = Engine(model, tokenizer)
    print0(f"Evaluating {args.source}/{model_tag} step {step} on {device}, {describe_weights(args.weights, device.type)}: "
           f"{', '.join(names)}")

    results = {}
    for name in names:
        task = load_task(name, lenient=args.lenient)
        chosen = pick_problems(len(task), args.max_problems)
        t0 = time.time()
        results[name] = evaluate_task(engine, task, chosen, device, args.num_samples, args.max_new_tokens,
                                      args.temperature, args.top_k, args.batch_size,
                                      progress=make_progress(name, len(chosen[rank::world_size])),
                                      baseline=RANDOM_BASELINES[name])
        r = results[name]
        r["seconds"] = time.time() - t0
        print0(f"{CLEAR}{name}: {r['num_correct']}/{r['num_problems']} = {r['accuracy']:.4f}  "
               f"(centered {r['centered']:+.4f}, {r['seconds']:.1f}s)")

    score = chatcore(results)
    in_core = [n for n in CHATCORE_TASKS if n in results]
    all_five = len(in_core) == len(CHATCORE_TASKS)
    checker = "lenient" if args.lenient else "strict"
    print0("")
    print0(f"| {'task':<14} | {'type':<11} | {'problems':>8} | {'accuracy':>8} | {'centered':>8} |")
    print0(f"|{'-' * 16}|{'-' * 13}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for name, r in results.items():
        print0(f"| {name:<14} | {r['eval_type']:<11} | {r['num_problems']:>8} | {r['accuracy']:>8.4f} | {r['centered']:>8.4f} |")
    label = "ChatCORE" if all_five else f"ChatCORE over {len(in_core)}/{len(CHATCORE_TASKS)} tasks"
    if in_core:
        print0(f"{label}: {score:.4f}  (GSM8K/HumanEval checking: {checker})")
    if "SpellingBee" in results:
        print0(f"SpellingBee (not in ChatCORE): {results['SpellingBee']['accuracy']:.4f}")

    if rank == 0:
        out = {"source": args.source, "model_tag": model_tag, "step": step, "tasks": results,
               "chatcore": score if in_core else None, "chatcore_tasks": in_core, "max_problems": args.max_problems,
               "num_samples": args.num_samples, "temperature": args.temperature, "checking": checker}
        path = os.path.join(get_base_dir(), "eval", f"chat_{args.source}.json")
        atomic_write_text(path, json.dumps(out, indent=1))
        print0(f"results written to {path}")
        record = {"source": args.source, "model_tag": model_tag, "step": step, "checking": checker}
        record.update({name: r["accuracy"] for name, r in results.items()})
        if in_core:
            record["ChatCORE" if all_five else f"ChatCORE ({len(in_core)}/{len(CHATCORE_TASKS)} tasks)"] = score
        get_report().log(f"Chat evaluation {args.source}", record)
    compute_cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
