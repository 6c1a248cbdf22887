"""nanochat against the reference (karpathy/nanochat) on this machine, in one run: the same
shards, the same tokenizer settings, the same model and batch, trained back to back, then
decoding from each trained checkpoint. Prints JSON (docs/benchmarks.md, "Against the reference").
Not part of CI: it needs a checkout of the reference with an environment of its own.

    git clone https://github.com/karpathy/nanochat /path/up && python3 -m venv /path/up-venv
    /path/up-venv/bin/pip install torch==2.13.0 && /path/up-venv/bin/pip install -e /path/up
    python -m bench.vs_reference --upstream /path/up --upstream-python /path/up-venv/bin/python

The config (the d4 of the issue that asked for this; --depth D for another): depth 4, width 256, heads of 64, context
512, 8 x 512 = 4,096-token steps, full attention, vocab 32,768, --steps optimizer steps, then the
validation bpb over --eval-tokens. Measured for each codebase and each of --repeats runs
(interleaved: ours, the reference, ours, ...): the median step time of steps 10..end (the
first steps include warm-up), the peak RSS of the training process, the final val bpb, and
decode tok/s of its Engine at batch 1 and 8 (`generate_batch`, sampling at temperature 1, top-k
50, --new-tokens per row; best of 3 within a process, best of --decode-rounds processes run
interleaved with the other codebase's). Then, with --step-rounds N, the model's decode step
alone (one token for 1 and for 8 rows, 40 tokens in the cache, the same inputs every call): a
persistent process per codebase, taking turns in a random order each round, each turn the
median of 20 steps; reported per round, as the median of the rounds, and as the median of the
per-round ratios (the paired comparison a noisy machine allows). --repeats 0 skips training and
measures the checkpoints already in --work. Both use --threads torch threads. `--dtype` sets NANOCHAT_DTYPE for
ours (default: its own choice for this CPU); the reference runs in its default (fp32 on CPU)
unless --upstream-dtype says otherwise. Our decode loads the weights as `nanochat chat` does
(--weights, default: chat's default for this CPU; "weights" in the JSON says which).
"""
import argparse
import glob
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

from bench.common import machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DECODE = r'''
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
ours = sys.argv[2] == "ours"
if ours:
    from nanochat.models import load_model
    from nanochat.quant import weights_choice
    weights = weights_choice(sys.argv[4] if sys.argv[4] != "default" else None, "cpu")[0]  # as chat resolves --weights
    model, tokenizer, _ = load_model("base", "cpu", model_tag="vsref", weights=weights)
else:
    from nanochat.checkpoint_manager import load_model
    model, tokenizer, _ = load_model("base", torch.device("cpu"), "eval", model_tag="vsref")
from nanochat.engine import Engine
engine = Engine(model, tokenizer)
prompt = tokenizer.encode("The history of the city begins", prepend=tokenizer.get_bos_token_id())
out = {}
for batch in (1, 8):
    best = None
    for rep in range(3):
        t0 = time.perf_counter()
        results, _ = engine.generate_batch(prompt, num_samples=batch, max_tokens=int(sys.argv[3]),
                                           temperature=1.0, top_k=50, seed=rep)
        dt = time.perf_counter() - t0
        tokens = sum(len(r) - len(prompt) for r in results)
        rate = tokens / dt
        best = rate if best is None else max(best, rate)
    out[f"decode_b{batch}_tok_per_sec"] = round(best, 1)
print(json.dumps(out))
'''


STEP = r'''
import json, statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
torch.set_grad_enabled(False)
ours = sys.argv[2] == "ours"
if ours:
    from nanochat.models import load_model
    from nanochat.quant import weights_choice
    weights = weights_choice(sys.argv[3] if sys.argv[3] != "default" else None, "cpu")[0]
    model, _, _ = load_model("base", "cpu", model_tag="vsref", weights=weights)
else:
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import KVCache
    model, _, _ = load_model("base", torch.device("cpu"), "eval", model_tag="vsref")
c = model.config


def make(rows):
    """One decode step of `rows` rows after a 40-token prefill, reset to the same state every call."""
    ids = torch.randint(0, c.vocab_size, (rows, 41), generator=torch.Generator().manual_seed(0))
    if ours:
        cache = model.new_kv_cache(rows, 512)
        last = (torch.arange(rows), torch.zeros(rows, dtype=torch.long))
        model(ids[:, :40], kv_cache=cache, kv_len=40, logits_positions=(last[0], last[1] + 39))

        def step():
            cache.lengths.fill_(40)
            return model(ids[:, 40:], kv_cache=cache, kv_len=41, logits_positions=last)
    else:  # as the reference's Engine sets its cache up on CPU
        cache = KVCache(rows, c.n_kv_head, 512, c.n_embd // c.n_head, c.n_layer, "cpu", torch.float32)
        model(ids[:, :40], kv_cache=cache)
        prev = cache.prev_embedding

        def step():
            cache.cache_seqlens.fill_(40)
            cache.prev_embedding = prev
            return model(ids[:, 40:], kv_cache=cache)
    return step


steps = {}
print("ready", flush=True)
for line in sys.stdin:
    rows, n = map(int, line.split())
    if rows not in steps:
        steps[rows] = make(rows)
        for _ in range(5):
            steps[rows]()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        steps[rows]()
        times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps(statistics.median(times)), flush=True)
'''


