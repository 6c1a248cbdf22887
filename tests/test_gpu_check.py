"""bench/gpu_check.sh and bench/gpu_check.py on CPU (no GPU here; the same code runs on the first
one): the launcher refuses to run without CUDA unless asked for the CPU version, both parts pass
at tiny sizes with --device-type cpu, and each verdict fails when the feature it checks is
broken (a planted bug: a broken attention mask, a wrong FP8 scale, a decode step that drops the
cache, an optimizer that does not shard, a compile-only bug, an unwarmed mask cache)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import nanochat.attention as attn
import nanochat.gpt as gpt
from nanochat import fp8
from nanochat import optim
from nanochat.engine import BatchDecoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
import gpu_check  # noqa: E402  (bench/ is no package)

CPU = torch.device("cpu")
S = gpu_check.sizes(False)


def launcher(args, tmp_path, **env):
    """bench/gpu_check.sh with this interpreter's folder first on PATH (its python3 is ours)."""
    folder = tmp_path / "prepared"
    (folder / "wheels").mkdir(parents=True, exist_ok=True)
    e = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
             GPU_CHECK_DIR=str(folder), OMP_NUM_THREADS="2", **env)
    return subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_check.sh")] + args, env=e,
                          capture_output=True, text=True, timeout=900)


def test_without_cuda_it_stops_with_one_line(tmp_path):
    assert not torch.cuda.is_available()
    r = launcher(["1"], tmp_path)
    assert r.returncode == 1
    assert "no CUDA GPU visible" in r.stderr and "Traceback" not in r.stderr + r.stdout
    assert len(r.stderr.strip().splitlines()) == 1 and "PASS" not in r.stdout


def test_without_the_prepared_folder_it_says_what_to_do(tmp_path):
    r = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_check.sh"), "2"], capture_output=True, text=True,
                       env=dict(os.environ, GPU_CHECK_DIR=str(tmp_path / "nothing")))
    assert r.returncode == 1 and "bench/gpu_check.sh prepare" in r.stderr
    r = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_check.sh"), "3"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("part", [1, 2])
