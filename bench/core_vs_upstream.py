"""Our CORE scorer against upstream nanochat's own, on the same weights and the same items, as
JSON. Not part of CI: it needs a plain checkout of karpathy/nanochat outside this repository.

    python -m bench.core_vs_upstream --upstream /work/upstream --max-per-task 40
    python -m bench.core_vs_upstream --upstream /work/upstream --model-tag d2 --out cmp.json
    python -m bench.core_vs_upstream --upstream /work/upstream --spans-only --max-per-task -1

Upstream's scorer is its `nanochat/core_eval.py` (loaded from the file, as the module
`upstream_core_eval`, so it never clashes with our `nanochat` package) driven by the
`evaluate_core` loop of its `scripts/base_eval.py` (the shuffle, the --max-per-task cut, the
centering). That script imports seven upstream modules at the top; stand-ins take their names
in sys.modules only while it loads, and only `print0`, `get_base_dir` and upstream's own
`evaluate_task` are ever called. Its bundle is a temporary folder holding our bundle's
eval_data and meta csv with a core.yaml of the tasks whose files exist (upstream stops at the
first missing file; squad and coqa are missing offline).

Both scorers get our model object and our tokenizer unchanged: upstream calls
`tokenizer(list_of_prompts, prepend=bos_id)`, `tokenizer.get_bos_token_id()` and
`model(ids) -> logits`, which ours provide, and our GPT has no `max_seq_len`, so upstream crops
nothing. Per task the JSON has both accuracies, whether the correct counts are identical and,
item by item, whether the rendered prompts, tokens and scored spans are identical, the largest
difference of a per-option mean loss, and how many decisions differ.
"""
import argparse
import datetime
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import types

import torch
import yaml

from nanochat import core_eval
from nanochat.common import autocast_ctx, compute_init
from bench.common import machine


def load_file_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stand_in(name, **attrs):
    """A module whose every other attribute is a function that refuses to run."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)

    def missing(attr):
        def refuse(*args, **kwargs):
            raise RuntimeError(f"{name}.{attr} is a stand-in in this comparison")
        return refuse
    module.__getattr__ = missing
    return module


def load_upstream(upstream_dir, base_dir):
    """(upstream core_eval module, upstream base_eval module) with base_eval's get_base_dir()
    returning base_dir and its print0 printing to stderr."""
    core = load_file_module("upstream_core_eval", os.path.join(upstream_dir, "nanochat", "core_eval.py"))
    stand_ins = {
        "nanochat": stand_in("nanochat"),
        "nanochat.common": stand_in("nanochat.common", get_base_dir=lambda: base_dir,
                                    print0=lambda *a, **k: print(*a, **dict(k, file=sys.stderr))),
        "nanochat.core_eval": core,
    }
    for name in ("tokenizer", "checkpoint_manager", "dataloader", "loss_eval", "engine"):
        stand_ins[f"nanochat.{name}"] = stand_in(f"nanochat.{name}")
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        base_eval = load_file_module("upstream_base_eval", os.path.join(upstream_dir, "scripts", "base_eval.py"))
    finally:  # our own nanochat modules go back in place
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return core, base_eval


def upstream_bundle(config_path, base_dir):
    """$base_dir/eval_bundle for upstream: links to our eval_data and meta csv, and a core.yaml
    of the tasks present. Returns the labels kept, in order."""
    src = os.path.dirname(os.path.abspath(config_path))
    with open(config_path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    present = [t for t in config["icl_tasks"] if os.path.isfile(os.path.join(src, "eval_data", t["dataset_uri"]))]
    bundle = os.path.join(base_dir, "eval_bundle")
    os.makedirs(bundle)
    os.symlink(os.path.join(src, "eval_data"), os.path.join(bundle, "eval_data"))
    os.symlink(os.path.join(src, "eval_meta_data.csv"), os.path.join(bundle, "eval_meta_data.csv"))
    with open(os.path.join(bundle, "core.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump({"icl_tasks": present}, f)
    return [t["label"] for t in present]


def no_forward(model, input_ids):
    """In place of upstream's forward_model when only prompts, tokens and spans are compared."""
    return torch.zeros(input_ids.shape), torch.zeros(input_ids.shape, dtype=torch.long)


