"""CORE: the DCLM in-context-learning benchmark suite, scored as a mean of centered accuracies.

The bundle: `core.yaml` (list `icl_tasks` of {label, dataset_uri, num_fewshot, icl_task_type,
continuation_delimiter}), `eval_meta_data.csv` (the `Random baseline` of each label, in percent)
and `eval_data/<category>/<task>.jsonl`. Three task types:

- multiple_choice {query, choices, gold}: one context, several continuations; the model picks
  the continuation with the lowest mean loss over its tokens.
- schema {context_options, continuation, gold}: several contexts, one continuation; the model
  picks the context under which the continuation has the lowest mean loss.
- language_modeling {context, continuation}: correct iff greedy decoding (argmax at every
  position, teacher-forced) reproduces the continuation's tokens exactly.

Every sequence starts with <|bos|>; few-shot examples (their gold answers filled in) come first,
separated by blank lines. Which tokens are "the continuation": we tokenize the whole prompt
(context + delimiter + continuation) in one piece, exactly as the model would see the text, and
also the prompt up to the continuation; the scored tokens are those after the longest common
prefix of the two. Tokenizing the parts separately and concatenating would produce token
sequences the model never saw (e.g. a lone " " token before a word, where BPE merges it into
" word"); the common prefix handles that merge and any other merge across the boundary.

Speed: all options of many items are packed into one right-padded forward (rows sorted by
length, at most `batch_tokens` tokens of padded batch per forward). Under torchrun each rank
takes every world_size-th item and the correct counts are summed over ranks.
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
import yaml

from nanochat.common import DownloadError, UserError, atomic_write_text, download_file, downloads_off, get_data_dir, print0
from nanochat.dataset import check_writable

FEWSHOT_SEED = 1234     # few-shot examples of item i come from random.Random(FEWSHOT_SEED + i)
SUBSAMPLE_SEED = 1337   # --max-per-task takes the first N items of this fixed shuffle


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
                    baselines[row["Eval Task"].strip()] = float(row["Random baseline"]) / 100.0
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
            baseline = float(e["random_baseline"]) / 100.0
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

def fewshot_indices(num_items, idx, k, seed=FEWSHOT_SEED):
    """k distinct item indices other than idx, the same every time for the same (idx, k)."""
    k = min(k, num_items - 1)
    if k <= 0:
        return []
    rng = random.Random(seed + idx)
    others = [i for i in range(num_items) if i != idx]
    return rng.sample(others, k)


def render_texts(task_type, items, idx, num_fewshot, delimiter):
    """[(prefix, full)] one pair per option of item idx: the text up to the continuation and the
    whole text. The options of a multiple-choice item share the prefix; those of a schema item
    share the continuation; a language-modeling item has one option."""
    item = items[idx]
    shots = [items[j] for j in fewshot_indices(len(items), idx, num_fewshot)]
    if task_type == "multiple_choice":
        header = "".join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}\n\n" for s in shots)
        prefix = header + item["query"] + delimiter
        return [(prefix, prefix + c) for c in item["choices"]]
    if task_type == "schema":
        header = "".join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}\n\n" for s in shots)
        return [(header + ctx + delimiter, header + ctx + delimiter + item["continuation"])
                for ctx in item["context_options"]]
    if task_type == "language_modeling":
        # contexts are stored with stray trailing whitespace in places; the delimiter supplies it
        header = "".join(f"{s['context'].rstrip()}{delimiter}{s['continuation']}\n\n" for s in shots)
        prefix = header + item["context"].rstrip() + delimiter
        return [(prefix, prefix + item["continuation"])]
    raise ValueError(f"unknown task type {task_type}")


def common_prefix_len(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_option(tokenizer, prefix, full, max_len):
    """(tokens, start) with tokens[start:] the scored continuation. Jointly tokenized, BOS first;
    if longer than max_len, tokens are dropped from the left just after BOS, so the continuation
    and the text right before it survive."""
    bos = tokenizer.get_bos_token_id()
    full_ids = tokenizer.encode(full, prepend=bos)
    prefix_ids = tokenizer.encode(prefix, prepend=bos)
    start = common_prefix_len(prefix_ids, full_ids)
    start = min(max(start, 1), len(full_ids) - 1)  # at least one scored token, BOS never scored
    if len(full_ids) > max_len:
        drop = len(full_ids) - max_len
        # a continuation longer than the window keeps its tail (start clamps to 1 below)
        full_ids = full_ids[:1] + full_ids[1 + drop:]
        start = max(start - drop, 1)
    return full_ids, start


# ---------------------------------------------------------------------------
# Scoring

@torch.no_grad()
def score_sequences(model, seqs, device, batch_tokens=16384, pad_id=0):
    """For each (tokens, start): (mean loss over tokens[start:], greedy argmax reproduces them).
    Rows are sorted by length and packed into right-padded batches; the model is causal, so
    the padding after a row never changes that row's logits."""
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
        T = len(seqs[rows[-1]][0])
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        for r, k in enumerate(rows):
            toks = seqs[k][0]
            ids[r, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        ids = ids.to(device)
        logits = model(ids).float()  # (B, T, V)
        # position t predicts token t+1; loss = logsumexp - logit of the target (no (B*T, V) copies)
        lse = torch.logsumexp(logits[:, :-1], dim=-1)
        target_logit = logits[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        losses = lse - target_logit
        preds = logits[:, :-1].argmax(dim=-1)
        del logits
        losses, preds, ids_cpu = losses.cpu(), preds.cpu(), ids.cpu()
        for r, k in enumerate(rows):
            toks, start = seqs[k]
            end = len(toks)
            mean_loss = losses[r, start - 1:end - 1].mean().item()
            exact = bool((preds[r, start - 1:end - 1] == ids_cpu[r, start:end]).all())
            out[k] = (mean_loss, exact)
        i = j
    return out


def evaluate_task(model, tokenizer, device, task, items, indices, max_len, batch_tokens=16384):
    """Number of correct items among `indices` (this rank's share) of one task."""
    seqs, owners = [], []  # owners[s] = (position in indices, option number)
    for n, idx in enumerate(indices):
        for o, (prefix, full) in enumerate(render_texts(task["type"], items, idx, task["num_fewshot"],
                                                        task["delimiter"])):
            seqs.append(encode_option(tokenizer, prefix, full, max_len))
            owners.append((n, o))
    scores = score_sequences(model, seqs, device, batch_tokens, pad_id=tokenizer.get_bos_token_id())
    per_item = [[] for _ in indices]
    for (n, o), s in zip(owners, scores):
        per_item[n].append(s)
    correct = 0
    for idx, opts in zip(indices, per_item):
        if task["type"] == "language_modeling":
            correct += int(opts[0][1])
        else:
            losses = [s[0] for s in opts]
            pred = min(range(len(losses)), key=lambda o: losses[o])  # ties: the first option
            correct += int(pred == items[idx]["gold"])
    return correct


def centered(acc, baseline):
    """(acc - b) / (1 - b): 0 at random guessing, 1 at perfect."""
    return (acc - baseline) / (1.0 - baseline)


def evaluate_core(model, tokenizer, device, config_path=None, max_per_task=-1, batch_tokens=16384,
                  max_seq_len=None, verbose=False):
    """Run every available task of the bundle. Returns {core, centered {task: x}, accuracy
    {task: x}, missing [task], num_tasks, num_available, tasks [rows for the CSV]}.
    core is the mean centered accuracy over the available tasks (nan if none)."""
    device = torch.device(device)
    if max_seq_len is None:
        max_seq_len = model.config.sequence_len
    is_dist = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_dist else (0, 1)
    tasks = load_bundle(config_path)
    was_training = model.training
    model.eval()
    results = {"centered": {}, "accuracy": {}, "missing": [], "tasks": []}
    cache = {}
    for task in tasks:
        if not os.path.isfile(task["path"]):
            results["missing"].append(task["label"])
            if verbose:
                print0(f"{task['label']:<34} missing ({task['path']})")
            continue
        if task["path"] not in cache:
            cache[task["path"]] = load_items(task["path"])
        items = cache[task["path"]]
        chosen = list(range(len(items)))
        if max_per_task > 0 and len(chosen) > max_per_task:
            random.Random(SUBSAMPLE_SEED).shuffle(chosen)
            chosen = sorted(chosen[:max_per_task])
        mine = chosen[rank::world]
        correct = evaluate_task(model, tokenizer, device, task, items, mine, max_seq_len, batch_tokens)
        counts = torch.tensor([correct, len(mine)], dtype=torch.long, device=device)
        if is_dist and world > 1:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        correct, total = counts.tolist()
        acc = correct / max(total, 1)
        baseline = task["baseline"]
        if baseline is None:
            baseline = random_guess_baseline(task["type"], [items[i] for i in chosen])
        c = centered(acc, baseline)
        results["accuracy"][task["label"]] = acc
        results["centered"][task["label"]] = c
        results["tasks"].append({"task": task["label"], "type": task["type"], "num_items": total,
                                 "accuracy": acc, "centered": c, "baseline": baseline})
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
