"""bench/infer.py, run as a script: its bandwidth accounting for each weight format."""
import json
import os
import subprocess
import sys

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(weights):
    cmd = [sys.executable, os.path.join(REPO, "bench", "infer.py"), "--depth", "2", "--aspect-ratio", "32",
           "--head-dim", "32", "--vocab-size", "512", "--max-seq-len", "64", "--prompt-len", "8", "--new-tokens", "6",
           "--batch-sizes", "1,2", "--threads", "1", "--copy-mib", "16", "--weights", weights, "--device-type", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert f"weights {weights}" in out.stderr  # the startup line names the format
    return json.loads(out.stdout)


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_bytes_per_step_counts_matrices_rows_and_cache(weights):
    res = bench(weights)
    cfg = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L")
    with torch.device("meta"):
        model = GPT(cfg)
    tables = {n: p for n, p in model.named_parameters() if n.startswith(("wte", "value_embeds"))}
    rest = {n: p for n, p in model.named_parameters() if n not in tables}
    if weights == "fp32":
        matrices = 4 * sum(p.numel() for p in rest.values())
        row = 4 * (2 * 64 + 64 * len(model.value_embeds))  # two wte rows (the smear's previous token)
    else:  # int8 + a 4-byte scale and a 2-byte unit scale per row; the gates and scalars stay fp32
        matrices = sum(p.numel() + 6 * p.size(0) if p.dim() == 2 and "gate" not in n else 4 * p.numel()
                       for n, p in rest.items())
        row = 2 * (64 + 4) + (64 + 4) * len(model.value_embeds)
    assert res["model"]["params_M"] == round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    assert res["bandwidth_gbs"] > 0 and "copy_" in res["bandwidth_how"]
    for r in res["results"]:
        parts = r["bytes_per_step_parts"]
        assert parts["matrices"] == matrices
        assert parts["embedding_rows"] == r["batch"] * row
        per_position = r["batch"] * 2 * 2 * 32 * 4 * 2  # rows x layers x (k, v) x kv heads x head dim x fp32 bytes
        assert 8 * per_position <= parts["kv_cache"] <= 14 * per_position  # the prompt plus what is decoded
        assert r["bytes_per_step"] == parts["matrices"] + parts["embedding_rows"] + parts["kv_cache"]
        assert r["mbu"] == pytest.approx(r["achieved_gbs"] / res["bandwidth_gbs"], abs=2e-3, rel=0.02)
        assert r["prefill_flops"] > 0 and r["prefill_mfu"] > 0
    if weights == "int8":
        assert res["model"]["weight_bytes"] < 0.3 * 4 * sum(p.numel() for p in model.parameters())
