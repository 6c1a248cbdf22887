"""`nanochat train base`: derived config, bad flags, exact resume, metrics.jsonl, load_model."""
import math
import os
import subprocess
import sys

import pytest
import torch

from nanochat import checkpoint as ck
from nanochat import metrics as mx
from nanochat import models
from nanochat.common import UserError
from nanochat.stages import train_base as tb

TINY = ["--depth", "2", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "512",
        "--eval-tokens", "512", "--core-metric-every", "-1", "--sample-every", "-1", "--device-type", "cpu"]


def metrics(tag):
    return mx.read_metrics(ck.checkpoint_dir("base", tag))


def run_killed_after(flags, step, monkeypatch):
    """tb.main(flags), killed right after it logs `step` (as a SIGKILL would: no cleanup)."""
    real_append = mx.append_metrics

    def dies(d, record):
        real_append(d, record)
        if record["step"] == step:
            raise KeyboardInterrupt(f"simulated kill after step {step}")
    monkeypatch.setattr(mx, "append_metrics", dies)
    with pytest.raises(KeyboardInterrupt):
        tb.main(flags)
    monkeypatch.setattr(mx, "append_metrics", real_append)


# ---------------------------------------------------------------------------
# derived configuration

def meta_counts(depth, vocab, seq_len=2048, window_pattern="L"):
    """GPT.num_params_by_category() of train base's model at `depth` (width 64 x depth rounded up
    to the head size 128), built on the meta device."""
    from nanochat.gpt import GPT, GPTConfig
    dim = math.ceil(depth * 64 / 128) * 128
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=depth, n_head=dim // 128,
                              n_kv_head=dim // 128, n_embd=dim, window_pattern=window_pattern))
    return model.num_params_by_category(), model.estimate_flops()


def dry_run(flags, capsys):
    """The printed plan of `train base --dry-run`."""
    assert tb.main(flags + ["--device-type", "cpu", "--dry-run", "--model-tag", "dry"]) == 0
    return capsys.readouterr().out


def plan_of(flags, vocab, world_size=1, device_type="cpu"):
    """plan_base of the flags, as `train base` derives it (fresh run)."""
    args = tb.build_parser().parse_args(flags + ["--dry-run"])
    tb.check_base_args(args, device_type)
    return tb.plan_base(args, tb.base_model_config(args, vocab, device_type), world_size)


