"""`nanochat scaling series`: the miniseries, a ladder of depths each trained at the same
tokens:params ratio (CORE at the end), and its CSV and pictures.

    nanochat scaling series                                # depths 10-20 at ratio 12 (GPUs)
    nanochat scaling series --nproc-per-node 8 --depths 12,16,20,24
    nanochat scaling series --preset cpu                   # depths 1-3 of tiny models on a CPU
    nanochat scaling series --ratio 8 -- --fp8             # flags after -- go to train base

One row per run in OUT/results.csv (upstream's miniseries columns first); run the same command
again to continue a killed series. docs/scaling.md
"""
import argparse
import os

from nanochat import scaling, sweep
from nanochat.common import UserError, get_base_dir
from nanochat.scaling_report import log_section, plot_losses, plot_series

UPSTREAM_DEPTHS = "10,12,14,16,18,20"
CPU_PRESET = dict(depths="1,2,3", vocab_size=1024, eval_tokens=16384, core=False,
                  train=["--device-type", "cpu", "--aspect-ratio", "16", "--head-dim", "16", "--max-seq-len", "128",
                         "--window-pattern", "L", "--device-batch-size", "32", "--total-batch-size", "4096",
                         "--lr-batch-scaling", "none", "--weight-decay", "0", "--warmup-steps", "5",
                         "--sample-every", "-1", "--log-every", "10", "--no-compile"])


def series_row(run, meta, records):
    derived = meta["derived"]
    return dict(model_dim=meta["model_config"]["n_embd"], num_params=derived["num_params"],
                num_scaling_params=derived["scaling_params"], num_iterations=derived["num_iterations"],
                tokens_trained=derived["total_tokens"],
                param_data_ratio=round(derived["total_tokens"] / derived["scaling_params"], 3),
                val_bpb=sweep.last_value(records, "val_bpb"), core_score=sweep.last_value(records, "core"),
                train_time_sec=round(max([r.get("total_time") or 0 for r in records] or [0]), 1),
                flops=derived["total_flops"])


def main(argv=None):
    own, extra = sweep.split_argv(argv)
    p = argparse.ArgumentParser(prog="nanochat scaling series", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default=None, help=f"model depths (default {UPSTREAM_DEPTHS})")
    p.add_argument("--ratio", type=float, default=12, help="training tokens per scaling parameter (default 12, train base's)")
    p.add_argument("--preset", choices=("cpu",), default=None, help="cpu: depths 1-3 of tiny models on a CPU")
    sweep.add_sweep_flags(p, "series")
    args = p.parse_args(own)
    if not args.ratio > 0:
        raise UserError(f"--ratio must be > 0, not {args.ratio}")
    preset = CPU_PRESET if args.preset == "cpu" else {}
    depths = sweep.number_list(args.depths or preset.get("depths", UPSTREAM_DEPTHS), int, "--depths")
    args.vocab_size = args.vocab_size or preset.get("vocab_size")
    eval_tokens = args.eval_tokens or preset.get("eval_tokens", sweep.UPSTREAM_EVAL_TOKENS)
    core = not args.no_core and preset.get("core", True)
    if not args.out and preset:
        args.out = os.path.join(get_base_dir(), "scaling", "series-cpu")
    started = sweep.open_sweep(args, "series")
    if started is None:
        return 0
    out, nproc, lock = started
    runs = []
    for d in depths:
        flags = preset.get("train", []) + ["--depth", str(d), "--target-param-data-ratio", repr(args.ratio),
                                           "--eval-every", "-1", "--eval-tokens", str(eval_tokens),
                                           "--core-metric-every", "999999999" if core else "-1"] + extra
        plan = sweep.dry_run(flags + ["--model-tag", "plan"], out)  # the FLOPs of each run, for the plan and the ETA
        runs.append(dict(name=f"d{d}", flags=flags, flops=plan["total_flops"], label=f"(d{d})", row=dict(depth=d)))
    sweep.print_plan("nanochat scaling series", runs, args.assumed_mfu)
    if args.dry_run:
        return 0
    csv_path = os.path.join(out, "results.csv")
    rows = sweep.sweep(runs, out, csv_path, scaling.SERIES_COLUMNS, series_row, nproc, args.keep_checkpoints,
                       args.retry_failed, prog="nanochat scaling series")
    lock.release()
    rows = scaling.read_csv(csv_path, scaling.SERIES_COLUMNS)
    pictures = plot_series(rows, out) + plot_losses(rows, out, key="")
    lines = [f"d{r['depth']}: {int(float(r['num_params'])):,} params, {int(float(r['tokens_trained'])):,} tokens, "
             f"val bpb {float(r['val_bpb']):.4f}, CORE {r['core_score'] or '-'}" for r in rows if scaling.is_ok(r)]
    print("\n".join(lines))
    print("pictures: " + ", ".join(path for _, path in pictures))
    log_section("Miniseries", dict(csv=csv_path, runs=len(lines)), lines, pictures)
    return 0 if any(scaling.is_ok(r) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
