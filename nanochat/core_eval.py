"""CORE: the DCLM in-context-learning benchmark suite, scored as a mean of centered accuracies,
item for item the way upstream nanochat's scorer (nanochat/core_eval.py, scripts/base_eval.py)
scores it, so our numbers compare with its leaderboard and with GPT-2's CORE.

The bundle: `core.yaml` (list `icl_tasks` of {label, dataset_uri, num_fewshot, icl_task_type,
continuation_delimiter}), `eval_meta_data.csv` (the `Random baseline` of each label, in percent)
and `eval_data/<category>/<task>.jsonl`. Three task types:

- multiple_choice {query, choices, gold}: one context, several continuations; the model picks
  the choice with the lowest mean loss over the tokens after the prefix all choices share.
- schema {context_options, continuation, gold}: several contexts, one continuation; the model
  picks the option with the lowest mean loss over the suffix all options share.
- language_modeling {context, continuation}: correct iff greedy decoding (argmax at every
  position, teacher-forced) reproduces every token after the prompt stripped of whitespace.

Items: each task file is shuffled with random.Random(1337) and cut to --max-per-task; item i of
that list gets its few-shot examples from the same list, drawn by random.Random(1234 + i).
Every sequence starts with <|bos|> and is tokenized in one piece; nothing is cropped.

Speed: all options of many items are packed into one right-padded forward (rows sorted by
length, at most `batch_tokens` tokens of padded batch per forward); a causal model gives each
row the same logits as a forward of its own. Under torchrun each rank takes every
world_size-th item and the correct counts are summed over ranks.
"""
import csv
import io
import json
import math
import os
import random
import shutil
import zipfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from nanochat.common import UserError, atomic_write_text, get_data_dir, print0
from nanochat.dataset import check_writable
from nanochat.download import DownloadError, download_file, downloads_off

FEWSHOT_SEED = 1234     # few-shot examples of item i come from random.Random(FEWSHOT_SEED + i)
SUBSAMPLE_SEED = 1337   # every task file is shuffled with it; --max-per-task keeps the first N


# ---------------------------------------------------------------------------
# Reading the bundle

# The DCLM CORE tasks in the layout nanochat uses (one zip, ~25 MB), as published by upstream nanochat
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


def default_config_path() -> str:
    return os.path.join(get_data_dir(), "eval_bundle", "core.yaml")


