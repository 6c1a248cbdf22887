"""`nanochat scaling run`: an isoFLOP grid of real `train base` runs, then its fit and pictures.

    nanochat scaling run                                   # upstream's grid: 4 budgets x 6 depths (GPUs)
    nanochat scaling run --nproc-per-node 8                # each run under torchrun on 8 GPUs
    nanochat scaling run --preset cpu                      # ~10 minutes on 2 CPU cores, optima inside the grid
    nanochat scaling run --budgets 1e18,3e18 --depths 8,10,12 -- --device-batch-size 16   # flags after -- go to train base

Every run trains --target-flops of its budget at its depth (the ratio off), evaluates val bpb on
--eval-tokens at the end (and CORE, unless --no-core), and adds one row to OUT/results.csv
(upstream's columns first). Run the same command again to continue a killed sweep. docs/scaling.md
"""
import argparse
import os

from nanochat import scaling, sweep
from nanochat.common import get_base_dir
from nanochat.scaling_report import analyze

UPSTREAM_BUDGETS = "1e18,2.15e18,4.64e18,1e19"
UPSTREAM_DEPTHS = "10,12,14,16,18,20"
sweep.UPSTREAM_EVAL_TOKENS = 100 * 2 ** 19
# tiny models on 2 CPU cores: a private 1,024-token tokenizer (with a large vocabulary the output
# head is most of every model), width 16 per layer, fixed 4,096-token batches without the lr
# rule, no weight decay (its rule scales with the d12 horizon: huge at these sizes)
CPU_PRESET = dict(
    budgets="4e11,5.6e11,8e11", depths="1,2,3,4", vocab_size=1024, eval_tokens=16384, core=False,
    train=["--device-type", "cpu", "--aspect-ratio", "16", "--head-dim", "16", "--max-seq-len", "128",
           "--window-pattern", "L", "--device-batch-size", "32", "--total-batch-size", "4096",
           "--lr-batch-scaling", "none", "--weight-decay", "0", "--warmup-steps", "5", "--sample-every", "-1",
           "--log-every", "10", "--no-compile"],
)


def main(argv=None):
    own, extra = sweep.split_argv(argv)
    p = argparse.ArgumentParser(prog="nanochat scaling run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default=None, help=f"training FLOPs budgets (default {UPSTREAM_BUDGETS})")
    p.add_argument("--depths", default=None, help=f"model depths at every budget (default {UPSTREAM_DEPTHS})")
    p.add_argument("--preset", choices=("cpu",), default=None,
                   help="cpu: 3 budgets x depths 1-4 of tiny models, ~10 minutes on 2 idle cores (docs/scaling.md)")
    p.add_argument("--params", choices=tuple(scaling.PARAM_CONVENTIONS), default="scaling",
                   help="which parameters N counts in the fit (default scaling: transformer matrices + lm_head)")
    sweep.add_sweep_flags(p, "grid")
    args = p.parse_args(own)
    preset = CPU_PRESET if args.preset == "cpu" else {}
    budgets_text = args.budgets or preset.get("budgets", UPSTREAM_BUDGETS)
    budgets = sweep.number_list(budgets_text, float, "--budgets")
    depths = sweep.number_list(args.depths or preset.get("depths", UPSTREAM_DEPTHS), int, "--depths")
    args.vocab_size = args.vocab_size or preset.get("vocab_size")
    eval_tokens = args.eval_tokens or preset.get("eval_tokens", sweep.UPSTREAM_EVAL_TOKENS)
    core = not args.no_core and preset.get("core", True)
    if not args.out and preset:
        args.out = os.path.join(get_base_dir(), "scaling", "grid-cpu")
    labels = {b: t.strip() for b, t in zip(budgets, [t for t in budgets_text.split(",") if t.strip()])}
    runs = []
    for b in budgets:
        for d in depths:
            flags = preset.get("train", []) + ["--depth", str(d), "--target-flops", repr(b), "--eval-every", "-1",
                                               "--eval-tokens", str(eval_tokens),
                                               "--core-metric-every", "999999999" if core else "-1"] + extra
            runs.append(dict(name=f"C{labels[b]}-d{d}", flags=flags, flops=b, label=f"(C {labels[b]}, d{d})",
                             row=dict(flops_budget=labels[b], depth=d)))
    started = sweep.open_sweep(args, "grid")
    if started is None:  # a torchrun rank other than 0
        return 0
    out, nproc, lock = started
    sweep.print_plan("nanochat scaling run", runs, args.assumed_mfu)
    if args.dry_run:
        return 0
    csv_path = os.path.join(out, "results.csv")
    rows = sweep.sweep(runs, out, csv_path, scaling.GRID_COLUMNS, grid_row, nproc, args.keep_checkpoints,
                       args.retry_failed, prog="nanochat scaling run")
    lock.release()
    analyze(csv_path, out, args.params)
    return 0 if any(r.get("status") == "ok" for r in rows) else 1


def grid_row(run, meta, records):
    derived, counts = meta["derived"], sweep.param_counts(meta["model_config"])
    return dict(model_dim=meta["model_config"]["n_embd"], params_wte=counts["wte"],
                params_value_embeds=counts["value_embeds"], params_lm_head=counts["lm_head"],
                params_transformer=counts["transformer_matrices"], params_scalars=counts["scalars"],
                params_total=counts["total"], num_iterations=derived["num_iterations"],
                tokens_trained=derived["total_tokens"], val_bpb=sweep.last_value(records, "val_bpb"),
                core_score=sweep.last_value(records, "core"),
                train_time_sec=round(max([r.get("total_time") or 0 for r in records] or [0]), 1),
                flops=derived["total_flops"])


if __name__ == "__main__":
    raise SystemExit(main())