def test_each_part_passes_on_cpu_and_writes_json_after_every_check(tmp_path, data_dir, part):
    folder = tmp_path / "prepared"
    (folder / "data" / "pretrain").mkdir(parents=True)
    shard = sorted(os.listdir(os.path.join(data_dir, "pretrain")))[0]
    os.symlink(os.path.join(data_dir, "pretrain", shard), folder / "data" / "pretrain" / shard)
    r = launcher([str(part), "--device-type", "cpu", "--out", str(tmp_path / "out")], tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    got = json.load(open(tmp_path / "out" / f"part{part}.json"))
    assert [x["check"] for x in got["results"]] == list(gpu_check.PARTS[part])
    assert all(x["status"] == "PASS" for x in got["results"]), got
    lines = [line for line in r.stdout.splitlines() if line.startswith("PASS ")]
    assert len(lines) == len(gpu_check.PARTS[part])  # one line per check, as it finished
    assert f"{len(lines)} PASS, 0 SKIP, 0 FAIL" in r.stdout


# ---------------------------------------------------------------------------
# each verdict: passes as the code is, fails with a planted bug


def diagonal_only(window, T, device):
    """A broken attention mask: every token sees itself only."""
    return torch.eye(T, dtype=torch.bool, device=device)


@pytest.mark.slow
def test_learn_fails_with_a_broken_attention_mask(monkeypatch):
    ok, numbers = gpu_check.check_learn(CPU, S)
    assert ok and numbers["last_loss"] < 0.5 * numbers["floor_ln_vocab"], numbers
    monkeypatch.setattr(gpt, "window_mask", diagonal_only)
    ok, numbers = gpu_check.check_learn(CPU, S)
    assert not ok and numbers["last_loss"] > 0.8 * numbers["floor_ln_vocab"], numbers


def test_flex_fails_with_an_off_by_one_window(monkeypatch):
    ok, numbers = gpu_check.check_flex(CPU, S)
    assert ok, numbers
    from torch.nn.attention.flex_attention import create_block_mask

    def one_too_wide(T, window, device):
        def mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)
        return create_block_mask(mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
    monkeypatch.setattr(attn, "sliding_window_block_mask", one_too_wide)
    ok, numbers = gpu_check.check_flex(CPU, S)
    assert not ok and numbers["rel_err"]["out"] > 1e-3, numbers


def test_compiled_fails_with_a_bug_only_the_compiled_path_has(monkeypatch):
    ok, numbers = gpu_check.check_compiled(CPU, S)
    assert ok and numbers["fp8"]["fp8_layers"] > 0, numbers
    real = gpt.apply_rotary

    def wrong_when_compiled(x, cos, sin):
        return real(x, cos, -sin if torch.compiler.is_compiling() else sin)
    monkeypatch.setattr(gpt, "apply_rotary", wrong_when_compiled)
    ok, numbers = gpu_check.check_compiled(CPU, S)
    assert not ok and numbers["bf16"]["grad_rel_err"] > 3e-2, numbers


def test_fp8_fails_with_a_wrong_scale(monkeypatch):
    ok, numbers = gpu_check.check_fp8(CPU, S)
    assert ok, numbers
    real = fp8.scale_from_amax
    monkeypatch.setattr(fp8, "scale_from_amax", lambda amax, dtype: real(amax, dtype) * 4)  # saturates
    ok, numbers = gpu_check.check_fp8(CPU, S)
    assert not ok and max(numbers["vs_fp32_rel_err"]) > 1e-1, numbers
    assert max(numbers["vs_emulation_rel_err"]) < 1e-5  # the emulation shares the bug: only the fp32 reference sees it


@pytest.mark.slow
def test_decode_fails_when_the_graphed_step_drops_the_cache(monkeypatch):
    ok, numbers = gpu_check.check_decode(CPU, S)
    assert ok and numbers["identical"], numbers
    real = BatchDecoder._compiled_step

    def dropping(self, n):
        for t in self.cache.k + self.cache.v:
            t.zero_()
        return real(self, n)
    monkeypatch.setattr(BatchDecoder, "_compiled_step", dropping)
    ok, numbers = gpu_check.check_decode(CPU, S)
    assert not ok and not numbers["identical"], numbers


def test_sharded_optim_fails_when_every_rank_keeps_all_state(monkeypatch):
    ok, numbers = gpu_check.check_sharded_optim(CPU, S)
    assert ok and numbers["state_gib_per_rank"] < numbers["params_gib"] / 4, numbers
    monkeypatch.setattr(optim, "_world", lambda: (1, 0, False))  # ignores the process group
    ok, numbers = gpu_check.check_sharded_optim(CPU, S)
    assert not ok and numbers["state_gib_per_rank"] > numbers["predicted_gib_per_rank"], numbers


def test_graphs_fails_when_the_mask_cache_is_not_warmed(monkeypatch):
    ok, numbers = gpu_check.check_graphs(CPU, S)
    assert ok and numbers["warm_mask_compiles"] == 1, numbers
    monkeypatch.setattr(attn, "warm_window_masks", lambda windows, T, device: None)
    ok, numbers = gpu_check.check_graphs(CPU, S)
    assert not ok and numbers["warm_mask_compiles"] == 2, numbers


@pytest.mark.slow
def test_speedrun_fails_when_auto_batch_picks_a_batch_that_does_not_fit(monkeypatch):
    ok, numbers = gpu_check.check_speedrun(CPU, S)
    assert ok and numbers["chosen"] >= 1 and numbers["estimate_bytes"] <= numbers["budget"] < numbers["next_larger_bytes"]
    real = gpu_check.estimated_batch
    monkeypatch.setattr(gpu_check, "estimated_batch", lambda *a, **k: 2 * real(*a, **k))
    ok, numbers = gpu_check.check_speedrun(CPU, S)
    assert not ok and numbers["estimate_bytes"] > numbers["budget"], numbers


def test_the_gpu_lock_pins_every_runtime_dependency_and_no_test_extra():
    """runs/requirements-gpu.txt (what runs/speedrun.sh installs): one exact torch, the tested
    2.11.0, an exact pin for each of pyproject's runtime dependencies, none of the dev extras."""
    import tomllib
    project = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["project"]
    pins = {}
    for line in open(os.path.join(REPO, "runs", "requirements-gpu.txt")):
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pins[name.lower().replace("_", "-")] = version
    assert pins["torch"] == "2.11.0"
    for dep in project["dependencies"]:
        name = dep.split(">")[0].split("=")[0].split("<")[0].strip().lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned"
    dev = {d.split(">")[0].split("=")[0].strip().lower() for d in project["optional-dependencies"]["dev"]}
    assert not dev & set(pins), dev & set(pins)
    speedrun = open(os.path.join(REPO, "runs", "speedrun.sh")).read()
    assert "NANOCHAT_REQUIREMENTS=runs/requirements-gpu.txt bash runs/setup.sh" in speedrun
