"""Chat evaluation: ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval (the five of ChatCORE) and
SpellingBee (reported beside it). Used by `nanochat eval chat` and by the small ChatCORE that
`train mid`/`train sft` run.

Categorical tasks (ARC, MMLU) are scored from the logits alone: at the position right after
<|assistant_start|> the logits of the item's answer labels are compared and the largest wins (no
sampling, many prompts per padded forward). Generative tasks (GSM8K, HumanEval, SpellingBee)
sample `num_samples` completions per problem with the Engine (continuous batching over all
prompts); a problem counts as solved if any sample passes the task's check (pass@k). GSM8K and
HumanEval check as upstream nanochat does unless `lenient` (tasks/gsm8k.py, tasks/humaneval.py).

ChatCORE as upstream nanochat (karpathy/nanochat 92d63d4, scripts/chat_eval.py) defines it:
centered accuracy (acc - b) / (1 - b) with the fixed random baselines b = 0.25 for ARC-Easy,
ARC-Challenge and MMLU and b = 0 for GSM8K and HumanEval, then the plain mean over those five
tasks. SpellingBee is not part of it.

Subsets: `--max-problems N` scores the first N problems of the task in a fixed shuffled order
(numpy's default_rng(42).permutation, the order in which upstream's tasks present their rows),
so the same N problems as upstream's `--max-problems N`.
"""
import math

import numpy as np
import torch

from nanochat.common import UserError, autocast_ctx, get_dist_info
from nanochat.core_eval import centered
from nanochat.engine import Engine
from nanochat.training import global_sum
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SpellingBee

CHATCORE_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"]
TASK_NAMES = CHATCORE_TASKS + ["SpellingBee"]  # everything `eval chat` can run
# random-chance accuracy per task: 1 of 4 letters for the multiple-choice ones, 0 for open answers
RANDOM_BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
                    "SpellingBee": 0.0}
SPELLINGBEE_EVAL_SIZE = 256  # the test split's problems are generated; this many are scored
SUBSET_SEED = 42


def load_task(name, lenient=False):
    """The test split of one task; `lenient` picks our looser GSM8K/HumanEval checkers."""
    if name in ("ARC-Easy", "ARC-Challenge"):
        return ARC(subset=name, split="test")
    if name == "MMLU":
        return MMLU(subset="all", split="test")
    if name == "GSM8K":
        return GSM8K(subset="main", split="test", lenient=lenient)
    if name == "HumanEval":
        return HumanEval(lenient=lenient)
    if name == "SpellingBee":
        return SpellingBee(size=SPELLINGBEE_EVAL_SIZE, split="test")
    raise UserError(f"unknown task '{name}' (choose from {', '.join(TASK_NAMES)})")


def pick_problems(n, max_problems, seed=SUBSET_SEED):
    """All problem indices in order, or the first max_problems of the permutation
    np.random.default_rng(seed).permutation(n): upstream nanochat shuffles every task's rows that
    way (seed 42) and takes the first N, so both score the same N problems."""
    if max_problems is None or max_problems <= 0 or max_problems >= n:
        return list(range(n))
    return [int(i) for i in np.random.default_rng(seed).permutation(n)[:max_problems]]


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
    """(correct, total) over task[indices]: each prompt's prediction is the
    letter whose token has the largest logit at the last prompt position. Prompts longer than
    the model's context keep their last sequence_len tokens."""
    max_len = model.config.sequence_len
    pad = tokenizer.get_bos_token_id()
    correct, total = 0, 0
    for s in range(0, len(indices), batch_size):
        convs = [task[i] for i in indices[s:s + batch_size]]
        prompts = [tokenizer.render_for_completion(c)[-max_len:] for c in convs]
        T = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), T), pad, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, :len(p)] = torch.tensor(p, dtype=torch.long)
        # the logits of each row's last prompt position only (right padding never reaches it)
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        final = model(ids.to(device), logits_positions=(torch.arange(len(prompts), device=device), last)).float().cpu()
        for conv, row in zip(convs, final):
            letters = conv["letters"]
            scores = row[letter_token_ids(tokenizer, letters)]
            pred = letters[int(scores.argmax())]
            correct += int(bool(task.evaluate(conv, pred)))
            total += 1
        if progress:
            progress(total)
    return correct, total


