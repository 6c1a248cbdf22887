"""`nanochat eval base`: bits per byte on the train and val splits, greedy samples, and CORE.

    nanochat eval base                                  # all three, the latest base checkpoint
    nanochat eval base --eval core --max-per-task 100   # a quick CORE estimate
    torchrun --nproc_per_node=8 -m nanochat eval base   # the same, split over 8 GPUs

CORE's per-task table is printed and written to
$NANOCHAT_BASE_DIR/eval/core_<source>_<model_tag>_step<step>.csv; the numbers also go to the
report card's "Base model evaluation" section.
"""
import argparse
import os
import time

from nanochat.checkpoint import resolve_checkpoint
from nanochat.models import build_model
from nanochat.common import (UserError, add_common_flags, autocast_ctx, compute_cleanup, compute_init, get_base_dir,
                             print0)
from nanochat.core_eval import core_summary, evaluate_core, write_core_csv
from nanochat.dataloader import PretrainLoader
from nanochat.engine import greedy_samples
from nanochat.loss_eval import evaluate_bpb
from nanochat.quant import add_weights_flag, describe_weights, weights_choice
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes

EVALS = ("core", "bpb", "sample")


def eval_bpb_splits(model, tokenizer, device, split_tokens, batch_size, world_size):
    T = model.config.sequence_len
    tokens_per_step = batch_size * T * world_size
    steps = max(1, split_tokens // tokens_per_step)
    token_bytes = get_token_bytes(device)
    out = {}
    for split in ("train", "val"):
        loader = PretrainLoader(tokenizer, batch_size, T, split=split, device=device, loop=False)
        t0 = time.time()
        try:
            with autocast_ctx(device):
                out[split] = evaluate_bpb(model, loader, steps, token_bytes)
        finally:
            loader.close()
        print0(f"{split} bpb: {out[split]:.4f}  ({steps} steps x {tokens_per_step:,} tokens, {time.time() - t0:.1f}s)")
    return out


def core_table(results) -> str:
    lines = ["| task | type | items | accuracy | centered | baseline |", "|---|---|---|---|---|---|"]
    for r in results["tasks"]:
        lines.append(f"| {r['task']} | {r['type']} | {r['num_items']} | {r['accuracy']:.4f} | "
                     f"{r['centered']:.4f} | {r['baseline']:.3f} |")
    for m in results["missing"]:
        lines.append(f"| {m} | missing | 0 | - | - | - |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nanochat eval base",
                                     description="Bits per byte, greedy samples and CORE of a model checkpoint.")
    parser.add_argument("-i", "--source", default="base", choices=["base", "mid", "sft", "rl"],
                        help="which checkpoints to load (default: base)")
    parser.add_argument("--eval", default="core,bpb,sample", help="comma-separated subset of core,bpb,sample")
    parser.add_argument("--max-per-task", type=int, default=-1,
                        help="CORE: at most N items per task (a fixed random subset; -1 = all)")
    parser.add_argument("--core-config", default=None,
                        help="CORE config (core.yaml of a bundle); default $NANOCHAT_DATA/eval_bundle/core.yaml")
    parser.add_argument("--split-tokens", type=int, default=20 * 524288, help="bpb: tokens per split")
    parser.add_argument("--device-batch-size", type=int, default=32, help="bpb: rows per forward")
    parser.add_argument("--core-batch-tokens", type=int, default=16384,
                        help="CORE: padded tokens per forward (rows x longest row)")
    add_weights_flag(parser)
    add_common_flags(parser)
    args = parser.parse_args(argv)
    evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    bad = [e for e in evals if e not in EVALS]
    if bad or not evals:
        raise UserError(f"--eval takes a comma-separated subset of {','.join(EVALS)}, not '{args.eval}'")
    if args.core_config and not os.path.isfile(args.core_config):
        raise UserError(f"--core-config {args.core_config}: no such file")
    if args.split_tokens <= 0 or args.device_batch_size <= 0:
        raise UserError("--split-tokens and --device-batch-size must be positive")

    is_dist, rank, local_rank, world_size, device = compute_init(args.device_type)
    ckpt_dir, model_tag, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    model, tokenizer, meta = build_model(ckpt_dir, step, device, phase="eval",
                                         weights=weights_choice(args.weights, device.type)[0])
    print0(f"Evaluating {args.source}/{model_tag} step {step} on {device} ({', '.join(evals)}), "
           f"{describe_weights(args.weights, device.type)}")

    record = {"source": args.source, "model_tag": model_tag, "step": step}
    extra = []
    if "bpb" in evals:
        bpb = eval_bpb_splits(model, tokenizer, device, args.split_tokens, args.device_batch_size, world_size)
        record["train bpb"], record["val bpb"] = bpb["train"], bpb["val"]
    if "sample" in evals:
        with autocast_ctx(device):
            samples = greedy_samples(model, tokenizer) if rank == 0 else []
        print0("Samples (greedy):")
        for s in samples:
            print0(f"  {s!r}")
        extra.append("Samples (greedy):\n\n" + "\n".join(f"    {s!r}" for s in samples))
    if "core" in evals:
        t0 = time.time()
        with autocast_ctx(device):
            results = evaluate_core(model, tokenizer, device, config_path=args.core_config,
                                    max_per_task=args.max_per_task, batch_tokens=args.core_batch_tokens, verbose=True)
        print0(core_summary(results) + f"  ({time.time() - t0:.1f}s)")
        record["CORE"] = results["core"]
        record["CORE tasks"] = f"{results['num_available']}/{results['num_tasks']}"
        if results["missing"]:
            record["CORE missing"] = ", ".join(results["missing"])
        extra.append(core_table(results))
        if rank == 0:
            path = os.path.join(get_base_dir(), "eval", f"core_{args.source}_{model_tag}_step{step:06d}.csv")
            write_core_csv(results, path)
            print0(f"CORE results written to {path}")
            record["CORE csv"] = path

    if rank == 0:
        get_report().log("Base model evaluation", [record] + extra)
    compute_cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