def decode_step_rounds(python, cwd, env, threads, who, rounds, weights="default", rows_list=(1, 8), steps=20):
    """{codebase: {"b<rows>": [median step ms of each round]}} from one persistent process per
    codebase (STEP), taking turns in a random order every round: drift hits both alike."""
    procs = {w: subprocess.Popen([python[w], "-c", STEP, threads, w, weights], cwd=cwd[w], env=env[w], text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE) for w in who}
    try:
        for w, proc in procs.items():
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit(f"the decode-step process ({w}) did not start (its error is above)")
        out = {w: {} for w in who}
        order = list(who)
        shuffle = random.Random(0).shuffle
        for rows in rows_list:
            for _ in range(rounds):
                shuffle(order)
                for w in order:
                    procs[w].stdin.write(f"{rows} {steps}\n")
                    procs[w].stdin.flush()
                    line = procs[w].stdout.readline()
                    if not line:
                        raise SystemExit(f"the decode-step process ({w}) died (its error is above)")
                    out[w].setdefault(f"b{rows}", []).append(round(json.loads(line), 3))
        return out
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait(timeout=120)


def run(cmd, cwd, env, log_path):
    """Run a command to completion, its output into log_path (SystemExit with the log's tail if it
    fails); (resource usage of the process (ru_maxrss: its peak RSS in KiB), seconds, log text).
    bench/ablation.py uses it too."""
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    text = open(log_path, encoding="utf-8", errors="replace").read()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {log_path}:\n{text[-3000:]}")
    return usage, time.time() - t0, text


def step_times(text, ours):
    """Per-step seconds from a training log (our `dt 123.4ms`, the reference's `dt: 123.40ms`)."""
    pat = r"^step (\d+)/\d+ .*?\| dt ([\d.]+)ms" if ours else r"^step (\d+)/\d+ .*?\| dt: ([\d.]+)ms"
    return {int(s): float(ms) / 1000 for s, ms in re.findall(pat, text, re.M)}


