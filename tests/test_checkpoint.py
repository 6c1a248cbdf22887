"""Checkpoint files: atomic saves, complete-step discovery, RNG state, metrics, load_model."""
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from nanochat import checkpoint as ck
from nanochat.common import UserError


def _tiny_state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}


def test_save_load_roundtrip(tmp_path):
    d = str(tmp_path / "ck")
    state = _tiny_state(0)
    state["_orig_mod.c"] = torch.ones(2, dtype=torch.bfloat16)  # as saved from a compiled bf16 model
    optim = {"state": {0: {"m": torch.arange(3.0)}}, "param_groups": [{"lr": 0.1}]}
    ck.save_checkpoint(d, 5, state, optim, {"model_config": {"n_layer": 1}, "user_config": {"x": 1}},
                       extra={"loader": [1, 2]})
    assert ck.complete_steps(d) == [5]
    assert sorted(os.listdir(d)) == ["meta_000005.json", "model_000005.pt", "optim_000005_rank0.pt"]
    model_state, shard, meta = ck.load_checkpoint(d, 5, load_optimizer=True)
    assert set(model_state) == {"w", "b", "c"}  # compile prefix stripped
    assert model_state["c"].dtype == torch.float32  # saved in fp32 so any device can load it
    assert torch.equal(model_state["w"], state["w"])
    assert torch.equal(shard["optimizer"]["state"][0]["m"], torch.arange(3.0))
    assert shard["extra"] == {"loader": [1, 2]}
    assert meta["step"] == 5 and meta["world_size"] == 1 and meta["user_config"] == {"x": 1}


def test_rng_state_roundtrip():
    state = ck.get_rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    ck.set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_find_last_step_ignores_incomplete(tmp_path):
    d = str(tmp_path)
    for s in (1, 3):
        ck.save_checkpoint(d, s, _tiny_state(s), None, {})
    # a step whose meta never got written (save died between files) is not a step
    torch.save(_tiny_state(9), os.path.join(d, "model_000009.pt"))
    assert ck.find_last_step(d) == 3
    with pytest.raises(UserError, match="no complete checkpoint"):
        ck.find_last_step(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="complete steps"):
        ck.load_checkpoint(d, 9)


def test_crash_between_files_keeps_previous_step(tmp_path, monkeypatch):
    d = str(tmp_path)
    ck.save_checkpoint(d, 1, _tiny_state(1), {"o": 1}, {"tag": "one"})
    real = ck._atomic_save

    def crash_on_meta(obj, path, writer):
        if os.path.basename(path).startswith("meta_"):
            raise RuntimeError("simulated crash before the meta file")
        return real(obj, path, writer)
    monkeypatch.setattr(ck, "_atomic_save", crash_on_meta)
    with pytest.raises(RuntimeError):
        ck.save_checkpoint(d, 2, _tiny_state(2), {"o": 2}, {"tag": "two"})
    assert ck.find_last_step(d) == 1
    model_state, shard, meta = ck.load_checkpoint(d, 1, load_optimizer=True)
    assert torch.equal(model_state["w"], _tiny_state(1)["w"]) and meta["tag"] == "one"


def test_resave_same_step_unpublishes_first(tmp_path, monkeypatch):
    d = str(tmp_path)
    ck.save_checkpoint(d, 1, _tiny_state(1), None, {})
    ck.save_checkpoint(d, 2, _tiny_state(2), None, {})
    real = ck._atomic_save

    def crash_on_meta(obj, path, writer):
        if os.path.basename(path).startswith("meta_"):
            raise RuntimeError("simulated crash")
        return real(obj, path, writer)
    monkeypatch.setattr(ck, "_atomic_save", crash_on_meta)
    with pytest.raises(RuntimeError):
        ck.save_checkpoint(d, 2, _tiny_state(7), None, {})
    # step 2's weights were replaced, so step 2 must no longer count as complete
    assert ck.find_last_step(d) == 1


