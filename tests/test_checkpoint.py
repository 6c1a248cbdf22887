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
from nanochat import metrics
from nanochat import models
from nanochat import run
from nanochat.common import UserError
from nanochat.checkpoint_meta import FORMAT_VERSION


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
    real = ck.atomic_save

    def crash_on_meta(obj, path, writer):
        if os.path.basename(path).startswith("meta_"):
            raise RuntimeError("simulated crash before the meta file")
        return real(obj, path, writer)
    monkeypatch.setattr(ck, "atomic_save", crash_on_meta)
    with pytest.raises(RuntimeError):
        ck.save_checkpoint(d, 2, _tiny_state(2), {"o": 2}, {"tag": "two"})
    assert ck.find_last_step(d) == 1
    model_state, shard, meta = ck.load_checkpoint(d, 1, load_optimizer=True)
    assert torch.equal(model_state["w"], _tiny_state(1)["w"]) and meta["tag"] == "one"


def test_resave_same_step_unpublishes_first(tmp_path, monkeypatch):
    d = str(tmp_path)
    ck.save_checkpoint(d, 1, _tiny_state(1), None, {})
    ck.save_checkpoint(d, 2, _tiny_state(2), None, {})
    real = ck.atomic_save

    def crash_on_meta(obj, path, writer):
        if os.path.basename(path).startswith("meta_"):
            raise RuntimeError("simulated crash")
        return real(obj, path, writer)
    monkeypatch.setattr(ck, "atomic_save", crash_on_meta)
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
        real = ck.atomic_save
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
        ck.atomic_save = dying
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
        metrics.append_metrics(d, {"step": s, "loss": 1.0 / s})
    with open(metrics.metrics_path(d), "a") as f:
        f.write('{"step": 6, "lo')  # torn line of a killed run
    assert [r["step"] for r in metrics.read_metrics(d)] == [1, 2, 3, 4, 5]
    metrics.trim_metrics(d, 3)
    assert [r["step"] for r in metrics.read_metrics(d)] == [1, 2, 3]
    with open(metrics.metrics_path(d)) as f:
        assert all(json.loads(line) for line in f)


def test_begin_run_trims_on_resume_and_clears_a_fresh_run(tmp_path):
    d = str(tmp_path / "tag")
    for s in (1, 2):
        ck.save_checkpoint(d, s, _tiny_state(s), None, {"step": s})
    for s in range(1, 5):
        metrics.append_metrics(d, {"step": s})
    run.begin_run(d, 2, master=False)  # other ranks never touch the files
    assert [r["step"] for r in metrics.read_metrics(d)] == [1, 2, 3, 4]
    run.begin_run(d, 2)  # resumed at step 2: steps 3 and 4 will be logged again
    assert [r["step"] for r in metrics.read_metrics(d)] == [1, 2] and ck.complete_steps(d) == [1, 2]
    run.begin_run(d, None, master=False)
    assert ck.complete_steps(d) == [1, 2]
    run.begin_run(d, None)  # fresh run under the same tag: the earlier run's files go
    assert ck.complete_steps(d) == [] and metrics.read_metrics(d) == [] and os.listdir(d) == []


def test_load_model_errors_list_what_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="nanochat train sft"):
        models.load_model("sft", "cpu")
    with pytest.raises(UserError, match="must be one of"):
        models.load_model("nope", "cpu")
    ck.save_checkpoint(ck.checkpoint_dir("base", "d3"), 7, _tiny_state(0), None, {})
    with pytest.raises(UserError, match=r"base/d3 \(steps 7\)"):
        models.load_model("mid", "cpu")
    with pytest.raises(UserError, match="complete steps: 7"):
        ck.resolve_checkpoint("base", "d3", 8)
    assert ck.resolve_checkpoint("base")[1:] == ("d3", 7)


# ---------------------------------------------------------------------------
# Hostile and damaged files: nothing runs, nothing loads wrong, every failure is one clear line

