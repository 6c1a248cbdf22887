"""`nanochat scaling run|series`: real sweeps of tiny real `train base` subprocesses on the CPU,
killed and resumed, with a failing run; the torchrun driver rule; bad flags."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nanochat import cli, sweep

# tiny models and batches: one run is a few seconds of training (plus start-up)
TINY = ["--device-type", "cpu", "--aspect-ratio", "16", "--head-dim", "16", "--max-seq-len", "64",
        "--window-pattern", "L", "--device-batch-size", "16", "--total-batch-size", "1024",
        "--lr-batch-scaling", "none", "--weight-decay", "0", "--warmup-steps", "2", "--sample-every", "-1",
        "--log-every", "2", "--no-compile"]


def nanochat(*args):
    return [sys.executable, "-m", "nanochat", *args]


def rows(out):
    with open(os.path.join(out, "results.csv"), newline="") as f:
        return list(csv.DictReader(f))


def attempts(out, run):
    with open(os.path.join(out, "runs", run, "train.log")) as f:
        return sum(1 for line in f if line.startswith("=== "))


def wait_for(predicate, timeout, proc):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, "the sweep ended before the kill"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_grid_killed_resumes_without_duplicate_or_lost_row(tokenizer, tmp_path):
    out = str(tmp_path / "grid")
    cmd = nanochat("scaling", "run", "--budgets", "2e9,4e9", "--depths", "1,2,3", "--out", out,
                   "--eval-tokens", "2048", "--no-core", "--", *TINY)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    csv_path = os.path.join(out, "results.csv")
    # kill -9 the driver while its second run trains: one row written, one run half done
    wait_for(lambda: os.path.exists(csv_path) and len(rows(out)) == 1
             and os.path.exists(os.path.join(out, "runs", "C2e9-d2", "train.log")), 600, proc)
    time.sleep(1.0)
    first = rows(out)[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # its train base child dies with it (it would write into the run the next sweep restarts)
    time.sleep(1.0)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "--model-tag C2e9-d2" not in ps

    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    got = rows(out)
    assert sorted(x["run"] for x in got) == sorted(f"C{c}-d{d}" for c in ("2e9", "4e9") for d in (1, 2, 3))
    assert all(x["status"] == "ok" and float(x["val_bpb"]) > 0 for x in got)
    assert got[0] == first  # the row from before the kill, untouched
    assert attempts(out, "C2e9-d1") == 1 and attempts(out, "C2e9-d2") == 2  # restarted, not duplicated
    assert "run 6/6" in r.stdout and "ETA" in r.stdout
    # upstream's columns first, each run's metrics kept, no weights left
    with open(csv_path) as f:
        assert f.readline().startswith("flops_budget,depth,model_dim,params_wte,params_value_embeds,params_lm_head,")
    for x in got:
        d = os.path.join(out, "runs", x["run"], "checkpoints", "base", x["run"])
        assert os.path.getsize(os.path.join(d, "metrics.jsonl")) > 0
        assert not [n for n in os.listdir(d) if n.endswith(".pt")]
        assert int(x["tokens_trained"]) == int(x["num_iterations"]) * 1024
        assert abs(float(x["flops"]) / float(x["flops_budget"]) - 1) < 0.3
    for name in ("isoflop.png", "optima.png", "losses.png", "fit.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    # a finished sweep run again does nothing; the fit reads its CSV
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and "all 6 runs are in" in r.stdout and len(rows(out)) == 6
    r = subprocess.run(nanochat("scaling", "fit", "--csv", csv_path, "--json"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["per_budget"]) == 2


@pytest.mark.slow
def test_failed_run_is_recorded_and_skipped(tokenizer, tmp_path):
    out = str(tmp_path / "grid")
    # 2 kv heads: depth 1 has one head, so its train base stops with an error; depth 2 trains
    cmd = nanochat("scaling", "run", "--budgets", "2e9", "--depths", "1,2", "--out", out,
                   "--eval-tokens", "2048", "--no-core", "--", *TINY, "--n-kv-head", "2")
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    got = {x["run"]: x for x in rows(out)}
    assert got["C2e9-d1"]["status"] == "failed" and "n-kv-head" in got["C2e9-d1"]["error"]
    assert got["C2e9-d1"]["val_bpb"] == ""
    assert got["C2e9-d2"]["status"] == "ok" and float(got["C2e9-d2"]["val_bpb"]) > 0
    assert "run C2e9-d1 failed" in r.stdout
    r = subprocess.run(cmd, capture_output=True, text=True)  # skipped, not retried
    assert r.returncode == 0 and attempts(out, "C2e9-d1") == 1 and len(rows(out)) == 2
    r = subprocess.run(cmd[:5] + ["--retry-failed"] + cmd[5:], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert attempts(out, "C2e9-d1") == 2 and attempts(out, "C2e9-d2") == 1
    assert sorted(x["run"] for x in rows(out)) == ["C2e9-d1", "C2e9-d2"]


@pytest.mark.slow
def test_series_end_to_end(tokenizer, tmp_path):
    out = str(tmp_path / "series")
    r = subprocess.run(nanochat("scaling", "series", "--depths", "1,2", "--ratio", "2", "--out", out,
                                "--eval-tokens", "2048", "--no-core", "--", *TINY), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    got = rows(out)
    with open(os.path.join(out, "results.csv")) as f:
        assert f.readline().startswith("depth,model_dim,num_params,num_scaling_params,num_iterations,tokens_trained,"
                                       "param_data_ratio,val_bpb,core_score,train_time_sec,status")
    assert [x["depth"] for x in got] == ["1", "2"] and all(x["status"] == "ok" for x in got)
    assert all(abs(float(x["param_data_ratio"]) - 2) < 0.5 for x in got)
    assert int(got[1]["num_params"]) > int(got[0]["num_params"])
    assert os.path.getsize(os.path.join(out, "series.png")) > 0


@pytest.mark.slow
def test_runs_under_torchrun(tokenizer, tmp_path):
    """--nproc-per-node 2: the run is a 2-process torchrun (gloo on the CPU) and its row is written once."""
    out = str(tmp_path / "grid")
    flags = [f for f in TINY]
    flags[flags.index("--device-batch-size") + 1] = "8"  # 8 x 64 x 2 processes = the 1,024-token batch
    r = subprocess.run(nanochat("scaling", "run", "--budgets", "2e9", "--depths", "2", "--out", out, "--nproc-per-node", "2",
                                "--eval-tokens", "2048", "--no-core", "--", *flags), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    (row,) = rows(out)
    assert row["status"] == "ok" and float(row["val_bpb"]) > 0
    with open(os.path.join(out, "runs", "C2e9-d2", "train.log")) as f:
        log = f.read()
    assert "torch.distributed.run --standalone --nproc_per_node=2" in log and "x 2 procs" in log


def test_torchrun_driver(monkeypatch):
    for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    assert sweep.torchrun_driver() == (True, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert sweep.torchrun_driver() == (True, 4)  # rank 0 drives, its runs use the node's 4 processes
    monkeypatch.setenv("RANK", "2")
    assert sweep.torchrun_driver() == (False, 4)
    monkeypatch.setenv("MASTER_PORT", "29500")
    env = sweep.child_env()
    assert "RANK" not in env and "MASTER_PORT" not in env and "WORLD_SIZE" not in env
    assert sweep.train_command(4)[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert sweep.train_command(1)[1:] == ["-m", "nanochat", "train", "base"]


def test_plan_under_torchrun_has_one_driver(tmp_path):
    """`torchrun --nproc_per_node=2 -m nanochat scaling run --dry-run`: one plan, both ranks exit 0."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "nanochat", "scaling", "run", "--dry-run", "--out", str(tmp_path / "g")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("24 runs") == 1 and "h on 8xH100" in r.stdout