@pytest.mark.parametrize("kill_at", ["model", "meta"])
def test_killed_process_mid_save_leaves_previous_loadable(tmp_path, kill_at):
    """A real child process is SIGKILLed half-way through writing step 2 (in the middle of the
    model file, or just before the meta file): step 1 stays the latest loadable step."""
    d = str(tmp_path)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from nanochat import checkpoint as ck
        d = {d!r}
        ck.save_checkpoint(d, 1, {{"w": torch.full((256, 256), 1.0)}}, {{"o": 1}}, {{"n": 1}})
        real = ck._atomic_save
        def dying(obj, path, writer):
            name = os.path.basename(path)
            if {kill_at!r} == "model" and name.startswith("model_"):
                def half_then_die(o, f):
                    f.write(b"x" * 1000); f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(obj, path, half_then_die)
            if {kill_at!r} == "meta" and name.startswith("meta_"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(obj, path, writer)
        ck._atomic_save = dying
        ck.save_checkpoint(d, 2, {{"w": torch.full((256, 256), 2.0)}}, {{"o": 2}}, {{"n": 2}})
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == -9, p.stderr
    assert ck.find_last_step(d) == 1
    model_state, shard, meta = ck.load_checkpoint(d, 1, load_optimizer=True)
    assert float(model_state["w"][0, 0]) == 1.0 and shard["optimizer"] == {"o": 1} and meta["n"] == 1
    if kill_at == "model":
        assert any(".tmp." in f for f in os.listdir(d))  # the torn file only ever had a temp name
        assert not os.path.exists(os.path.join(d, "model_000002.pt"))


def test_find_largest_model(tmp_path):
    stage = tmp_path / "base"
    ck.save_checkpoint(str(stage / "d4"), 1, _tiny_state(0), None, {"model_config": {"n_layer": 4}})
    ck.save_checkpoint(str(stage / "d12"), 1, _tiny_state(0), None, {"model_config": {"n_layer": 12}})
    ck.save_checkpoint(str(stage / "mine"), 1, _tiny_state(0), None, {"model_config": {"n_layer": 6}})
    os.makedirs(stage / "d99")  # no complete step: ignored
    assert ck.find_largest_model(str(stage)) == "d12"
    assert ck.list_model_tags(str(stage)) == ["d12", "d4", "mine"]


def test_metrics_append_and_trim(tmp_path):
    d = str(tmp_path)
    for s in range(1, 6):
        ck.append_metrics(d, {"step": s, "loss": 1.0 / s})
    with open(ck.metrics_path(d), "a") as f:
        f.write('{"step": 6, "lo')  # torn line of a killed run
    assert [r["step"] for r in ck.read_metrics(d)] == [1, 2, 3, 4, 5]
    ck.trim_metrics(d, 3)
    assert [r["step"] for r in ck.read_metrics(d)] == [1, 2, 3]
    with open(ck.metrics_path(d)) as f:
        assert all(json.loads(line) for line in f)


def test_begin_run_trims_on_resume_and_clears_a_fresh_run(tmp_path):
    d = str(tmp_path / "tag")
    for s in (1, 2):
        ck.save_checkpoint(d, s, _tiny_state(s), None, {"step": s})
    for s in range(1, 5):
        ck.append_metrics(d, {"step": s})
    ck.begin_run(d, 2, master=False)  # other ranks never touch the files
    assert [r["step"] for r in ck.read_metrics(d)] == [1, 2, 3, 4]
    ck.begin_run(d, 2)  # resumed at step 2: steps 3 and 4 will be logged again
    assert [r["step"] for r in ck.read_metrics(d)] == [1, 2] and ck.complete_steps(d) == [1, 2]
    ck.begin_run(d, None, master=False)
    assert ck.complete_steps(d) == [1, 2]
    ck.begin_run(d, None)  # fresh run under the same tag: the earlier run's files go
    assert ck.complete_steps(d) == [] and ck.read_metrics(d) == [] and os.listdir(d) == []


def test_load_model_errors_list_what_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="nanochat train sft"):
        ck.load_model("sft", "cpu")
    with pytest.raises(UserError, match="must be one of"):
        ck.load_model("nope", "cpu")
    ck.save_checkpoint(ck.checkpoint_dir("base", "d3"), 7, _tiny_state(0), None, {})
    with pytest.raises(UserError, match=r"base/d3 \(steps 7\)"):
        ck.load_model("mid", "cpu")
    with pytest.raises(UserError, match="complete steps: 7"):
        ck.resolve_checkpoint("base", "d3", 8)
    assert ck.resolve_checkpoint("base")[1:] == ("d3", 7)
