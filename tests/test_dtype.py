"""The compute dtype: NANOCHAT_DTYPE when set; on a CPU, bf16 only where it has bf16 matrix
instructions AND a matmul probe finds bf16 clearly faster (cached per machine on disk, so every
stage of a pipeline chooses alike); fp32 otherwise. The probe and the CPU flags are stubbed, so
the rules are checked on any machine."""
import json
import os

import pytest
import torch

import nanochat.common as common
from nanochat.common import UserError, compute_dtype_choice, get_compute_dtype


@pytest.fixture
def auto(monkeypatch, tmp_path):
    """No NANOCHAT_DTYPE, an empty base dir, an empty in-process cache, a probe that counts its calls."""
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setattr(common, "_CPU_BF16", {})
    calls = []

    def set_machine(flags, speedup):
        monkeypatch.setattr(common, "cpu_flags", lambda: set(flags))
        monkeypatch.setattr(common, "_bf16_matmul_speedup", lambda: calls.append(1) or speedup)
    set_machine.calls = calls
    set_machine.cache = tmp_path / "cpu_dtype.json"
    return set_machine


def test_cpu_without_bf16_instructions_is_fp32_without_probing(auto):
    auto({"avx2", "fma"}, speedup=5.0)
    assert get_compute_dtype("cpu") == torch.float32
    assert auto.calls == [] and "without bf16 matrix instructions" in compute_dtype_choice("cpu")[1]


@pytest.mark.parametrize("flags,speedup,want", [
    ({"avx512f", "avx512_bf16"}, 2.4, torch.bfloat16),   # e.g. Zen 4
    ({"amx_bf16", "amx_tile", "avx512_bf16"}, 4.1, torch.bfloat16),   # e.g. Sapphire Rapids
    ({"avx512_bf16"}, 1.1, torch.float32),   # has the instructions, but they do not pay here
])
def test_the_probe_decides_on_cpus_with_bf16_instructions(auto, flags, speedup, want):
    auto(flags, speedup)
    dtype, why = compute_dtype_choice("cpu")
    assert dtype == want and f"{speedup:.1f}x" in why
    assert ("AMX" in why) == ("amx_bf16" in flags)


def test_the_probe_runs_once_per_machine(auto, monkeypatch):
    auto({"avx512_bf16"}, 2.0)
    assert get_compute_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(common, "_CPU_BF16", {})  # a new process: only the file remembers
    assert get_compute_dtype("cpu") == torch.bfloat16 and len(auto.calls) == 1
    saved = json.loads(auto.cache.read_text())
    key, value = next(iter(saved.items()))
    assert value == 2.0 and torch.__version__ in key and f"{torch.get_num_threads()} threads" in key


def test_nanochat_dtype_overrides(auto, monkeypatch):
    auto({"avx512_bf16"}, 3.0)
    monkeypatch.setenv("NANOCHAT_DTYPE", "fp32")
    assert compute_dtype_choice("cpu") == (torch.float32, "NANOCHAT_DTYPE=fp32") and auto.calls == []
    monkeypatch.setenv("NANOCHAT_DTYPE", "bf16")
    assert get_compute_dtype("mps") == torch.bfloat16
    monkeypatch.setenv("NANOCHAT_DTYPE", "int8")
    with pytest.raises(UserError, match="NANOCHAT_DTYPE must be one of"):
        get_compute_dtype("cpu")


def test_real_probe_measures_a_ratio():
    r = common._bf16_matmul_speedup(n=128, repeats=2)
    assert r > 0 and r == r  # a finite positive ratio, whatever this CPU is
    assert os.path.exists("/proc/cpuinfo") == bool(common.cpu_flags())