def test_plan_derives_everything_from_depth(tokenizer, capsys):
    V = tokenizer.get_vocab_size()
    plan = plan_of(["--depth", "4"], V)
    # recompute every derived number by hand from the parameter counts and the test vocab
    counts, _ = meta_counts(4, V)
    ref_counts, _ = meta_counts(12, V)
    scaling = counts["transformer_matrices"] + counts["lm_head"]     # not the embeddings, not the scalars
    assert counts["lm_head"] == V * 256 and plan.counts == counts
    # ...and the counts themselves by hand: q, k, v, proj + the 4x MLP, plus the two value-embedding
    # gates (kv heads 2 x 12 channels, trained by Muon with the matrices); smear gate + 2 lambdas
    C, L = 256, 4
    assert counts["transformer_matrices"] == L * (4 * C * C + 2 * 4 * C * C) + (L // 2) * 2 * 12
    assert counts["scalars"] == 2 * L + 24 + 2
    assert counts["total"] == scaling + counts["scalars"] + V * C + (L // 2) * V * C
    assert plan.scaling_params == scaling
    D, D_ref = 12 * scaling, 12 * (ref_counts["transformer_matrices"] + ref_counts["lm_head"])
    assert plan.train_tokens == D and plan.ref_tokens == D_ref
    micro = 32 * 2048                                  # default device batch x context, one process
    target = 2 ** 19 * (D / D_ref) ** 0.383
    total = max(1, round(2 ** round(math.log2(target)) / micro)) * micro
    assert plan.total_batch_size == total and plan.grad_accum == total // micro
    assert plan.num_iterations == round(D / total)
    scale = (total / 2 ** 19) ** 0.5
    assert plan.lr_scale == pytest.approx(scale)
    assert plan.lrs == pytest.approx(dict(embedding_lr=0.3 * scale, unembedding_lr=0.008 * scale,
                                          matrix_lr=0.02 * scale, scalar_lr=0.5 * scale))
    assert plan.weight_decay == pytest.approx(0.28 * scale * D_ref / D)
    assert plan.eval_steps == 20 * total // micro
    # what --dry-run prints, and the derived record the meta keeps
    out = dry_run(["--depth", "4"], capsys)
    assert "depth 4, dim 256, heads 2 (kv 2), windows L" in out and "compute dtype: float32" in out
    derived = plan.derived(torch.float32)
    assert derived["num_params"] == counts["total"] and derived["weight_decay_scaled"] == plan.weight_decay
    assert derived["dtype"] == "float32" and repr(dict(derived, model_tag="dry")) in out


def test_given_total_batch_scales_the_lrs_too(tokenizer):
    plan = plan_of(["--depth", "2", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "512"],
                   tokenizer.get_vocab_size())
    assert plan.total_batch_size == 512 and plan.lr_scale == pytest.approx(1 / 32)
    assert plan.lrs["matrix_lr"] == pytest.approx(0.02 / 32)


def test_plan_is_per_process_batch_aware(tokenizer):
    """The same total batch with 4 processes: a quarter of the accumulation steps."""
    flags = ["--depth", "2", "--max-seq-len", "64", "--device-batch-size", "2", "--total-batch-size", "1024"]
    one, four = plan_of(flags, 1024), plan_of(flags, 1024, world_size=4)
    assert (one.grad_accum, four.grad_accum) == (8, 2) and one.lrs == four.lrs
    with pytest.raises(UserError, match="not a multiple of"):
        plan_of(flags, 1024, world_size=3)


def test_lr_batch_scaling_none_keeps_the_given_lrs(tokenizer, capsys):
    """runs/runcpu.sh's 4,096-token batch: the rule would divide every lr by sqrt(2^19 / 4096) =
    11.3; --lr-batch-scaling none keeps them, and the weight decay rule is unchanged."""
    flags = ["--depth", "2", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "512"]
    V = tokenizer.get_vocab_size()
    scaled = plan_of(flags, V)
    plan = plan_of(flags + ["--lr-batch-scaling", "none"], V)
    assert plan.lr_scale == 1.0
    assert plan.lrs == pytest.approx(dict(embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, scalar_lr=0.5))
    assert plan.weight_decay == pytest.approx(scaled.weight_decay)
    assert "learning rates (not batch-scaled)" in dry_run(flags + ["--lr-batch-scaling", "none"], capsys)


def test_dry_run_without_a_tokenizer_plans_for_the_default_vocab(tmp_path, monkeypatch, capsys):
    """A plan on a fresh machine: no tokenizer, no shards; the vocabulary is tokenizer train's default."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "fresh"))
    monkeypatch.setenv("NANOCHAT_DATA", str(tmp_path / "no-data"))
    flags = ["--depth", "24", "--target-param-data-ratio", "8"]
    out = dry_run(flags, capsys)
    counts, _ = meta_counts(24, 32768)
    assert "no tokenizer yet, planning for the default vocabulary of 32,768 tokens" in out
    assert "add --window-pattern SSSL for a GPU plan" in out
    plan = plan_of(flags, tb.DEFAULT_VOCAB_SIZE)
    assert plan.counts["total"] == counts["total"] and plan.total_batch_size == 2 ** 20
    assert f"parameters: {counts['total']:,}" in out and f"batch: {2 ** 20:,} tokens/step" in out


def test_plan_with_auto_device_batch_leaves_the_micro_batch_open(tokenizer, capsys):
    """No GPU to probe: the plan (batch, steps, FLOPs) still comes out; the micro-batch is left
    open, and a probed one fills it in."""
    V = tokenizer.get_vocab_size()
    plan = plan_of(["--depth", "2", "--device-batch-size", "auto"], V)
    assert plan.device_batch_size is None and plan.grad_accum is None and plan.eval_steps is None
    assert plan.total_batch_size == 2 ** round(math.log2(plan.total_batch_size))
    args = tb.build_parser().parse_args(["--depth", "2", "--device-batch-size", "auto"])
    probed = tb.plan_base(args, tb.base_model_config(args, V, "cuda"), 1, device_batch_size=8)
    assert probed.device_batch_size == 8 and probed.grad_accum == probed.total_batch_size // (8 * 2048)
    out = dry_run(["--depth", "2", "--device-batch-size", "auto"], capsys)
    assert "device batch auto (probed at the start)" in out and "on paper:" in out


VOCAB_32K = 32768


def test_batch_rule_d12_gets_2_19_and_d20_to_d26_get_2_20():
    """The Power Lines rule at the speedrun's vocabulary, ratio 12: d8 2^18, d12 (the reference) 2^19,
    d20..d26 2^20 (upstream's table); by hand from meta-device parameter counts."""
    ref_counts, _ = meta_counts(12, VOCAB_32K)
    D_ref = 12 * (ref_counts["transformer_matrices"] + ref_counts["lm_head"])
    for depth, expected in ((8, 2 ** 18), (12, 2 ** 19), (20, 2 ** 20), (24, 2 ** 20), (26, 2 ** 20)):
        counts, _ = meta_counts(depth, VOCAB_32K)
        D = 12 * (counts["transformer_matrices"] + counts["lm_head"])
        assert 2 ** round(math.log2(2 ** 19 * (D / D_ref) ** 0.383)) == expected, depth
        plan = plan_of(["--depth", str(depth), "--device-batch-size", "1"], VOCAB_32K)
        assert plan.total_batch_size == expected, depth
        assert plan.lr_scale == pytest.approx((expected / 2 ** 19) ** 0.5)


@pytest.fixture
def vocab_32k(monkeypatch):
    """The speedrun's vocabulary (32,768) for dry runs: they only ask the tokenizer its size."""
    import types
    monkeypatch.setattr(tb, "get_tokenizer", lambda: types.SimpleNamespace(get_vocab_size=lambda: VOCAB_32K))


def test_speedrun_on_paper(vocab_32k, capsys):
    """`train base --depth 24 --target-param-data-ratio 8 --fp8 --dry-run` (the speedrun's
    windows, 8 processes' worth of batch): FLOPs/token, tokens, steps, batch, FLOPs and the hours
    on 8xH100 at 50% MFU of 989 TFLOP/s; no GPU, data or weights needed (--fp8 is only noted)."""
    flags = ["--depth", "24", "--target-param-data-ratio", "8", "--fp8", "--window-pattern", "SSSL",
             "--device-batch-size", "16"]
    plan = plan_of(flags, VOCAB_32K)
    counts, flops_per_token = meta_counts(24, VOCAB_32K, window_pattern="SSSL")
    scaling = counts["transformer_matrices"] + counts["lm_head"]
    steps = round(8 * scaling / 2 ** 20)
    tokens = steps * 2 ** 20
    hours = flops_per_token * tokens / (8 * 989e12 * 0.5) / 3600
    assert plan.total_batch_size == 2 ** 20 and plan.num_iterations == steps
    assert plan.total_tokens == tokens and plan.flops_per_token == flops_per_token
    assert plan.total_flops == flops_per_token * tokens
    assert plan.paper_hours == pytest.approx(hours) and 1.0 < hours < 3.0
    out = dry_run(flags, capsys)
    assert f"FLOPs/token {flops_per_token:.3e}" in out
    assert f"batch: {2 ** 20:,} tokens/step" in out and f"horizon: {steps:,} steps = {tokens:,} tokens" in out
    assert f"on paper: {flops_per_token * tokens:.3e} FLOPs" in out
    assert f"-> {hours:.2f} h on 8xH100 SXM at 50% MFU of 989 TFLOP/s bf16 dense" in out
    assert "fp8: requested, not on this machine (FP8 training needs" in out and "bf16-equivalent MFU" in out
    assert "would be tensorwise: 144 linear layers" in out  # 6 per block
    assert plan_of(flags + ["--assumed-mfu", "0.6"], VOCAB_32K).paper_hours == pytest.approx(hours * 0.5 / 0.6)


def test_schedules_reach_the_optimizer(tokenizer, monkeypatch):
    """A real tiny run: every step sets the lr multiplier (40-step warmup), base's Muon momentum and
    the cosine weight decay from the scaled value; the Muon lr is the flag x sqrt(512 / 2^19);
    --muon-eq-plus turns on MuonEq and Muon+ in the Muon groups."""
    calls = []
    real = tb.set_lrs

    def spy(optimizer, lrm, momentum=None, weight_decay=None):
        real(optimizer, lrm, momentum, weight_decay)
        muon = next(g for g in optimizer.param_groups if g["kind"] == "muon")
        assert muon["row_eq"] is True and muon["renorm"] is True
        calls.append((lrm, momentum, weight_decay, muon["initial_lr"], muon["weight_decay"]))
    monkeypatch.setattr(tb, "set_lrs", spy)
    tb.main(TINY + ["--num-iterations", "4", "--eval-every", "-1", "--model-tag", "sched", "--muon-eq-plus"])
    wd0 = calls[0][2]
    assert wd0 > 0 and len(calls) == 4
    for i, (lrm, momentum, wd, muon_lr, group_wd) in enumerate(calls):
        assert lrm == pytest.approx((i + 1) / 40)
        assert momentum == pytest.approx(0.85 + 0.12 * i / 400)
        assert wd == pytest.approx(wd0 * 0.5 * (1 + math.cos(math.pi * i / 4))) and group_wd == wd
        assert muon_lr == pytest.approx(0.02 / 32)


# ---------------------------------------------------------------------------
# bad flags

@pytest.mark.parametrize("flags,message", [
    (["--depth", "0"], "--depth must be >= 1"),
    (["--total-batch-size", "1000"], "not a multiple of"),
    (["--device-batch-size", "auto"], "needs CUDA"),
    (["--device-batch-size", "many"], "positive integer or 'auto'"),
    (["--window-pattern", "SXL"], "made of S and L"),
    (["--n-kv-head", "3"], "must divide the number of heads"),
    (["--resume", "--model-tag", "never-trained"], "nothing to resume"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["--warmdown-ratio", "1.5"], "--warmdown-ratio must be between 0 and 1"),
    (["--target-param-data-ratio", "0"], "--target-param-data-ratio must be > 0"),
    (["--assumed-mfu", "0"], "--assumed-mfu must be in"),
    (["--num-iterations", "0"], "--num-iterations must be >= 1"),
])
def test_bad_flags_raise_user_error(tokenizer, flags, message):
    with pytest.raises(UserError, match=message):
        tb.main(TINY + ["--num-iterations", "2", "--model-tag", "bad"] + flags)


def test_bad_flag_cli_exit_code(tokenizer):
    p = subprocess.run([sys.executable, "-m", "nanochat", "train", "base", "--depth", "-1"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert p.returncode == 1
    assert "nanochat train base: error: --depth must be >= 1" in p.stderr
    assert "Traceback" not in p.stderr


# ---------------------------------------------------------------------------
# training, exact resume, metrics

@pytest.mark.slow
def test_exact_resume_reproduces_uninterrupted_run(tokenizer, monkeypatch):
    """6 steps in one go vs. a run killed right after logging step 4 (its last checkpoint is step
    3) then resumed with --resume: identical losses (exact equality, CPU fp32), each step logged
    once in metrics.jsonl. Two accumulation steps, so two data loaders are restored."""
    flags = TINY + ["--device-batch-size", "2", "--num-iterations", "6", "--eval-every", "3",
                    "--warmdown-ratio", "0.5"]
    tb.main(flags + ["--model-tag", "full"])
    full = metrics("full")

    run_killed_after(flags + ["--model-tag", "part", "--save-every", "3"], 4, monkeypatch)
    assert ck.complete_steps(ck.checkpoint_dir("base", "part")) == [3]
    assert [r["step"] for r in metrics("part")] == [0, 1, 2, 3, 4]

    tb.main(flags + ["--model-tag", "part", "--save-every", "3", "--resume"])
    part = metrics("part")
    assert [r["step"] for r in part] == [r["step"] for r in full] == [0, 1, 2, 3, 4, 5, 6]
    for a, b in zip(full, part):
        assert a.get("loss") == b.get("loss"), (a, b)
        assert a.get("smooth_loss") == b.get("smooth_loss")
        assert a.get("val_bpb") == b.get("val_bpb")
    assert all(k in full[2] for k in ("step", "loss", "lrm", "tok_per_sec", "mfu", "dt"))
    assert "val_bpb" in full[0] and "val_bpb" in full[3] and "val_bpb" in full[6] and "val_bpb" not in full[2]
    # the final weights are identical too
    a = ck.load_checkpoint(ck.checkpoint_dir("base", "full"), 6)[0]
    b = ck.load_checkpoint(ck.checkpoint_dir("base", "part"), 6)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_thread_count_is_still_exact(tokenizer, monkeypatch):
    """CPU kernels split their sums by thread, so 1 and 2 threads round differently: a resume in
    a process with another thread count (another OMP_NUM_THREADS, a busier machine) must still
    repeat the uninterrupted run exactly. The checkpoint records the count, the resume uses it."""
    # big enough (8 x 128 tokens) that the kernels do split their work over 2 threads
    flags = TINY + ["--max-seq-len", "128", "--device-batch-size", "8", "--total-batch-size", "1024",
                    "--num-iterations", "4", "--eval-every", "-1", "--save-every", "2"]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        tb.main(flags + ["--model-tag", "thr-full"])
        full = metrics("thr-full")
        run_killed_after(flags + ["--model-tag", "thr-part"], 3, monkeypatch)
        assert ck.load_meta(ck.checkpoint_dir("base", "thr-part"), 2)["threads"] == 2
        torch.set_num_threads(1)  # the resumed process would run with another count
        tb.main(flags + ["--model-tag", "thr-part", "--resume"])
        assert torch.get_num_threads() == 2
        part = metrics("thr-part")
        assert [r["step"] for r in part] == [1, 2, 3, 4]
        assert [r["loss"] for r in part] == [r["loss"] for r in full]
        assert part[-1]["val_bpb"] == full[-1]["val_bpb"]
    finally:
        torch.set_num_threads(before)


def test_save_comes_before_the_evaluations_of_a_step(tokenizer, monkeypatch):
    """A final evaluation that fails (here: raises, as a bad validation shard did) must not cost
    the final checkpoint, with --eval-every -1 too; the resumed run then does the evaluation it
    missed, records it, and writes it into the step's meta."""
    flags = TINY + ["--num-iterations", "3", "--eval-every", "-1", "--model-tag", "evalfail"]
    real = tb.evaluate_bpb

    def broken(*a, **k):
        raise RuntimeError("the validation shard is unreadable")
    monkeypatch.setattr(tb, "evaluate_bpb", broken)
    with pytest.raises(RuntimeError, match="unreadable"):
        tb.main(flags)
    d = ck.checkpoint_dir("base", "evalfail")
    assert ck.complete_steps(d) == [3]  # saved before the evaluation that failed
    assert [r["step"] for r in metrics("evalfail")] == [1, 2]  # step 3's record never got written
    monkeypatch.setattr(tb, "evaluate_bpb", real)
    tb.main(flags + ["--resume"])  # resumes at the last step: nothing to train, the evaluation to do
    rows = metrics("evalfail")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["val_bpb"] > 0
    assert ck.load_meta(d, 3)["val_bpb"] == rows[-1]["val_bpb"]
    tb.main(flags + ["--resume"])  # now it was done: a second resume evaluates nothing again
    assert [r["step"] for r in metrics("evalfail")] == [1, 2, 3]


def test_kill_right_after_a_checkpoint_leaves_no_gap_in_the_metrics(tokenizer, monkeypatch):
    """Killed right after step 2's meta appeared (before step 2's record reached metrics.jsonl),
    then resumed: every step appears once, step 2 with the record the killed run had made. The
    loader state lives in the optimizer shards only (not a second copy in the meta)."""
    flags = TINY + ["--num-iterations", "4", "--eval-every", "-1", "--save-every", "2", "--model-tag", "gap"]
    real_save = ck.save_checkpoint

    def dies_after_saving(d, step, *a, **k):
        real_save(d, step, *a, **k)
        if step == 2:
            raise KeyboardInterrupt("simulated kill right after step 2's meta appeared")
    monkeypatch.setattr(ck, "save_checkpoint", dies_after_saving)
    with pytest.raises(KeyboardInterrupt):
        tb.main(flags)
    monkeypatch.setattr(ck, "save_checkpoint", real_save)
    assert [r["step"] for r in metrics("gap")] == [1]
    d = ck.checkpoint_dir("base", "gap")
    assert "dataloader" not in ck.load_meta(d, 2) and ck.load_meta(d, 2)["record"]["step"] == 2
    tb.main(flags + ["--resume"])
    rows = metrics("gap")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    tb.main(flags[:-1] + ["gap-full"])
    assert [r["loss"] for r in rows] == [r["loss"] for r in metrics("gap-full")]


def test_resume_rejects_other_architecture(tokenizer):
    tb.main(TINY + ["--num-iterations", "1", "--eval-every", "-1", "--model-tag", "arch"])
    with pytest.raises(UserError, match="n_embd"):
        tb.main(TINY + ["--num-iterations", "2", "--model-tag", "arch", "--resume", "--aspect-ratio", "128"])
    with pytest.raises(UserError, match="no complete checkpoint for step 5"):
        tb.main(TINY + ["--num-iterations", "2", "--model-tag", "arch", "--resume-from-step", "5"])


def test_base_checkpoint_loads_and_learned(base_checkpoint):
    model, tokenizer, meta = models.load_model("base", "cpu", model_tag=base_checkpoint.tag)
    assert meta["step"] == base_checkpoint.step == 8
    assert not model.training
    saved = ck.load_checkpoint(base_checkpoint.dir, base_checkpoint.step)[0]
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)
    rows = metrics(base_checkpoint.tag)
    assert [r["step"] for r in rows] == list(range(1, 9))  # no step-0 line: --eval-every -1
    assert "val_bpb" in rows[-1] and "val_bpb" not in rows[-2]
    assert rows[-1]["loss"] < rows[1]["loss"]  # it trained
    ids = torch.tensor([tokenizer.encode("The cat sat on the", prepend="<|bos|>")])
    assert torch.isfinite(model(ids)).all()
    # a later stage may train it further
    model2, _, _ = models.load_model("base", "cpu", phase="train")
    assert model2.training


@pytest.mark.slow
def test_compiled_training_matches_eager(tokenizer):
    """--compile (torch.compile, here on CPU) computes the same losses as eager, within tolerance.
    --scalar-lr 0: at init the true gradient of the residual scalars is 0 (RMSNorm is scale
    invariant), so they receive pure round-off (~1e-10), which AdamW (eps 1e-10) turns into
    lr-sized steps whose sign depends on the kernel's summation order: eager vs. compiled would
    diverge through that noise alone, not through a different computation."""
    flags = TINY + ["--num-iterations", "3", "--eval-every", "-1", "--scalar-lr", "0"]
    tb.main(flags + ["--model-tag", "eager", "--no-compile"])
    tb.main(flags + ["--model-tag", "compiled", "--compile"])
    eager = [r["loss"] for r in metrics("eager")]
    compiled = [r["loss"] for r in metrics("compiled")]
    assert len(eager) == 3 and compiled == pytest.approx(eager, abs=1e-3)
    assert metrics("compiled")[-1]["val_bpb"] == pytest.approx(metrics("eager")[-1]["val_bpb"], abs=1e-3)


def test_inference_loads_weights_in_the_compute_dtype(base_checkpoint, monkeypatch):
    """chat, serve and the evaluations load the weights in the compute dtype (no fp32 master copy,
    no per-call weight casts): with bf16 every floating tensor is bf16, the logits stay fp32, and
    the KV-cache path gives the no-cache logits (within bf16 rounding) and the Engine decodes."""
    from nanochat.engine import Engine
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    model, tokenizer, _ = models.load_model("base", "cpu", model_tag=base_checkpoint.tag, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = tokenizer.encode("The cat sat on the", prepend="<|bos|>")
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    cache = model.new_kv_cache(1, 32)
    assert cache.k[0].dtype == torch.bfloat16
    with torch.no_grad():
        cached = model(torch.tensor([ids]), kv_cache=cache, logits_positions=(torch.tensor([0]), torch.tensor([len(ids) - 1])))
    torch.testing.assert_close(cached[0], logits[0, -1], atol=0.1, rtol=0)
    results, _ = Engine(model, tokenizer).generate_batch(ids, max_tokens=6, temperature=0)
    assert results[0][:len(ids)] == ids  # decoding in bf16 ran through the cache
    fp32, _, _ = models.load_model("base", "cpu", model_tag=base_checkpoint.tag)  # the default stays fp32 (export, training)
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
