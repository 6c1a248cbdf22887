"""`nanochat eval chat`: ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee and ChatCORE.

    nanochat eval chat -i sft                       # all six tasks, the latest sft checkpoint
    nanochat eval chat -i sft -a MMLU,GSM8K --max-problems 200
    nanochat eval chat -i rl -a GSM8K --num-samples 8 --temperature 1.0   # pass@8
    torchrun --nproc_per_node=8 -m nanochat eval chat -i sft

Categorical tasks (ARC, MMLU) are scored from the logits alone: at the position right after
<|assistant_start|> the answer letters' logits are compared and the largest wins (no sampling,
many prompts per padded forward). Generative tasks (GSM8K, HumanEval, SpellingBee) sample
`--num-samples` completions per problem with the Engine (continuous batching over all prompts);
a problem counts as solved if any sample passes the task's check (pass@k).

Centered accuracy = (acc - b) / (1 - b). b for a categorical task is the accuracy of guessing:
the mean over the scored problems of 1/number-of-choices (0.25 for 4-way items; ARC's few 3- and
5-choice items count with 1/3 and 1/5). b = 0 for generative tasks. ChatCORE = the mean centered
accuracy over the six tasks (it is reported as ChatCORE only when all six were run).

Results: $NANOCHAT_BASE_DIR/eval/chat_<source>.json and the report card's
"Chat evaluation <source>" section.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from nanochat.common import (UserError, add_common_flags, atomic_write_text, autocast_ctx, compute_cleanup,
                             compute_init, get_base_dir, print0)

TASK_NAMES = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
SPELLINGBEE_EVAL_SIZE = 256  # the test split's problems are generated; this many are scored


def split_names(values):
    """['ARC-Easy|MMLU', 'GSM8K,HumanEval'] -> ['ARC-Easy', 'MMLU', 'GSM8K', 'HumanEval']"""
    names = []
    for v in values:
        names += [n.strip() for n in v.replace("|", ",").split(",") if n.strip()]
    return names


def load_task(name):
    if name in ("ARC-Easy", "ARC-Challenge"):
        from tasks.arc import ARC
        return ARC(subset=name, split="test")
    if name == "MMLU":
        from tasks.mmlu import MMLU
        return MMLU(subset="all", split="test")
    if name == "GSM8K":
        from tasks.gsm8k import GSM8K
        return GSM8K(subset="main", split="test")
    if name == "HumanEval":
        from tasks.humaneval import HumanEval
        return HumanEval()
    if name == "SpellingBee":
        from tasks.spellingbee import SpellingBee
        return SpellingBee(size=SPELLINGBEE_EVAL_SIZE, split="test")
    raise UserError(f"unknown task '{name}' (choose from {', '.join(TASK_NAMES)})")


def pick_problems(n, max_problems):
    """All problem indices, or max_problems evenly spaced ones (MMLU's test split is sorted by
    subject: the first N would all be abstract algebra)."""
    if max_problems is None or max_problems <= 0 or max_problems >= n:
        return list(range(n))
    return [i * n // max_problems for i in range(max_problems)]


def letter_token_ids(tokenizer, letters):
    ids = []
    for letter in letters:
        toks = tokenizer.encode(letter)
        if len(toks) != 1:
            raise ValueError(f"answer letter {letter!r} is not a single token ({toks}) in this tokenizer")
        ids.append(toks[0])
    return ids


@torch.no_grad()
def run_categorical(model, tokenizer, task, indices, device, batch_size=32, progress=None):
    """(correct, total, sum of 1/num_choices) over task[indices]: each prompt's prediction is the
    letter whose token has the largest logit at the last prompt position. Prompts longer than
    the model's context keep their last sequence_len tokens."""
    max_len = model.config.sequence_len
    pad = tokenizer.get_bos_token_id()
    correct, total, baseline = 0, 0, 0.0
    for s in range(0, len(indices), batch_size):
        convs = [task[i] for i in indices[s:s + batch_size]]
        prompts = [tokenizer.render_for_completion(c)[-max_len:] for c in convs]
        T = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), T), pad, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, :len(p)] = torch.tensor(p, dtype=torch.long)
        logits = model(ids.to(device))  # (B, T, V); right padding never reaches earlier positions
        last = torch.tensor([len(p) - 1 for p in prompts], device=logits.device)
        final = logits[torch.arange(len(prompts), device=logits.device), last].float().cpu()  # (B, V)
        for conv, row in zip(convs, final):
            letters = conv["letters"]
            scores = row[letter_token_ids(tokenizer, letters)]
            pred = letters[int(scores.argmax())]
            correct += int(bool(task.evaluate(conv, pred)))
            total += 1
            baseline += 1.0 / len(letters)
        if progress:
            progress(total)
    return correct, total, baseline