def final_bpb(text, ours):
    pat = r"\| val bpb ([\d.]+)" if ours else r"Validation bpb: ([\d.]+)"
    found = re.findall(pat, text)
    return float(found[-1]) if found else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", required=True, help="a checkout of karpathy/nanochat")
    p.add_argument("--upstream-python", required=True, help="the Python of the reference's own environment")
    p.add_argument("--data", default=os.environ.get("NANOCHAT_DATA"), help="data root with pretrain/*.parquet")
    p.add_argument("--work", default=None, help="folder for both base dirs and the logs (default: a temp dir)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--depth", type=int, default=4, help="model depth (width 64 per layer, heads of 64)")
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--tokenizer-chars", type=int, default=50_000_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--decode-rounds", type=int, default=3, help="decode runs per codebase, interleaved (best counts)")
    p.add_argument("--step-rounds", type=int, default=0, help="rounds of the paired decode-step comparison (0: none)")
    p.add_argument("--dtype", default=None, help="NANOCHAT_DTYPE for ours (default: its own choice)")
    p.add_argument("--weights", default=None, choices=("fp32", "bf16", "int8"),
                   help="our inference weight format for the decode measurements (default: chat's default for this CPU)")
    p.add_argument("--upstream-dtype", default=None, help="NANOCHAT_DTYPE for the reference (default: its own)")
    p.add_argument("--only", default="ours,upstream", help="ours, upstream or both")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not args.data or not glob.glob(os.path.join(args.data, "pretrain", "*.parquet")):
        raise SystemExit("--data (or NANOCHAT_DATA) must hold pretrain/*.parquet")
    work = args.work or tempfile.mkdtemp(prefix="vs-reference-")
    shards = sorted(glob.glob(os.path.join(os.path.abspath(args.data), "pretrain", "*.parquet")))
    base = {"ours": os.path.join(work, "ours"), "upstream": os.path.join(work, "upstream")}
    up_data = os.path.join(base["upstream"], "base_data_climbmix")  # where the reference looks for shards
    os.makedirs(up_data, exist_ok=True)
    for s in shards:  # the same files, last = validation, for both
        link = os.path.join(up_data, os.path.basename(s))
        if not os.path.exists(link):
            os.symlink(s, link)
    threads = str(args.threads)
    weights = args.weights or "default"
    common = {k: v for k, v in os.environ.items() if not k.startswith(("NANOCHAT_", "PYTHONPATH"))}
    common.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    env = {"ours": dict(common, NANOCHAT_BASE_DIR=base["ours"], NANOCHAT_DATA=os.path.abspath(args.data)),
           "upstream": dict(common, NANOCHAT_BASE_DIR=base["upstream"], PYTHONPATH=os.path.abspath(args.upstream))}
    if args.dtype:
        env["ours"]["NANOCHAT_DTYPE"] = args.dtype
    if args.upstream_dtype:
        env["upstream"]["NANOCHAT_DTYPE"] = args.upstream_dtype
    python = {"ours": sys.executable, "upstream": args.upstream_python}
    cwd = {"ours": REPO, "upstream": os.path.abspath(args.upstream)}
    shape = ["--device-type", "cpu", "--depth", str(args.depth), "--aspect-ratio", "64", "--head-dim", "64", "--max-seq-len", "512",
             "--window-pattern", "L", "--device-batch-size", "8", "--total-batch-size", "4096",
             "--num-iterations", str(args.steps), "--eval-every", str(args.steps), "--eval-tokens", str(args.eval_tokens),
             "--core-metric-every", "-1", "--sample-every", "-1", "--model-tag", "vsref"]
    train = {"ours": [python["ours"], "-m", "nanochat", "train", "base"] + shape,
             "upstream": [python["upstream"], "-m", "scripts.base_train"] + shape}
    tok = {"ours": [python["ours"], "-m", "nanochat", "tokenizer", "train"],
           "upstream": [python["upstream"], "-m", "scripts.tok_train"]}
    who = [w.strip() for w in args.only.split(",") if w.strip()]
    for w in who:  # the same tokenizer settings on the same shards
        if not os.path.exists(os.path.join(base[w], "tokenizer")):
            run(tok[w] + ["--vocab-size", str(args.vocab_size), "--max-chars", str(args.tokenizer_chars)],
                cwd[w], env[w], os.path.join(work, f"tokenizer_{w}.log"))
    results = {w: {"runs": []} for w in who}
    for rep in range(args.repeats):
        for w in who:  # interleaved: load and machine drift hit both alike
            usage, seconds, text = run(train[w], cwd[w], env[w], os.path.join(work, f"train_{w}_{rep}.log"))
            rss = usage.ru_maxrss / 1024
            times = step_times(text, w == "ours")
            measured = [t for s, t in sorted(times.items()) if s >= 10]
            results[w]["runs"].append({"step_time_median_s": statistics.median(measured) if measured else None,
                                       "peak_rss_mib": round(rss), "val_bpb": final_bpb(text, w == "ours"),
                                       "wall_s": round(seconds, 1), "load_1min": round(os.getloadavg()[0], 2)})
            print(json.dumps({w: results[w]["runs"][-1]}), flush=True)
    decode = {w: [] for w in who}
    for _ in range(args.decode_rounds):  # interleaved too: memory bandwidth drifts on a shared machine
        for w in who:
            r = subprocess.run([python[w], "-c", DECODE, threads, w, str(args.new_tokens), weights], cwd=cwd[w], env=env[w],
                               capture_output=True, text=True, timeout=1800)
            if r.returncode != 0:
                raise SystemExit(f"decode ({w}) failed:\n{r.stderr[-3000:]}")
            decode[w].append(json.loads(r.stdout.strip().splitlines()[-1]))
    steps_ms = decode_step_rounds(python, cwd, env, threads, who, args.step_rounds, weights) if args.step_rounds else None
    for w in who:
        for key in (decode[w][0] if decode[w] else []):
            results[w][key] = max(d[key] for d in decode[w])
            results[w][key + "_all"] = [d[key] for d in decode[w]]
        for key, rounds in (steps_ms[w].items() if steps_ms else []):
            results[w][f"decode_step_ms_{key}"] = statistics.median(rounds)
            results[w][f"decode_step_ms_{key}_all"] = rounds
        runs = results[w]["runs"]
        if runs:
            medians = [x["step_time_median_s"] for x in runs if x["step_time_median_s"] is not None]
            results[w]["step_time_median_s"] = statistics.median(medians) if medians else None  # None: < 11 steps
            results[w]["peak_rss_mib"] = max(x["peak_rss_mib"] for x in runs)
    summary = {"machine": machine(),
               "date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "weights": weights, "depth": args.depth,
               "steps": args.steps,
               "work": work, **results}
    if len(who) == 2:
        o, u = results["ours"], results["upstream"]
        ratios = {}
        if o["runs"] and o["step_time_median_s"] and u["step_time_median_s"]:
            ratios.update(training_speed=u["step_time_median_s"] / o["step_time_median_s"],
                          peak_rss=o["peak_rss_mib"] / u["peak_rss_mib"])
        if decode["ours"]:
            ratios.update(decode_b1=o["decode_b1_tok_per_sec"] / u["decode_b1_tok_per_sec"],
                          decode_b8=o["decode_b8_tok_per_sec"] / u["decode_b8_tok_per_sec"])
        for key in (steps_ms["ours"] if steps_ms else []):  # > 1: our step is faster, median of the rounds' ratios
            ratios[f"decode_step_{key}_paired"] = statistics.median(
                up / ours for up, ours in zip(steps_ms["upstream"][key], steps_ms["ours"][key]))
        summary["ratios"] = ratios
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
