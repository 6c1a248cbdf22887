"""bench/serve.py, run as users run it: the server in its own process, real HTTP clients, the
weight format it was asked for, and the engine-alone baseline it compares the server with."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_serve_bench_reports_weights_medians_and_the_engine_baseline(tokenizer):
    cmd = [sys.executable, "-m", "bench.serve", "--depth", "1", "--aspect-ratio", "64", "--head-dim", "64",
           "--max-seq-len", "128", "--max-batch", "4", "--clients", "1,2", "--requests-per-client", "1",
           "--repeats", "2", "--max-tokens", "5", "--threads", "1", "--device-type", "cpu", "--weights", "int8",
           "--engine-baseline"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    assert res["server"]["weights"] == "int8"
    assert [r["clients"] for r in res["runs"]] == [1, 1, 2, 2]  # each client count --repeats times
    assert all(r["errors"] == 0 and r["completion_tokens"] == 5 * r["clients"] for r in res["runs"])
    assert all(r["clients_cpu_s"] > 0 and r["server_cpu_s"] > 0 for r in res["runs"])  # who used the cores
    medians = res["aggregate_tok_per_s_median"]
    assert set(medians) == {"1", "2"}
    assert min(r["aggregate_tok_per_s"] for r in res["runs"] if r["clients"] == 2) <= medians["2"]
    engine = res["engine"]
    assert engine["rows"] == 2 and engine["weights"] == "int8" and engine["threads"] == 1
    assert len(engine["engine_tok_per_s_all"]) == 3 and engine["engine_tok_per_s"] > 0
    assert res["server_vs_engine"] == round(medians["2"] / engine["engine_tok_per_s"], 3)