def run_generative(engine, tokenizer, task, indices, num_samples=1, max_new_tokens=512, temperature=0.0,
                   top_k=50, batch_size=32, seed=42, progress=None, chunk=64):
    """(correct, total, 0.0) over task[indices]: num_samples completions per problem, solved if
    any passes task.evaluate (pass@k). Problems go to the Engine `chunk` at a time (so progress
    can be shown), all their samples continuously batched `batch_size` rows at a time."""
    max_len = engine.model.config.sequence_len
    keep = max(1, max_len - max_new_tokens)  # prompt + completion must fit the context
    correct, total = 0, 0
    for s in range(0, len(indices), chunk):
        convs = [task[i] for i in indices[s:s + chunk]]
        prompts = [tokenizer.render_for_completion(c)[-keep:] for c in convs]
        flat = [p for p in prompts for _ in range(num_samples)]
        results, _ = engine.generate_many(flat, max_tokens=min(max_new_tokens, max_len - 1), temperature=temperature,
                                          top_k=top_k, seed=seed + s, batch_size=batch_size)
        for k, (conv, p) in enumerate(zip(convs, prompts)):
            outs = results[k * num_samples:(k + 1) * num_samples]
            ok = any(bool(task.evaluate(conv, tokenizer.decode(o[len(p):]))) for o in outs)
            correct += int(ok)
            total += 1
        if progress:
            progress(total)
    return correct, total, 0.0


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


def centered(acc, baseline):
    return (acc - baseline) / (1.0 - baseline)


def chatcore(results) -> float:
    """Mean centered accuracy over the tasks in `results` ({task: {"centered": x, ...}})."""
    vals = [r["centered"] for r in results.values()]
    return sum(vals) / len(vals) if vals else math.nan



def main(argv=None):
    parser = argparse.ArgumentParser(prog="nanochat eval chat",
                                     description="Chat benchmarks (ARC, MMLU, GSM8K, HumanEval, SpellingBee) and ChatCORE.")
    parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"],
                        help="which checkpoints to load (default: sft)")
    parser.add_argument("-a", "--task-name", nargs="*", default=None,
                        help=f"tasks, separated by spaces, commas or '|' (default: all of {' '.join(TASK_NAMES)})")
    parser.add_argument("--max-problems", type=int, default=-1, help="at most N problems per task (evenly spaced; -1 = all)")
    parser.add_argument("--num-samples", type=int, default=1, help="generative tasks: samples per problem (pass@k)")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per forward / rows decoding together")
    parser.add_argument("--temperature", type=float, default=0.0, help="generative sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=50, help="generative sampling: keep the k most likely tokens")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="generative: longest completion")
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

    from nanochat.checkpoint import build_model, resolve_checkpoint
    from nanochat.engine import Engine
    is_dist, rank, local_rank, world_size, device = compute_init(args.device_type)
    ckpt_dir, model_tag, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    model, tokenizer, meta = build_model(ckpt_dir, step, device, phase="eval")
    engine = Engine(model, tokenizer)
    print0(f"Evaluating {args.source}/{model_tag} step {step} on {device}: {', '.join(names)}")

    results = {}
    for name in names:
        task = load_task(name)
        chosen = pick_problems(len(task), args.max_problems)
        mine = chosen[rank::world_size]
        t0 = time.time()

        progress = make_progress(name, len(mine))

        with autocast_ctx(device):
            if task.eval_type == "categorical":
                c, t, b = run_categorical(model, tokenizer, task, mine, device, args.batch_size, progress)
            else:
                c, t, b = run_generative(engine, tokenizer, task, mine, args.num_samples, args.max_new_tokens,
                                         args.temperature, args.top_k, args.batch_size, progress=progress)
        counts = torch.tensor([c, t, b], dtype=torch.float64, device=device)
        if is_dist and world_size > 1:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        c, t, b = counts.tolist()
        acc = c / max(t, 1)
        baseline = b / max(t, 1)
        results[name] = {"accuracy": acc, "centered": centered(acc, baseline), "baseline": baseline,
                         "num_problems": int(t), "num_correct": int(c), "eval_type": task.eval_type,
                         "seconds": time.time() - t0}
        print0(f"{CLEAR}{name}: {int(c)}/{int(t)} = {acc:.4f}  (centered {results[name]['centered']:+.4f}, "
               f"{time.time() - t0:.1f}s)")

    score = chatcore(results)
    all_six = set(TASK_NAMES) <= set(results)
    print0("")
    print0(f"| {'task':<14} | {'type':<11} | {'problems':>8} | {'accuracy':>8} | {'centered':>8} |")
    print0(f"|{'-' * 16}|{'-' * 13}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for name, r in results.items():
        print0(f"| {name:<14} | {r['eval_type']:<11} | {r['num_problems']:>8} | {r['accuracy']:>8.4f} | {r['centered']:>8.4f} |")
    label = "ChatCORE" if all_six else f"ChatCORE over {len(results)}/{len(TASK_NAMES)} tasks"
    print0(f"{label}: {score:.4f}")

    if rank == 0:
        out = {"source": args.source, "model_tag": model_tag, "step": step, "tasks": results,
               "chatcore": score, "chatcore_num_tasks": len(results), "max_problems": args.max_problems,
               "num_samples": args.num_samples, "temperature": args.temperature}
        path = os.path.join(get_base_dir(), "eval", f"chat_{args.source}.json")
        atomic_write_text(path, json.dumps(out, indent=1))
        print0(f"results written to {path}")
        from nanochat.report import get_report
        record = {"source": args.source, "model_tag": model_tag, "step": step}
        record.update({name: r["accuracy"] for name, r in results.items()})
        record["ChatCORE" if all_six else f"ChatCORE ({len(results)}/{len(TASK_NAMES)} tasks)"] = score
        get_report().log(f"Chat evaluation {args.source}", record)
    compute_cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