def record_upstream(core, base_eval, forward=None):
    """Wrap upstream's functions to keep, per task, per item: the prompts, the token lists, the
    scored spans, the per-option (mean loss, greedy exact) from upstream's own losses, and
    upstream's decision. `forward` replaces upstream's forward_model (no_forward: no model)."""
    groups = []  # one list per evaluate_task call (a task), one dict per item
    orig_task, orig_forward = base_eval.evaluate_task, forward or core.forward_model

    def evaluate_task(*args, **kwargs):
        groups.append([])
        return orig_task(*args, **kwargs)

    def batcher(orig):
        def batch(tokenizer, prompts):
            tokens, starts, ends = orig(tokenizer, prompts)
            groups[-1].append({"prompts": list(prompts), "tokens": [list(t) for t in tokens],
                               "spans": list(zip(starts, ends))})
            return tokens, starts, ends
        return batch

    def forward_model(model, input_ids):
        losses, predictions = orig_forward(model, input_ids)
        rec = groups[-1][-1]
        options = []
        for i, (s, e) in enumerate(rec["spans"]):
            # the same slices upstream's evaluate_example reads
            mean = losses[i, s - 1:e - 1].mean().item()
            exact = bool(torch.all(predictions[i, s - 1:e - 1] == input_ids[i, s:e]).item())
            options.append((mean, exact))
        rec["options"] = options
        return losses, predictions

    orig_example = core.evaluate_example

    def evaluate_example(*args, **kwargs):
        correct = orig_example(*args, **kwargs)
        groups[-1][-1]["correct"] = bool(correct)  # upstream's own decision for the item
        return correct

    base_eval.evaluate_task = evaluate_task
    core.forward_model = forward_model
    core.evaluate_example = evaluate_example
    for kind in ("mc", "schema", "lm"):
        name = f"batch_sequences_{kind}"
        setattr(core, name, batcher(getattr(core, name)))
    return groups


def our_items(model, tokenizer, device, task, max_per_task, batch_tokens):
    """Per item of our scored list: prompts, token lists, spans and option scores."""
    file_items = core_eval.load_items(task["path"])
    items = [file_items[i] for i in core_eval.task_subset(len(file_items), max_per_task)]
    indices = list(range(len(items)))
    scores = core_eval.score_task(model, tokenizer, device, task, items, indices, batch_tokens)
    out = []
    for idx, options in zip(indices, scores):
        prompts = core_eval.render_prompts(task["type"], items, idx, task["num_fewshot"], task["delimiter"])
        seqs = core_eval.encode_item(tokenizer, task, items, idx)
        out.append({"prompts": prompts, "tokens": [t for t, _ in seqs], "spans": [(s, len(t)) for t, s in seqs],
                    "options": options, "correct": core_eval.is_correct(task["type"], options, items[idx].get("gold"))})
    return out


def check_spans(upstream_dir, config_path, tasks, tokenizer, max_per_task):
    """Without a model: upstream's prompts, tokens and scored spans against ours, item by item
    (upstream's own few-shot draw and rendering run; its forward is replaced by no_forward)."""
    with tempfile.TemporaryDirectory() as base_dir:
        upstream_bundle(config_path, base_dir)
        up_core, up_base_eval = load_upstream(upstream_dir, base_dir)
        groups = record_upstream(up_core, up_base_eval, forward=no_forward)
        up_base_eval.evaluate_core(None, tokenizer, torch.device("cpu"), max_per_task=max_per_task)
    rows = []
    for task, group in zip(tasks, groups, strict=True):
        file_items = core_eval.load_items(task["path"])
        items = [file_items[i] for i in core_eval.task_subset(len(file_items), max_per_task)]
        same = {"prompts_identical": True, "tokens_identical": True, "spans_identical": True}
        for idx, rec in enumerate(group):
            seqs = core_eval.encode_item(tokenizer, task, items, idx)
            same["prompts_identical"] &= rec["prompts"] == core_eval.render_prompts(
                task["type"], items, idx, task["num_fewshot"], task["delimiter"])
            same["tokens_identical"] &= rec["tokens"] == [t for t, _ in seqs]
            same["spans_identical"] &= rec["spans"] == [(s, len(t)) for t, s in seqs]
        rows.append({"task": task["label"], "type": task["type"], "items": len(group), **same})
    return rows


