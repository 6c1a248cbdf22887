"""The training recipe at tiny scale: val bpb at equal tokens for the old recipe, the new one,
the new one minus each of its main changes, and the reference (karpathy/nanochat) itself, at d4
and d6 on the CPU. Prints and writes JSON (docs/training.md, "Ablation at tiny scale"). Not part
of CI: it needs a checkout of the old recipe, and of the reference with its own environment.

    git worktree add --detach /path/old ccb2337        # the old recipe
    python -m bench.ablation --old /path/old --upstream /path/up --upstream-python /path/up-venv/bin/python \
        --work /tmp/abl --out bench/results/ablation.json

Every run is a fresh `train base` (the reference: `scripts.base_train`) in a subprocess with its
own NANOCHAT_BASE_DIR, one torch thread (OMP_NUM_THREADS=1), the same fixed shape: aspect 64,
heads of 64, context --seq-len, full attention (window L), --batch-tokens per optimizer step
(one micro-batch), --steps steps (so equal tokens for every run), no CORE and no samples, and the
final val bpb over --eval-tokens of the last shard. Each codebase trains its tokenizer once (the
same vocab and settings for both; the old checkout shares ours: the tokenizer did not change)
and every run of it uses that one.

--seed changes only the weights' init (`train base --seed`; the reference has no such flag, so
its child entry point below maps its fixed torch.manual_seed(42) to the seed); the data order is
the same for every run (the loaders read the shards in order, nothing is shuffled).

The "new minus X" variants undo one change of the new recipe each, with train base's own flags
where they exist; the architecture switches (smear, backout) have no flag, so they go through a
child entry point of this script that trains a GPT subclass skipping them (bench code only).
Results are appended after every run (--out is rewritten each time) and a run already in --out
(same name and seed) is skipped, so the script can be stopped and started again.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

from bench.vs_reference import run as run_logged
from bench.common import machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Child entry points. "ours_no_smear_backout": train base with a GPT whose smear and backout
# are skipped. "upstream_seeded": the reference's base_train with its global seed replaced.
CHILD_NO_SMEAR_BACKOUT = r'''
import sys
import nanochat.stages.train_base as tb


class NoSmearBackout(tb.GPT):
    """The model with the smear and the backout skipped (their parameters exist, unused)."""

    def _smear(self, x, prev):
        return x

    def backout_layer(self):
        return None


print("ablation child: smear and backout off", flush=True)
tb.GPT = NoSmearBackout
sys.exit(tb.main(sys.argv[1:]))
'''

CHILD_UPSTREAM_SEEDED = r'''
import runpy, sys, torch
seed = int(sys.argv.pop(1))
_manual_seed = torch.manual_seed
torch.manual_seed = lambda s: _manual_seed(seed if s == 42 else s)
if torch.cuda.is_available():
    _cuda_seed = torch.cuda.manual_seed
    torch.cuda.manual_seed = lambda s: _cuda_seed(seed if s == 42 else s)
sys.argv[0] = "scripts/base_train.py"
runpy.run_module("scripts.base_train", run_name="__main__", alter_sys=True)
'''

B_REF = 2 ** 19  # the reference batch of the new recipe's LR rule (sqrt(B / B_REF))

# name -> (codebase, extra train-base flags, child). Codebases: "old" (--old checkout), "new"
# (--new, default this tree), "upstream". docs/training.md says what each variant undoes.
def variants(batch_tokens, old_weight_decay=None):
    """old_weight_decay: the --weight-decay that makes the new rule start at the old rule's value."""
    undo = (B_REF / batch_tokens) ** 0.5  # the base LRs divided by the rule's sqrt(B / 2^19) up front
    unscaled = ["--embedding-lr", f"{0.3 * undo:.6g}", "--unembedding-lr", f"{0.008 * undo:.6g}",
                "--matrix-lr", f"{0.02 * undo:.6g}", "--scalar-lr", f"{0.5 * undo:.6g}"]
    old_schedule = ["--warmup-steps", "0", "--warmdown-ratio", "0.4", "--final-lr-frac", "0.0"]
    old_lrs = ["--embedding-lr", "0.2", "--unembedding-lr", "0.004"]
    table = {
        "old": ("old", [], None),
        "new": ("new", [], None),
        "upstream": ("upstream", [], None),
        "new-schedule": ("new", old_schedule, None),  # the old schedule: no warmup, warmdown 0.4, to 0
        "new-lrs": ("new", old_lrs, None),  # the old embedding / unembedding LRs (0.2 / 0.004, still x the rule)
        "new-wd0": ("new", ["--weight-decay", "0"], None),  # no Muon weight decay
        "new-lrscale": ("new", unscaled, None),  # LRs not scaled by sqrt(B / 2^19)
        "new-smear-backout": ("new", [], CHILD_NO_SMEAR_BACKOUT),
        "new+muoneq": ("new", ["--muon-eq-plus"], None),  # MuonEq + Muon+ on, as upstream HEAD always has them
        # the same leave-one-outs around "new-lrscale" (the new recipe with unscaled LRs), where
        # training does not first sit on the plateau that the 16x smaller LRs give at 2^11 tokens/step
        "unscaled-schedule": ("new", unscaled + old_schedule, None),
        "unscaled-smear-backout": ("new", unscaled, CHILD_NO_SMEAR_BACKOUT),
        "unscaled+muoneq": ("new", unscaled + ["--muon-eq-plus"], None),
        # the same changes undone in the reference itself, with its own flags
        "upstream-schedule": ("upstream", old_schedule, None),
        "upstream-lrs": ("upstream", old_lrs, None),
        "upstream-wd0": ("upstream", ["--weight-decay", "0"], None),
        "upstream-lrscale": ("upstream", unscaled, None),
    }
    if old_weight_decay is not None:  # the new rule's shape (cosine to 0) from the old rule's level
        table["new-wdold"] = ("new", ["--weight-decay", f"{old_weight_decay:.6g}"], None)
        table["unscaled-wdold"] = ("new", unscaled + ["--weight-decay", f"{old_weight_decay:.6g}"], None)
    return table