def ensure_eval_bundle(data_dir=None, url=None, timeout=60.0, retries=5, backoff=2.0) -> str:
    """Path of $NANOCHAT_DATA/eval_bundle, downloading and unpacking it first if it is absent.
    The zip is validated, unpacked into a temporary folder and renamed into place, so the bundle
    is either complete or absent. URL override: $NANOCHAT_EVAL_BUNDLE_URL."""
    data_dir = data_dir or get_data_dir()
    target = os.path.join(data_dir, "eval_bundle")
    if os.path.isfile(os.path.join(target, "core.yaml")):
        return target
    url = url or os.environ.get("NANOCHAT_EVAL_BUNDLE_URL") or EVAL_BUNDLE_URL
    how = "run `nanochat data download --eval-bundle`, or point NANOCHAT_DATA at a data root that has it"
    if downloads_off():
        raise UserError(f"the CORE eval bundle is not at {target} and downloads are off "
                        f"(NANOCHAT_OFFLINE/HF_HUB_OFFLINE): {how}")
    os.makedirs(data_dir, exist_ok=True)
    check_writable(data_dir)
    print0(f"downloading the CORE eval bundle from {url} into {target}")
    tmp_zip = os.path.join(data_dir, f".eval_bundle.{os.getpid()}.zip")
    tmp_dir = os.path.join(data_dir, f".eval_bundle.{os.getpid()}.unpacked")
    try:
        download_file(url, tmp_zip, timeout=timeout, retries=retries, backoff=backoff,
                      validate=zipfile.is_zipfile, what="a zip file")
        with zipfile.ZipFile(tmp_zip) as z:
            for name in z.namelist():  # refuse paths that would land outside the folder
                if name.startswith("/") or ".." in name.split("/"):
                    raise UserError(f"the eval bundle zip from {url} holds an unsafe path: {name}")
            z.extractall(tmp_dir)
        found = [root for root, _, files in os.walk(tmp_dir) if "core.yaml" in files]
        if not found:
            raise UserError(f"the zip from {url} has no core.yaml: not an eval bundle")
        if os.path.isdir(target):  # an incomplete earlier bundle (no core.yaml): replace it
            shutil.rmtree(target)
        os.replace(min(found, key=len), target)
    except DownloadError as e:
        raise UserError(f"could not download the CORE eval bundle from {url}: {e}. {how}") from e
    finally:
        if os.path.exists(tmp_zip):
            os.remove(tmp_zip)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def load_bundle(config_path=None):
    """[{label, type, path, num_fewshot, delimiter, baseline (fraction or None)}] for every task
    in the config, in order. Task files are resolved against `<config dir>/eval_data/` when that
    folder exists (the standard bundle layout), else against the config's own folder."""
    if config_path is None:
        ensure_eval_bundle()
    config_path = config_path or default_config_path()
    if not os.path.isfile(config_path):
        raise UserError(f"CORE config not found: {config_path}. Put the eval bundle at "
                        f"$NANOCHAT_DATA/eval_bundle (NANOCHAT_DATA={get_data_dir()}) or pass --core-config PATH")
    bundle_dir = os.path.dirname(os.path.abspath(config_path))
    with open(config_path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    entries = config.get("icl_tasks")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{config_path}: expected a non-empty list under 'icl_tasks'")
    data_root = os.path.join(bundle_dir, "eval_data")
    if not os.path.isdir(data_root):
        data_root = bundle_dir
    baselines = {}
    meta_path = os.path.join(bundle_dir, "eval_meta_data.csv")
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                try:
                    # 0.01 * x as upstream computes it (x / 100 can round differently)
                    baselines[row["Eval Task"].strip()] = 0.01 * float(row["Random baseline"])
                except (KeyError, TypeError, ValueError):
                    continue
    tasks = []
    for e in entries:
        for key in ("label", "dataset_uri", "icl_task_type"):
            if key not in e:
                raise UserError(f"{config_path}: task entry {e} lacks '{key}'")
        if e["icl_task_type"] not in ("multiple_choice", "schema", "language_modeling"):
            raise UserError(f"{config_path}: task {e['label']} has unknown icl_task_type '{e['icl_task_type']}' "
                            f"(multiple_choice, schema or language_modeling)")
        shots = e.get("num_fewshot", 0)
        if isinstance(shots, list):
            shots = shots[0] if shots else 0
        baseline = baselines.get(e["label"])
        if "random_baseline" in e:  # a task of your own can carry its baseline (percent) in the yaml
            baseline = 0.01 * float(e["random_baseline"])
        tasks.append({
            "label": e["label"], "type": e["icl_task_type"],
            "path": os.path.join(data_root, e["dataset_uri"]),
            "num_fewshot": int(shots),
            "delimiter": e.get("continuation_delimiter", " "),
            "baseline": baseline,
        })
    return tasks


_ITEMS_CACHE = {}  # path -> ((mtime, size), items): the training loop re-runs CORE; parse once


def load_items(path):
    st = os.stat(path)
    key = (st.st_mtime_ns, st.st_size)
    hit = _ITEMS_CACHE.get(path)
    if hit is None or hit[0] != key:
        with open(path, encoding="utf-8") as f:
            hit = (key, [json.loads(line) for line in f if line.strip()])
        _ITEMS_CACHE[path] = hit
    return hit[1]


def random_guess_baseline(task_type, items) -> float:
    """Expected accuracy of guessing, for a task the meta csv does not list."""
    if task_type == "language_modeling" or not items:
        return 0.0
    key = "choices" if task_type == "multiple_choice" else "context_options"
    return sum(1.0 / len(it[key]) for it in items) / len(items)


# ---------------------------------------------------------------------------
# Turning an item into token sequences

def task_subset(num_items, max_per_task):
    """Indices into a task file of the items to score, in scoring order: the whole file shuffled
    with random.Random(SUBSAMPLE_SEED), then cut to the first max_per_task (<= 0: all of them).
    The shuffle happens even without a limit, because the few-shot draw below picks positions
    in this shuffled (and cut) list: that is how upstream's scorer does it."""
    order = list(range(num_items))
    random.Random(SUBSAMPLE_SEED).shuffle(order)
    return order[:max_per_task] if max_per_task > 0 else order


def fewshot_indices(num_items, idx, k, seed=FEWSHOT_SEED):
    """k distinct positions other than idx, drawn by random.Random(seed + idx) from the scored
    list (num_items long), the same every time. Where the list is too short for k (upstream then
    fails), we take all the others."""
    k = min(k, num_items - 1)
    if k <= 0:
        return []
    rng = random.Random(seed + idx)
    others = [i for i in range(num_items) if i != idx]
    return rng.sample(others, k)


def render_prompts(task_type, items, idx, num_fewshot, delimiter):
    """The texts to tokenize for item idx of the scored list `items`: one full prompt per choice
    (multiple choice) or per context option (schema); for language modelling two texts, the
    prompt without the continuation (stripped on both sides) and the prompt with it. Few-shot
    examples, their gold answers filled in, come first, each followed by a blank line."""
    item = items[idx]
    shots = [items[j] for j in fewshot_indices(len(items), idx, num_fewshot)]
    if task_type == "multiple_choice":
        header = "".join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{header}{item['query']}{delimiter}{c}" for c in item["choices"]]
    if task_type == "schema":
        header = "".join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}\n\n" for s in shots)
        return [f"{header}{ctx}{delimiter}{item['continuation']}" for ctx in item["context_options"]]
    if task_type == "language_modeling":
        # some contexts carry stray whitespace: both ends are trimmed, the delimiter separates
        header = "".join(f"{s['context'].strip()}{delimiter}{s['continuation']}\n\n" for s in shots)
        without = f"{header}{item['context'].strip()}{delimiter}"
        # the strip drops the delimiter's trailing space, so in the tokens with the
        # continuation that space stays inside the scored span (" Paris", not "Paris")
        return [without.strip(), without + item["continuation"]]
    raise ValueError(f"unknown task type {task_type}")