def compare_items(ours, theirs):
    """Item-by-item agreement of one task."""
    prompts_same = tokens_same = spans_same = True
    max_diff, decisions_differ = 0.0, 0
    for a, b in zip(ours, theirs, strict=True):
        # language modelling: two prompts (without, with the continuation) but one token row
        prompts_same &= a["prompts"] == b["prompts"]
        tokens_same &= a["tokens"] == b["tokens"]
        spans_same &= a["spans"] == b["spans"]
        for (la, ea), (lb, eb) in zip(a["options"], b["options"], strict=True):
            if math.isnan(la) != math.isnan(lb):
                max_diff = math.inf
            elif not math.isnan(la):
                max_diff = max(max_diff, abs(la - lb))
        decisions_differ += int(a["correct"] != b["correct"])
    return {"prompts_identical": prompts_same, "tokens_identical": tokens_same, "spans_identical": spans_same,
            "max_abs_option_loss_diff": max_diff, "decisions_differ": decisions_differ}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--upstream", required=True, help="a plain checkout of karpathy/nanochat (outside this repo)")
    p.add_argument("--source", default="base", choices=["base", "mid", "sft", "rl"])
    p.add_argument("--model-tag", default=None)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--max-per-task", type=int, default=40, help="items per task (-1 = all)")
    p.add_argument("--core-config", default=None, help="default $NANOCHAT_DATA/eval_bundle/core.yaml")
    p.add_argument("--core-batch-tokens", type=int, default=16384)
    p.add_argument("--device-type", default="cpu", choices=["", "cpu", "cuda", "mps"])
    p.add_argument("--spans-only", action="store_true",
                   help="no model: compare only prompts, tokens and scored spans (fast enough for -1 = all items)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    from nanochat.checkpoint import resolve_checkpoint
    from nanochat.models import build_model
    upstream_dir = os.path.abspath(args.upstream)
    config_path = args.core_config or core_eval.default_config_path()
    tasks = [t for t in core_eval.load_bundle(config_path) if os.path.isfile(t["path"])]
    if args.spans_only:
        from nanochat.tokenizer import get_tokenizer
        rows = check_spans(upstream_dir, config_path, tasks, get_tokenizer(), args.max_per_task)
        ok = all(r["prompts_identical"] and r["tokens_identical"] and r["spans_identical"] for r in rows)
        result = {"date": datetime.date.today().isoformat(), "max_per_task": args.max_per_task,
                  "upstream": upstream_dir, "all_identical": ok, "tasks": rows}
        return write_result(result, args.out)
    _, _, _, _, device = compute_init(args.device_type)
    ckpt_dir, tag, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    model, tokenizer, _ = build_model(ckpt_dir, step, device, phase="eval")
    assert not hasattr(model, "max_seq_len"), "upstream would crop to model.max_seq_len"

    with tempfile.TemporaryDirectory() as base_dir:
        labels = upstream_bundle(config_path, base_dir)
        assert labels == [t["label"] for t in tasks]
        up_core, up_base_eval = load_upstream(upstream_dir, base_dir)
        groups = record_upstream(up_core, up_base_eval)
        with autocast_ctx(device), torch.no_grad():
            t0 = time.perf_counter()
            theirs = up_base_eval.evaluate_core(model, tokenizer, device, max_per_task=args.max_per_task)
            t_up = time.perf_counter() - t0
            t0 = time.perf_counter()
            ours = core_eval.evaluate_core(model, tokenizer, device, config_path=config_path,
                                           max_per_task=args.max_per_task, batch_tokens=args.core_batch_tokens)
            t_ours = time.perf_counter() - t0
            rows = []
            for task, group, row in zip(tasks, groups, ours["tasks"], strict=True):
                mine = our_items(model, tokenizer, device, task, args.max_per_task, args.core_batch_tokens)
                n = row["num_items"]
                up_acc = theirs["results"][task["label"]]
                rows.append({"task": task["label"], "type": task["type"], "items": n,
                             "ours": row["accuracy"], "upstream": up_acc,
                             "ours_centered": row["centered"], "upstream_centered": theirs["centered_results"][task["label"]],
                             "correct_ours": row["num_correct"], "correct_upstream": sum(r["correct"] for r in group),
                             # upstream's accuracy is a float32 mean of 0/1 flags: compare the counts
                             "identical": row["num_correct"] == sum(r["correct"] for r in group) == round(up_acc * n),
                             **compare_items(mine, group)})
    result = {
        "machine": machine(),
        "date": datetime.date.today().isoformat(), "device": str(device), "torch": torch.__version__,
        "checkpoint": f"{args.source}/{tag} step {step}", "max_per_task": args.max_per_task,
        "upstream": upstream_dir, "core_ours": ours["core"], "core_upstream": theirs["core_metric"],
        "seconds_ours": round(t_ours, 2), "seconds_upstream": round(t_up, 2),
        "all_identical": all(r["identical"] for r in rows), "tasks": rows,
    }
    return write_result(result, args.out)


def write_result(result, out):
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return 0 if result["all_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