@pytest.mark.parametrize("argv,message", [
    (["run", "--budgets", "1e18,abc"], "--budgets must be a comma-separated list"),
    (["run", "--depths", "0,2"], "--depths must list positive numbers"),
    (["run", "--depths", "2,2"], "lists a value twice"),
    (["series", "--ratio", "0"], "--ratio must be > 0"),
    (["fit", "--target-flops", "-1"], "--target-flops must be > 0"),
])
def test_bad_flags_are_one_line(capsys, argv, message):
    assert cli.main(["scaling", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_second_sweep_in_the_same_folder_is_refused(tokenizer, tmp_path, capsys):
    from filelock import FileLock
    out = tmp_path / "g"
    out.mkdir()
    with FileLock(str(out / ".sweep.lock")):
        assert cli.main(["scaling", "run", "--budgets", "1e9", "--depths", "1", "--out", str(out)]) == 1
    assert "another sweep is running" in capsys.readouterr().err


@pytest.mark.parametrize("script,expect", [
    ("scaling_laws.sh", ["scaling run --nproc-per-node 3 --out OUT/g --budgets 1e18,2.15e18,4.64e18,1e19 "
                         "--depths 10,12,14,16,18,20 -- --device-batch-size auto --fp8",
                         "scaling fit --csv OUT/g/results.csv --target-flops 4e19"]),
    ("miniseries.sh", ["scaling series --nproc-per-node 3 --out OUT/g --depths 10,12,14,16,18,20 --ratio 12 "
                       "-- --device-batch-size auto --fp8"]),
])
def test_gpu_presets_call_the_commands(tmp_path, script, expect):
    """runs/scaling_laws.sh and runs/miniseries.sh with a fake `nanochat` and a fake 3-GPU nvidia-smi."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "nanochat").write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nprintf 'GPU 0\\nGPU 1\\nGPU 2\\n'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out = str(tmp_path / "g")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=out)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(["bash", os.path.join(repo, "runs", script), "--fp8"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert log.read_text().replace(out, "OUT/g").splitlines() == expect