class _RunsCode:
    """A pickle that calls a function when loaded (what a crafted .pt file does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _two_steps(d):
    for s in (1, 2):
        ck.save_checkpoint(d, s, _tiny_state(s), {"state": {0: {"m": torch.full((3,), float(s))}}},
                           {"model_config": {"n_layer": 1}, "loop": {"total_time": float(s)}}, extra={"loader": [s]})


def _drop_checksums(d, step):
    """Make a step look like one written before checksums existed."""
    _edit_meta(d, step, lambda meta: [meta.pop(k) for k in ("sha256", "sizes", "format")])


def _edit_meta(d, step, change):
    path = os.path.join(d, f"meta_{step:06d}.json")
    meta = json.load(open(path))
    change(meta)
    json.dump(meta, open(path, "w"))


@pytest.mark.parametrize("which", ["optim", "model"])
def test_a_crafted_pt_file_never_runs_code(tmp_path, which):
    """optim_*.pt used to be loaded with weights_only=False: a crafted file ran code on --resume.
    Now every file is read with weights_only=True, checksums or not."""
    d = str(tmp_path / "ck")
    _two_steps(d)
    _drop_checksums(d, 2)  # so that only weights_only stands between the file and the unpickler
    marker = tmp_path / "pwned"
    name = "optim_000002_rank0.pt" if which == "optim" else "model_000002.pt"
    torch.save({"optimizer": _RunsCode(str(marker)), "rng": {}, "extra": None}, os.path.join(d, name))
    with pytest.raises(UserError, match=name) as e:
        ck.load_checkpoint(d, 2, load_optimizer=True, allow_unverified=True)
    assert not marker.exists()
    assert "last good step is 1" in str(e.value)


def test_rng_state_is_plain_data(tmp_path):
    """What weights_only=True can hold: the numpy state is ints and a tensor, and resuming from
    it replays every generator exactly."""
    d = str(tmp_path)
    ck.save_checkpoint(d, 1, _tiny_state(0), None, {})
    want = (torch.rand(3), random.random(), np.random.rand())
    _, shard, _ = ck.load_checkpoint(d, 1, load_optimizer=True)
    assert isinstance(shard["rng"]["numpy"], dict) and torch.is_tensor(shard["rng"]["numpy"]["keys"])
    ck.set_rng_state(shard["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]


def test_a_checkpoint_without_checksums_loads_only_when_asked(tmp_path, monkeypatch):
    """Deleting `sha256` from a meta no longer switches verification off: such a step is refused
    with a message saying how to load it anyway (--allow-unverified, NANOCHAT_ALLOW_UNVERIFIED=1),
    and then loads (numpy RNG state as a tuple with an ndarray, as the oldest checkpoints had)."""
    d = str(tmp_path)
    ck.save_checkpoint(d, 1, _tiny_state(0), {"o": 1}, {"model_config": {}})
    old_rng = {"torch_cpu": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    torch.save({"optimizer": {"o": 1}, "rng": old_rng, "extra": None}, os.path.join(d, "optim_000001_rank0.pt"))
    _drop_checksums(d, 1)
    monkeypatch.delenv("NANOCHAT_ALLOW_UNVERIFIED", raising=False)
    with pytest.raises(UserError, match=r"meta_000001.json records no checksums.*--allow-unverified"):
        ck.load_checkpoint(d, 1, load_optimizer=True)
    _, shard, meta = ck.load_checkpoint(d, 1, load_optimizer=True, allow_unverified=True)
    assert "sha256" not in meta and shard["optimizer"] == {"o": 1}
    ck.set_rng_state(shard["rng"])
    monkeypatch.setenv("NANOCHAT_ALLOW_UNVERIFIED", "1")
    ck.load_checkpoint(d, 1, load_optimizer=True)
    # a checksum missing for one file only: that file is refused the same way
    monkeypatch.delenv("NANOCHAT_ALLOW_UNVERIFIED")
    ck.save_checkpoint(d, 2, _tiny_state(0), {"o": 1}, {})
    _edit_meta(d, 2, lambda meta: meta["sha256"].pop("optim_000002_rank0.pt"))
    ck.load_checkpoint(d, 2)
    with pytest.raises(UserError, match=r"no checksum for .*optim_000002_rank0.pt"):
        ck.load_checkpoint(d, 2, load_optimizer=True)


@pytest.mark.parametrize("which", ["model_000002.pt", "optim_000002_rank0.pt"])
def test_flipped_bytes_are_refused_with_the_last_good_step(tmp_path, which):
    """4 KB of flipped bytes in the middle of a file (inside the tensor data, where the old
    loader noticed nothing): refused, naming the file and the last step that verifies."""
    d = str(tmp_path / "ck")
    ck.save_checkpoint(d, 1, {"w": torch.randn(64, 64)}, {"m": torch.randn(64, 64)}, {"model_config": {}})
    ck.save_checkpoint(d, 2, {"w": torch.randn(64, 64)}, {"m": torch.randn(64, 64)}, {"model_config": {}})
    meta = ck.load_meta(d, 2)
    assert set(meta["sha256"]) == {"model_000002.pt", "optim_000002_rank0.pt"}
    path = os.path.join(d, which)
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])
    open(path, "wb").write(bytes(data))
    with pytest.raises(UserError) as e:
        ck.load_checkpoint(d, 2, load_optimizer=True)
    msg = str(e.value)
    assert which in msg and "sha256" in msg and "last good step is 1" in msg and "\n" not in msg
    ck.load_checkpoint(d, 1, load_optimizer=True)  # the earlier step is fine
    assert ck.last_good_step(d) == 1


DAMAGE = {
    "zero bytes": lambda data: b"",
    "truncated": lambda data: data[: len(data) // 3],
    "random bytes": lambda data: np.random.default_rng(0).bytes(len(data)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("which", ["model_000002.pt", "optim_000002_rank0.pt", "meta_000002.json"])
@pytest.mark.parametrize("checksums", [True, False])
def test_damaged_files_are_one_line_user_errors(tmp_path, damage, which, checksums):
    d = str(tmp_path / "ck")
    _two_steps(d)
    if not checksums:
        _drop_checksums(d, 2)
    path = os.path.join(d, which)
    data = open(path, "rb").read()
    open(path, "wb").write(DAMAGE[damage](data))
    with pytest.raises(UserError) as e:
        ck.load_checkpoint(d, 2, load_optimizer=True, allow_unverified=not checksums)
    assert which in str(e.value) and "last good step is 1" in str(e.value) and "\n" not in str(e.value)


def test_meta_missing_keys_and_config_disagreeing_with_the_weights(tmp_path, monkeypatch, tokenizer):
    """`chat`/`serve` load through build_model: a meta without model_config, or one whose
    model_config does not fit the saved weights, is a UserError naming the file (it used to be a
    KeyError / a load_state_dict RuntimeError traceback)."""
    import dataclasses
    import shutil
    from nanochat.tokenizer import tokenizer_dir
    from test_engine import make_model
    shutil.copytree(tokenizer_dir(), str(tmp_path / "tokenizer"))  # a base dir of its own, same tokenizer
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    model = make_model(tokenizer.get_vocab_size(), sequence_len=32)
    d = ck.checkpoint_dir("sft", "d2")
    cfg = dataclasses.asdict(model.config)
    ck.save_checkpoint(d, 1, model.state_dict(), None, {"model_config": cfg})
    ck.save_checkpoint(d, 2, model.state_dict(), None, {"model_config": {**cfg, "n_embd": 128}})
    with pytest.raises(UserError, match=r"model_000002.pt.*do not fit the model_config.*last good step is 1"):
        models.load_model("sft", "cpu")
    ck.save_checkpoint(d, 3, model.state_dict(), None, {"model_config": {**cfg, "no_such_field": 1}})
    with pytest.raises(UserError, match=r"meta_000003.json.*does not describe a model"):
        models.load_model("sft", "cpu", step=3)
    ck.save_checkpoint(d, 4, model.state_dict(), None, {"step": 4})
    with pytest.raises(UserError, match=r"meta_000004.json.*missing model_config"):
        models.load_model("sft", "cpu", step=4)
    with pytest.raises(UserError, match=r"missing loop"):
        ck.load_checkpoint(d, 4, require=("loop",))
    assert models.load_model("sft", "cpu", step=1)[2]["step"] == 1
    frozen, _, _ = models.load_model("sft", "cpu", step=1)            # eval phase: eval mode, no grads
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    trainable, _, _ = models.load_model("sft", "cpu", phase="train", step=1)
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())
    # on CPU a frozen model's Linear weights are stored transposed, q/k/v stacked
    # (nanochat.inference_layout), a trainable one's as usual; both hold the saved values
    linears = [n + ".weight" for n, m in frozen.named_modules() if isinstance(m, torch.nn.Linear)]
    weights, plain = dict(frozen.named_parameters()), dict(trainable.named_parameters())
    assert linears and all(weights[n].stride(0) == 1 for n in linears if min(weights[n].shape) > 1)
    assert all(b.attn.qkv_weight is not None for b in frozen.blocks)
    assert all(plain[n].is_contiguous() for n in linears) and not hasattr(trainable.blocks[0].attn, "qkv_weight")
    assert all(torch.equal(weights[n], plain[n]) for n in weights)
    half, _, _ = models.load_model("sft", "cpu", step=1, dtype=torch.bfloat16)  # the cast comes first
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert all(dict(half.named_parameters())[n].stride(0) == 1 for n in linears if min(weights[n].shape) > 1)
    assert half.blocks[0].attn.packed_qkv().dtype == torch.bfloat16


def test_torn_or_garbled_metrics_lines_are_dropped(tmp_path):
    """A crash mid-append leaves a torn last line, possibly invalid UTF-8: reading skips it, the
    next append starts on a fresh line (instead of being glued to it and lost), and a resume
    trims it; no traceback anywhere, the report card included."""
    from nanochat import report
    d = str(tmp_path)
    for s in (1, 2):
        metrics.append_metrics(d, {"step": s, "loss": 1.0})
    with open(metrics.metrics_path(d), "ab") as f:
        f.write(b'{"step": 3, "lo\xff\xfe')  # torn, and not UTF-8
    assert [r["step"] for r in metrics.read_metrics(d)] == [1, 2]
    assert report.read_metrics is metrics.read_metrics  # the report card's curves use the same reader
    metrics.append_metrics(d, {"step": 3, "loss": 0.5})
    assert [r["step"] for r in metrics.read_metrics(d)] == [1, 2, 3]
    with open(metrics.metrics_path(d), "ab") as f:
        f.write(b'7\n[1, 2]\n{"step": "x"}\n\x00\x00\x00')  # valid JSON that is not a record, then NULs
    assert [r.get("step") for r in metrics.read_metrics(d)] == [1, 2, 3, "x"]
    metrics.trim_metrics(d, 2)
    assert open(metrics.metrics_path(d), "rb").read() == b'{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 1.0}\n'


def test_resume_removes_temp_files_of_killed_saves(tmp_path):
    d = str(tmp_path / "tag")
    ck.save_checkpoint(d, 1, _tiny_state(1), None, {})
    for name in ("model_000002.pt.tmp.4242", "optim_000002_rank0.pt.tmp.77", "metrics.jsonl.tmp.9"):
        open(os.path.join(d, name), "wb").write(b"torn")
    open(os.path.join(d, "notes.tmp.txt"), "w").write("mine")  # not a temp name of ours: kept
    run.begin_run(d, 1, master=False)
    assert len(os.listdir(d)) == 7  # 3 files of step 1, 3 temp files, notes
    run.begin_run(d, 1)
    assert sorted(os.listdir(d)) == ["meta_000001.json", "model_000001.pt", "notes.tmp.txt", "optim_000001_rank0.pt"]



# ---------------------------------------------------------------------------
# The meta's schema, its format version, and files that are not what they claim

BAD_METAS = {
    "sha256 a string": (lambda m: m.update(sha256="deadbeef"), r"sha256 must be an object"),
    "sha256 value not hex": (lambda m: m["sha256"].update({"model_000002.pt": "xyz"}), r"sha256.model_000002.pt"),
    "sha256 names another path": (lambda m: m["sha256"].update({"../../etc/passwd": "0" * 64}), r"sha256 key"),
    "sizes a list": (lambda m: m.update(sizes=[1, 2]), r"sizes must be an object"),
    "sequence_len 10**12": (lambda m: m["model_config"].update(sequence_len=10 ** 12),
                            r"model_config.sequence_len must be an integer in \[1, 131072\], not 1000000000000"),
    "n_layer a string": (lambda m: m["model_config"].update(n_layer="2"), r"model_config.n_layer"),
    "n_embd true": (lambda m: m["model_config"].update(n_embd=True), r"model_config.n_embd"),
    "model_config a list": (lambda m: m.update(model_config=[1]), r"model_config must be an object"),
    "loop value a string": (lambda m: m["loop"].update(total_time="1h"), r"loop.total_time must be a finite number"),
    "loop value NaN": (lambda m: m["loop"].update(smooth_loss=float("nan")), r"loop.smooth_loss"),
    "loop unknown key": (lambda m: m["loop"].update(bogus=1), r"loop key must be"),
    "loop a number": (lambda m: m.update(loop=3), r"loop must be an object"),
    "world_size a string": (lambda m: m.update(world_size="2"), r"world_size must be an integer"),
    "step negative": (lambda m: m.update(step=-1), r"step must be an integer"),
    "format a string": (lambda m: m.update(format="1"), r"format must be an integer"),
    "lrs negative": (lambda m: m.update(lrs={"matrix_lr": -1}), r"lrs.matrix_lr"),
    "record a string": (lambda m: m.update(record="step 2"), r"record must be an object"),
    "nested deeply": (lambda m: m.update(user_config=json.loads("[" * 40 + "]" * 40)), r"nested more than 32 deep"),
}


@pytest.mark.parametrize("case", sorted(BAD_METAS))
def test_a_meta_off_its_schema_is_a_one_line_error(tmp_path, case):
    """Wrong types and absurd values in a meta: a UserError naming the file and the key, where
    `chat` and `train --resume` used to fail with AttributeError, ValueError or an 8 TB
    allocation; the last good step is named."""
    change, match = BAD_METAS[case]
    d = str(tmp_path / "ck")
    _two_steps(d)
    _edit_meta(d, 2, change)
    with pytest.raises(UserError, match=match) as e:
        ck.load_checkpoint(d, 2, load_optimizer=True)
    assert "meta_000002.json" in str(e.value) and "last good step is 1" in str(e.value) and "\n" not in str(e.value)


def test_a_meta_of_nested_brackets_is_a_one_line_error(tmp_path):
    d = str(tmp_path / "ck")
    _two_steps(d)
    open(os.path.join(d, "meta_000002.json"), "w").write('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(UserError, match=r"meta_000002.json.*nested too deeply.*last good step is 1"):
        ck.load_checkpoint(d, 2)
    assert ck.find_largest_model(str(tmp_path)) == "ck"  # the search for a model skips it too


def test_chat_and_resume_see_the_schema_errors(tmp_path, monkeypatch, tokenizer):
    """Through what `chat` and `train ... --resume` call (checkpoint.load_model,
    run.resolve_resume): the same one-line errors, and a sequence_len of 10**12 is refused
    before anything is allocated."""
    import argparse
    import dataclasses
    import shutil
    from helpers import make_model
    from nanochat.tokenizer import tokenizer_dir
    from nanochat.run import resolve_resume
    shutil.copytree(tokenizer_dir(), str(tmp_path / "tokenizer"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    model = make_model(tokenizer.get_vocab_size(), sequence_len=32)
    d = ck.checkpoint_dir("base", "d2")
    meta = {"model_config": dataclasses.asdict(model.config), "loop": {"smooth_loss": 1.0, "total_time": 2.0}}
    ck.save_checkpoint(d, 1, model.state_dict(), None, meta)
    args = argparse.Namespace(resume=True, resume_from_step=None)
    for change, match in (BAD_METAS["sha256 a string"], BAD_METAS["sequence_len 10**12"],
                          BAD_METAS["loop value a string"]):
        ck.save_checkpoint(d, 2, model.state_dict(), None, meta)
        _edit_meta(d, 2, change)
        with pytest.raises(UserError, match=match):
            models.load_model("base", "cpu")
        with pytest.raises(UserError, match=match):
            resolve_resume(d, args, 1)
    assert models.load_model("base", "cpu", step=1)[2]["format"] == FORMAT_VERSION


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", ["model_000002.pt", "optim_000002_rank0.pt", "meta_000002.json"])
@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "directory"])
def test_files_that_are_not_regular_files_are_refused_at_once(tmp_path, which, kind):
    """A symlink to /dev/zero used to be hashed forever, a FIFO blocked the open: both are refused
    (opened without blocking, checked before a byte is read)."""
    d = str(tmp_path / "ck")
    _two_steps(d)
    path = os.path.join(d, which)
    os.remove(path)
    if kind == "/dev/zero":
        os.symlink("/dev/zero", path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        os.mkdir(path)
    with pytest.raises(UserError, match=r"not a regular file") as e:
        ck.load_checkpoint(d, 2, load_optimizer=True)
    assert which in str(e.value) and "last good step is 1" in str(e.value)


def test_a_file_longer_or_shorter_than_recorded_is_refused(tmp_path):
    """The meta records each file's size: bytes appended (which would also be hashed and read)
    are refused before they are read."""
    d = str(tmp_path / "ck")
    _two_steps(d)
    meta = ck.load_meta(d, 2)
    assert meta["sizes"] == {n: os.path.getsize(os.path.join(d, n)) for n in meta["sha256"]}
    with open(os.path.join(d, "model_000002.pt"), "ab") as f:
        f.write(b"\0" * 1000)
    with pytest.raises(UserError, match=r"model_000002.pt.*holds [\d,]+ bytes, meta_000002.json recorded"):
        ck.load_checkpoint(d, 2)


def test_format_version_is_recorded_and_checked(tmp_path, capsys):
    """Every meta records FORMAT_VERSION. A newer format is refused (upgrade nanochat); a meta
    without one (saved before formats were recorded) loads, with a note saying so."""
    d = str(tmp_path / "ck")
    _two_steps(d)
    assert ck.load_meta(d, 2)["format"] == FORMAT_VERSION
    _edit_meta(d, 2, lambda m: m.update(format=FORMAT_VERSION + 1))
    with pytest.raises(UserError, match=rf"checkpoint format {FORMAT_VERSION + 1}, newer than this nanochat "
                                        rf"reads \(format {FORMAT_VERSION}\).*upgrade"):
        ck.load_checkpoint(d, 2)
    assert ck.last_good_step(d) == 1
    _edit_meta(d, 2, lambda m: [m.pop("format"), m.pop("sizes")])
    capsys.readouterr()
    ck.load_checkpoint(d, 2, load_optimizer=True)
    assert "checkpoint format 0" in capsys.readouterr().out