def generative_outcomes(engine, task, indices, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50,
                        batch_size=32, seed=42, progress=None, chunk=64, max_len=None):
    """Per problem of task[indices], whether each of its num_samples completions passes
    task.evaluate: a list of lists of bools. Problems go to the Engine `chunk` at a time (so
    progress can be shown), all their samples continuously batched `batch_size` rows at a time.
    max_len: the context prompt + completion must fit (default: the model's)."""
    tokenizer = engine.tokenizer
    max_len = max_len or engine.model.config.sequence_len
    keep = max(1, max_len - max_new_tokens)
    outcomes = []
    for s in range(0, len(indices), chunk):
        convs = [task[i] for i in indices[s:s + chunk]]
        prompts = [tokenizer.render_for_completion(c)[-keep:] for c in convs]
        flat = [p for p in prompts for _ in range(num_samples)]
        results, _ = engine.generate_many(flat, max_tokens=min(max_new_tokens, max_len - 1), temperature=temperature,
                                          top_k=top_k, seed=seed + s, batch_size=batch_size)
        for k, (conv, p) in enumerate(zip(convs, prompts)):
            outs = results[k * num_samples:(k + 1) * num_samples]
            outcomes.append([bool(task.evaluate(conv, tokenizer.decode(o[len(p):]))) for o in outs])
        if progress:
            progress(len(outcomes))
    return outcomes


def run_generative(engine, tokenizer, task, indices, num_samples=1, max_new_tokens=512, temperature=0.0,
                   top_k=50, batch_size=32, seed=42, progress=None, chunk=64):
    """(correct, total) over task[indices]: num_samples completions per problem, solved if any
    passes task.evaluate (pass@k)."""
    outcomes = generative_outcomes(engine, task, indices, num_samples, max_new_tokens, temperature, top_k, batch_size,
                                   seed, progress, chunk)
    return sum(any(o) for o in outcomes), len(outcomes)


def evaluate_task(engine, task, problems, device, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50,
                  batch_size=32, progress=None, baseline=None):
    """One task over `problems` (indices into it; under torchrun each rank takes every
    world_size-th one and the counts are summed over ranks). `baseline` is the task's random
    accuracy for centering (default: 0.25 for a categorical task, 0 for a generative one; what
    RANDOM_BASELINES says for every task we have). Returns {accuracy, centered, baseline,
    num_problems, num_correct, eval_type}."""
    _, rank, _, world = get_dist_info()
    mine = problems[rank::world]
    model, tokenizer = engine.model, engine.tokenizer
    with autocast_ctx(device):
        if task.eval_type == "categorical":
            c, t = run_categorical(model, tokenizer, task, mine, device, batch_size, progress)
        else:
            c, t = run_generative(engine, tokenizer, task, mine, num_samples, max_new_tokens, temperature, top_k,
                                     batch_size, progress=progress)
    c, t = global_sum(c, device), global_sum(t, device)
    if baseline is None:
        baseline = 0.25 if task.eval_type == "categorical" else 0.0
    acc = c / max(t, 1)
    return {"accuracy": acc, "centered": centered(acc, baseline), "baseline": baseline,
            "num_problems": int(t), "num_correct": int(c), "eval_type": task.eval_type}


def chatcore(results) -> float:
    """Mean centered accuracy over the ChatCORE tasks (CHATCORE_TASKS) in `results` ({task:
    {"centered": x, ...}}); other tasks (SpellingBee) are ignored; nan when there is none."""
    vals = [r["centered"] for name, r in results.items() if name in CHATCORE_TASKS]
    return sum(vals) / len(vals) if vals else math.nan


def small_chatcore(model, tokenizer, device, task_names, max_problems, max_new_tokens=128, batch_size=32):
    """The ChatCORE of `eval chat` over a few problems per task (the subset rule of
    pick_problems), greedy: what `train mid`/`train sft` report during training. Returns
    ({task: accuracy} for every task run, ChatCORE over the ChatCORE tasks among them)."""
    engine = Engine(model, tokenizer)
    was_training = model.training
    model.eval()
    results = {}
    for name in task_names:
        task = load_task(name)
        results[name] = evaluate_task(engine, task, pick_problems(len(task), max_problems), device,
                                      max_new_tokens=max_new_tokens, top_k=None, batch_size=batch_size,
                                      baseline=RANDOM_BASELINES[name])
    model.train(was_training)
    return {name: r["accuracy"] for name, r in results.items()}, chatcore(results)