def git_commit(path):
    r = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("+dirty" if dirty else "")


def run(cmd, cwd, env, log_path):
    """Run to completion: (wall seconds, CPU seconds (user + system) of the process, log text)."""
    usage, seconds, text = run_logged(cmd, cwd, env, log_path)
    return seconds, usage.ru_utime + usage.ru_stime, text


def final_bpb(text, codebase):
    if codebase == "upstream":
        found = re.findall(r"Validation bpb: ([\d.]+)", text)
    else:  # the summary line carries the full float
        found = re.findall(r"final val bpb ([\d.]+)", text)
    return float(found[-1]) if found else None


def compute_dtype(text, codebase):
    if codebase == "upstream":
        found = re.search(r"COMPUTE_DTYPE[^\n]*?(bfloat16|float16|float32)", text)
        return found.group(1) if found else "float32 (its CPU default)"
    found = re.search(r"^compute dtype: (\w+)", text, re.M)
    return found.group(1) if found else None


DESCRIPTIONS = {
    "old": "old recipe (ccb2337)",
    "new": "new recipe",
    "upstream": "upstream itself (92d63d4)",
    "new-lrscale": "new, LRs not scaled by sqrt(B/2^19)",
    "new-schedule": "new, old schedule (no warmup, warmdown 0.4 to 0)",
    "new-wdold": "new, Muon WD at the old level (cosine kept)",
    "new-wd0": "new, no Muon WD",
    "new-smear-backout": "new, smear + backout off",
    "new+muoneq": "new + MuonEq/Muon+ (`--muon-eq-plus`)",
    "new-lrs": "new, old embedding/unembedding LRs (0.2/0.004)",
    "unscaled-schedule": "new unscaled, old schedule",
    "unscaled-wdold": "new unscaled, Muon WD at the old level",
    "unscaled-smear-backout": "new unscaled, smear + backout off",
    "unscaled+muoneq": "new unscaled + MuonEq/Muon+",
    "upstream-lrscale": "upstream, LRs not scaled by sqrt(B/2^19)",
    "upstream-schedule": "upstream, old schedule",
    "upstream-lrs": "upstream, old embedding/unembedding LRs",
    "upstream-wd0": "upstream, no Muon WD",
}


