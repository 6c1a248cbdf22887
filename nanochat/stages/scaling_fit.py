"""`nanochat scaling fit`: scaling laws from an isoFLOP grid's CSV (ours or upstream's).

    nanochat scaling fit                                   # $NANOCHAT_BASE_DIR/scaling/grid/results.csv
    nanochat scaling fit --csv results.csv --params total --target-flops 1e20 --json

Prints approach 2 per budget (optimum N, D, bpb; AT EDGE when the grid misses it), the power laws
N_opt ~ C^a and D_opt ~ C^b with 95% bootstrap intervals, approach 3 (L = E + A/N^alpha + B/D^beta,
Huber on log loss) and the tokens:params ratio; with --target-flops a recommendation; with --json
one JSON object as the last line. Draws isoflop.png and optima.png beside the CSV. docs/scaling.md
"""
import argparse
import os

from nanochat.common import UserError, get_base_dir
from nanochat.scaling import PARAM_CONVENTIONS
from nanochat.scaling_report import analyze


def main(argv=None):
    p = argparse.ArgumentParser(prog="nanochat scaling fit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", default=None, help="the grid's CSV (default: $NANOCHAT_BASE_DIR/scaling/grid/results.csv)")
    p.add_argument("--params", choices=tuple(PARAM_CONVENTIONS), default="scaling",
                   help="which parameters N counts: scaling (transformer matrices + lm_head, default), total, transformer")
    p.add_argument("--target-flops", type=float, default=None, help="recommend N, depth, tokens and bpb for this budget")
    p.add_argument("--json", action="store_true", help="print the whole fit as one JSON object, last")
    p.add_argument("--out", default=None, help="folder for the pictures and fit.json (default: beside the CSV)")
    args = p.parse_args(argv)
    if args.target_flops is not None and not args.target_flops > 0:
        raise UserError(f"--target-flops must be > 0, not {args.target_flops}")
    csv_path = args.csv or os.path.join(get_base_dir(), "scaling", "grid", "results.csv")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    analyze(csv_path, args.out, args.params, args.target_flops, args.json, quiet_errors=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