def common_prefix_len(seqs):
    """Length of the longest prefix all the token lists share."""
    n = 0
    for column in zip(*seqs):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def common_suffix_len(seqs):
    return common_prefix_len([s[::-1] for s in seqs])


def scored_spans(task_type, token_lists):
    """[(tokens, start)]: the scored span of each option is tokens[start:].
    multiple choice: after the prefix all choices share (a choice's first tokens that every
    choice has are left out of every mean);
    schema: the suffix all options share, which may reach back into the context options when
    they end alike; language modelling: everything after the stripped prompt, so the
    delimiter's trailing space is scored with the continuation."""
    if task_type == "multiple_choice":
        start = common_prefix_len(token_lists)
        return [(t, start) for t in token_lists]
    if task_type == "schema":
        n = common_suffix_len(token_lists)
        return [(t, len(t) - n) for t in token_lists]
    if task_type == "language_modeling":
        without, full = token_lists
        start = len(without)
        if full[:start] != without or start >= len(full):
            # the stripped prompt did not tokenize as a prefix of the whole (a merge across the
            # boundary): upstream stops with an assertion here; we score after the common
            # prefix instead, at least the last token
            start = min(common_prefix_len([without, full]), len(full) - 1)
        return [(full, start)]
    raise ValueError(f"unknown task type {task_type}")


def encode_item(tokenizer, task, items, idx):
    """[(tokens, start)] for every option of item idx: each prompt tokenized in one piece as the
    model reads it, <|bos|> first, never cropped (the model takes sequences longer than its
    training context: rotary positions are computed for any length)."""
    prompts = render_prompts(task["type"], items, idx, task["num_fewshot"], task["delimiter"])
    token_lists = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    return scored_spans(task["type"], token_lists)


# ---------------------------------------------------------------------------
# Scoring

@torch.no_grad()
def score_sequences(model, seqs, device, batch_tokens=16384, pad_id=0):
    """For each (tokens, start): (mean loss over tokens[start:], whether the argmax at every one
    of those positions is the token there). An empty span gives (nan, True).
    Rows are sorted by length and packed into right-padded batches. The model is causal and
    works position by position, so a row's logits do not depend on the other rows or on the
    padding after it: the result is the same as scoring each item's options on their own
    (up to float rounding, which differs between batch shapes)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out = [None] * len(seqs)
    i = 0
    while i < len(order):
        # grow the batch while (rows x longest row) stays within the budget; sorted, so the
        # last row added is the longest
        j = i + 1
        while j < len(order) and (j - i + 1) * len(seqs[order[j]][0]) <= batch_tokens:
            j += 1
        rows = order[i:j]
        B, T = len(rows), len(seqs[rows[-1]][0])
        ids = torch.full((B, T), pad_id, dtype=torch.long)
        for r, k in enumerate(rows):
            toks = seqs[k][0]
            ids[r, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        ids = ids.to(device)
        # only the span positions need logits, a loss and an argmax: lm_head runs on those alone
        # (usually a few tokens per row, so this skips lm_head and the softmax over nearly all of
        # B x T x V); position t predicts token t+1, and an empty span (e.g. identical options)
        # has none
        spans = []
        for k in rows:
            toks, start = seqs[k]
            spans.append((start, len(toks)) if 1 <= start < len(toks) else (1, 1))  # (1, 1): nothing
        row_idx = torch.cat([torch.full((end - start,), r) for r, (start, end) in enumerate(spans)]).to(device)
        pos_idx = torch.cat([torch.arange(start - 1, end - 1) for start, end in spans]).to(device)
        picked = model(ids, logits_positions=(row_idx, pos_idx)).float()  # (span tokens, V)
        targets = ids[row_idx, pos_idx + 1]
        losses = F.cross_entropy(picked, targets, reduction="none").cpu()
        hits = (picked.argmax(dim=-1) == targets).cpu()
        del picked
        offset = 0
        for (start, end), k in zip(spans, rows):
            n = end - start
            if n == 0:
                out[k] = (math.nan, True)
            else:
                out[k] = (losses[offset:offset + n].mean().item(), bool(hits[offset:offset + n].all()))
            offset += n
        i = j
    return out


def score_task(model, tokenizer, device, task, items, indices, batch_tokens=16384):
    """Per item of `indices` (positions in the scored list `items`): its options' scores,
    [(mean loss, greedy exact)], all the items' options batched together."""
    seqs, owners = [], []  # owners[s] = position in indices
    for n, idx in enumerate(indices):
        for seq in encode_item(tokenizer, task, items, idx):
            seqs.append(seq)
            owners.append(n)
    scores = score_sequences(model, seqs, device, batch_tokens, pad_id=tokenizer.get_bos_token_id())
    per_item = [[] for _ in indices]
    for n, s in zip(owners, scores):
        per_item[n].append(s)
    return per_item