def markdown_table(results):
    """The docs table: per depth and variant, the bpb of each seed, the mean, and the mean delta
    against the new recipe's runs of the same seeds at that depth (for the "unscaled" variants:
    against new-lrscale; for the reference's own variants: against the reference)."""
    runs = results["runs"]
    seeds = sorted({r["seed"] for r in runs})
    tokens = results["config"]["tokens"]
    lines = ["| config | tokens | " + " | ".join(f"seed {s}" for s in seeds) + " | mean val bpb | Δ vs new |",
             "|---|---|" + "---|" * len(seeds) + "---|---|"]
    for depth in sorted({r["depth"] for r in runs}):
        by_name = {}
        for r in runs:
            if r["depth"] == depth and r["val_bpb"] is not None:
                by_name.setdefault(r["name"], {})[r["seed"]] = r["val_bpb"]
        means = {n: sum(v.values()) / len(v) for n, v in by_name.items()}
        order = sorted(by_name, key=lambda n: (list(DESCRIPTIONS).index(n) if n in DESCRIPTIONS else 99, n))
        for n in order:
            cells = [f"{by_name[n][s]:.4f}" if s in by_name[n] else "–" for s in seeds]
            k = len(by_name[n])
            partial = "" if k == len(seeds) else f" ({k} seed{'s' if k > 1 else ''})"
            # paired: against the same seeds of the new recipe (the variants of "new unscaled" and
            # of the reference: against those)
            base = "new-lrscale" if n.startswith("unscaled") else "upstream" if n.startswith("upstream-") else "new"
            paired = [s for s in by_name[n] if s in by_name.get(base, {})]
            delta = ""
            if paired and n != "new":
                delta = f"{sum(by_name[n][s] - by_name[base][s] for s in paired) / len(paired):+.4f}"
                if base != "new":
                    delta += f" (vs {'upstream' if base == 'upstream' else 'new unscaled'})"
            lines.append(f"| d{depth} {DESCRIPTIONS.get(n, n)} | {tokens:,} | " + " | ".join(cells)
                         + f" | {means[n]:.4f}{partial} | {delta} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", default=None, help="a checkout of the old recipe (ccb2337)")
    p.add_argument("--new", default=REPO, help="a checkout of the new recipe (default: this tree)")
    p.add_argument("--upstream", default=None, help="a checkout of karpathy/nanochat")
    p.add_argument("--upstream-python", default=None, help="the Python of the reference's own environment")
    p.add_argument("--data", default=os.environ.get("NANOCHAT_DATA"), help="data root with pretrain/*.parquet")
    p.add_argument("--work", default=None, help="folder for the tokenizers, base dirs and logs")
    p.add_argument("--out", required=True, help="results JSON, rewritten after every run")
    p.add_argument("--runs", default="old,new,upstream",
                   help="comma-separated variant names (see variants()), each at every --depths and --seeds")
    p.add_argument("--depths", default="4")
    p.add_argument("--seeds", default="42,43")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--tokenizer-chars", type=int, default=20_000_000)
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = p.parse_args(argv)
    if args.table:
        with open(args.out) as f:
            print(markdown_table(json.load(f)))
        return
    if not args.work:
        raise SystemExit("--work is required")
    if not args.data or not glob.glob(os.path.join(args.data, "pretrain", "*.parquet")):
        raise SystemExit("--data (or NANOCHAT_DATA) must hold pretrain/*.parquet")
    table = variants(args.batch_tokens, old_weight_decay=0.0)  # the names; the flags per depth below
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {sorted(table)}")
    codebases = {table[n][0] for n in names}
    if "old" in codebases and not args.old:
        raise SystemExit("the old recipe needs --old")
    if "upstream" in codebases and not (args.upstream and args.upstream_python):
        raise SystemExit("the reference needs --upstream and --upstream-python")
    if args.batch_tokens % args.seq_len:
        raise SystemExit("--batch-tokens must be a multiple of --seq-len")

    work = os.path.abspath(args.work)
    data = os.path.abspath(args.data)
    shards = sorted(glob.glob(os.path.join(data, "pretrain", "*.parquet")))
    root = {"old": os.path.abspath(args.old) if args.old else None, "new": os.path.abspath(args.new),
            "upstream": os.path.abspath(args.upstream) if args.upstream else None}
    python = {"old": sys.executable, "new": sys.executable, "upstream": args.upstream_python}
    common = {k: v for k, v in os.environ.items() if not k.startswith(("NANOCHAT_", "PYTHONPATH"))}
    common.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

    def env_for(codebase, base_dir):
        env = dict(common, NANOCHAT_BASE_DIR=base_dir, PYTHONPATH=root[codebase])
        if codebase != "upstream":
            env["NANOCHAT_DATA"] = data
        return env

    def prepare_base(codebase, base_dir):
        os.makedirs(base_dir, exist_ok=True)
        if codebase == "upstream":  # the reference reads its shards from here; the same files, last = val
            up_data = os.path.join(base_dir, "base_data_climbmix")
            os.makedirs(up_data, exist_ok=True)
            for s in shards:
                link = os.path.join(up_data, os.path.basename(s))
                if not os.path.exists(link):
                    os.symlink(s, link)

    # one tokenizer per codebase family: ours (used by old and new), the reference's
    tok_dirs = {}
    for family in sorted({"upstream" if c == "upstream" else "ours" for c in codebases}):
        codebase = "upstream" if family == "upstream" else "new"
        base_dir = os.path.join(work, f"tok_{family}")
        prepare_base(codebase, base_dir)
        tok_dirs[family] = os.path.join(base_dir, "tokenizer")
        if not os.path.exists(os.path.join(tok_dirs[family], "token_bytes.pt")):
            cmd = ([python[codebase], "-m", "scripts.tok_train"] if family == "upstream" else
                   [python[codebase], "-m", "nanochat", "tokenizer", "train"])
            cmd += ["--vocab-size", str(args.vocab_size), "--max-chars", str(args.tokenizer_chars)]
            if args.dry_run:
                print(" ".join(cmd))
            else:
                seconds, _, _ = run(cmd, root[codebase], env_for(codebase, base_dir),
                                 os.path.join(work, f"tokenizer_{family}.log"))
                print(f"tokenizer {family}: {seconds:.0f}s", flush=True)

    results = {"runs": []}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    done = {(r["name"], r["depth"], r["seed"]) for r in results["runs"]}
    results["config"] = {"steps": args.steps, "batch_tokens": args.batch_tokens, "tokens": args.steps * args.batch_tokens,
                         "seq_len": args.seq_len, "aspect_ratio": 64, "head_dim": 64, "window_pattern": "L",
                         "eval_tokens": args.eval_tokens, "vocab_size": args.vocab_size,
                         "tokenizer_chars": args.tokenizer_chars, "threads": 1}
    results["machine"] = machine()
    results["cpu_count"] = os.cpu_count()

    def shape_flags(depth):
        return ["--device-type", "cpu", "--depth", str(depth), "--aspect-ratio", "64", "--head-dim", "64",
                "--max-seq-len", str(args.seq_len), "--window-pattern", "L",
                "--device-batch-size", str(args.batch_tokens // args.seq_len),
                "--total-batch-size", str(args.batch_tokens), "--num-iterations", str(args.steps),
                "--eval-tokens", str(args.eval_tokens), "--core-metric-every", "-1", "--sample-every", "-1",
                "--model-tag", "abl"]

    def old_rule_weight_decay(depth):
        """The --weight-decay for which the new rule (x sqrt(B/2^19) x D_ref/D) starts at the old
        rule's value, 0.2 x (12/depth)^2 capped at 1.0: the new rule's factor from its own dry run."""
        base_dir = os.path.join(work, "dry_run")
        prepare_base("new", base_dir)
        if not os.path.exists(os.path.join(base_dir, "tokenizer")):
            os.symlink(tok_dirs["ours"], os.path.join(base_dir, "tokenizer"))
        cmd = [python["new"], "-m", "nanochat", "train", "base"] + shape_flags(depth) + ["--weight-decay", "1", "--dry-run"]
        _, _, text = run(cmd, root["new"], env_for("new", base_dir), os.path.join(work, f"dry_run_d{depth}.log"))
        factor = float(re.search(r"Muon weight decay ([0-9.eE+-]+)", text).group(1))
        return min(1.0, 0.2 * (12 / depth) ** 2) / factor

    for depth in [int(d) for d in args.depths.split(",")]:
        if {"new-wdold", "unscaled-wdold"} & set(names) and not args.dry_run:
            table = variants(args.batch_tokens, old_weight_decay=old_rule_weight_decay(depth))
        for seed in [int(s) for s in args.seeds.split(",")]:
            for name in names:
                if (name, depth, seed) in done:
                    continue
                codebase, extra, child = table[name]
                tag = f"{name}_d{depth}_s{seed}"
                base_dir = os.path.join(work, "runs", tag)
                prepare_base(codebase, base_dir)
                tok_link = os.path.join(base_dir, "tokenizer")
                if not os.path.exists(tok_link):
                    os.symlink(tok_dirs["upstream" if codebase == "upstream" else "ours"], tok_link)
                shape = shape_flags(depth)
                if codebase == "upstream":  # its -1 turns evaluation off; this evaluates at 0 and at the end
                    cmd = [python[codebase], "-c", CHILD_UPSTREAM_SEEDED, str(seed)] + shape + \
                          ["--eval-every", str(args.steps)]
                else:
                    entry = ["-c", child] if child else ["-m", "nanochat", "train", "base"]
                    cmd = [python[codebase]] + entry + shape + ["--eval-every", "-1", "--seed", str(seed)]
                cmd += extra
                if args.dry_run:
                    print(tag, " ".join(c if not c.startswith("\n") else "<child>" for c in cmd))
                    continue
                load_before = os.getloadavg()[0]
                seconds, cpu_seconds, text = run(cmd, root[codebase], env_for(codebase, base_dir),
                                    os.path.join(work, f"train_{tag}.log"))
                for sub in ("checkpoints", "base_checkpoints"):  # ours, the reference's: only the log is kept
                    for ckpt in glob.glob(os.path.join(base_dir, sub, "**", "*.pt"), recursive=True):
                        os.remove(ckpt)
                record = {"name": name, "codebase": codebase, "commit": git_commit(root[codebase]), "depth": depth,
                          "seed": seed, "flags": extra, "child": child is not None,
                          "val_bpb": final_bpb(text, codebase), "dtype": compute_dtype(text, codebase), "wall_s": round(seconds, 1),
                          "cpu_s": round(cpu_seconds, 1),
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                          "load_1min_before": round(load_before, 2), "load_1min_after": round(os.getloadavg()[0], 2)}
                results["runs"].append(record)
                tmp = args.out + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(results, f, indent=1)
                os.replace(tmp, args.out)  # on disk before anything else can fail
                print(json.dumps(record), flush=True)
    if not args.dry_run:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