def is_correct(task_type, options, gold):
    """language modelling: greedy decoding reproduces the continuation. Otherwise the option
    with the lowest mean loss must be gold; a tie goes to the first such option, and a nan
    (empty span) never beats an earlier number, exactly as list.index(min(losses)) decides."""
    if task_type == "language_modeling":
        return bool(options[0][1])
    losses = [s[0] for s in options]
    return min(range(len(losses)), key=losses.__getitem__) == gold


def evaluate_task(model, tokenizer, device, task, items, indices, batch_tokens=16384):
    """Number of correct items among `indices` (this rank's share of the scored list `items`)."""
    per_item = score_task(model, tokenizer, device, task, items, indices, batch_tokens)
    return sum(int(is_correct(task["type"], opts, items[idx].get("gold"))) for idx, opts in zip(indices, per_item))


def centered(acc, baseline):
    """(acc - b) / (1 - b): 0 at random guessing, 1 at perfect."""
    return (acc - baseline) / (1.0 - baseline)


def evaluate_core(model, tokenizer, device, config_path=None, max_per_task=-1, batch_tokens=16384, verbose=False):
    """Run every available task of the bundle. Returns {core, centered {task: x}, accuracy
    {task: x}, missing [task], num_tasks, num_available, tasks [rows for the CSV]}.
    core is the mean centered accuracy over the available tasks (nan if none)."""
    device = torch.device(device)
    is_dist = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_dist else (0, 1)
    tasks = load_bundle(config_path)
    was_training = model.training
    model.eval()
    results = {"centered": {}, "accuracy": {}, "missing": [], "tasks": []}
    for task in tasks:
        if not os.path.isfile(task["path"]):
            results["missing"].append(task["label"])
            if verbose:
                print0(f"{task['label']:<34} missing ({task['path']})")
            continue
        file_items = load_items(task["path"])
        items = [file_items[i] for i in task_subset(len(file_items), max_per_task)]
        mine = list(range(rank, len(items), world))
        correct = evaluate_task(model, tokenizer, device, task, items, mine, batch_tokens)
        counts = torch.tensor([correct, len(mine)], dtype=torch.long, device=device)
        if is_dist and world > 1:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        correct, total = counts.tolist()
        acc = correct / max(total, 1)
        baseline = task["baseline"]
        if baseline is None:
            baseline = random_guess_baseline(task["type"], items)
        c = centered(acc, baseline)
        results["accuracy"][task["label"]] = acc
        results["centered"][task["label"]] = c
        results["tasks"].append({"task": task["label"], "type": task["type"], "num_items": total,
                                 "num_correct": correct, "accuracy": acc, "centered": c, "baseline": baseline})
        if verbose:
            print0(f"{task['label']:<34} {task['type']:<18} n={total:<6} acc {acc:.4f}  centered {c:+.4f}")
    if was_training:
        model.train()
    vals = list(results["centered"].values())
    results["core"] = sum(vals) / len(vals) if vals else math.nan
    results["num_tasks"] = len(tasks)
    results["num_available"] = len(vals)
    return results


def core_summary(results) -> str:
    """One line: 'CORE over 20/22 tasks: 0.1234 (missing: squad, coqa)'."""
    line = f"CORE over {results['num_available']}/{results['num_tasks']} tasks: {results['core']:.4f}"
    if results["missing"]:
        line += f" (missing: {', '.join(results['missing'])})"
    return line


def write_core_csv(results, path):
    """One row per evaluated task plus a final CORE row; written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["task", "type", "num_items", "accuracy", "centered", "baseline"])
    for r in results["tasks"]:
        w.writerow([r["task"], r["type"], r["num_items"], f"{r['accuracy']:.6f}", f"{r['centered']:.6f}",
                    f"{r['baseline']:.6f}"])
    for m in results["missing"]:
        w.writerow([m, "missing", 0, "", "", ""])
    w.writerow([f"CORE ({results['num_available']}/{results['num_tasks']} tasks)", "", "", "",
                f"{results['core']:.6f}", ""])
    atomic_write_text(path, buf.getvalue())
