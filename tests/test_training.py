"""nanochat/hparams.py and training.py: the --depth rules, the schedules, the LR helper, when periodic jobs are
due, the step log, LR inheritance and resume resolution. Pure functions, no training."""
import types

import pytest
import torch

from nanochat import checkpoint as ck
from nanochat import run
from nanochat import hparams as sc
from nanochat import training as tr
from nanochat.common import UserError


def test_model_dims_round_up_to_head_dim():
    assert sc.model_dims(20, 64, 128) == (1280, 10)
    assert sc.model_dims(2, 64, 128) == (128, 1)
    assert sc.model_dims(3, 64, 128) == (256, 2)   # 192 rounds up to 256
    assert sc.model_dims(26, 64, 128) == (1664, 13)


def test_schedules():
    n = 100
    lrs = [sc.lr_multiplier(i, n, 0.1, 0.4, 0.0) for i in range(n + 1)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[60] == 1.0
    assert lrs[80] == pytest.approx(0.5) and lrs[100] == 0.0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # never rises after warmup
    assert sc.lr_multiplier(100, 100, 0.0, 0.4, 0.1) == pytest.approx(0.1)
    # mid's Muon momentum (the default): 0.85 -> 0.95 over 300 steps, then flat
    assert sc.muon_momentum(0) == pytest.approx(0.85) and sc.muon_momentum(150) == pytest.approx(0.90)
    assert sc.muon_momentum(300) == pytest.approx(0.95) and sc.muon_momentum(5000) == pytest.approx(0.95)


def test_base_lr_schedule_warmup_in_steps():
    """train base: 40 warmup steps, flat, the last 65% linear down to 0.05 (n = 1000 steps: the
    warmdown is steps 350..1000)."""
    def lrm(i):
        return sc.lr_multiplier(i, 1000, 0.0, 0.65, 0.05, warmup_steps=40)
    assert lrm(0) == pytest.approx(1 / 40) and lrm(19) == pytest.approx(0.5) and lrm(39) == 1.0
    assert lrm(40) == 1.0 and lrm(350) == 1.0
    assert lrm(675) == pytest.approx(0.5 + 0.5 * 0.05)  # halfway through the warmdown
    assert lrm(1000) == pytest.approx(0.05)
    assert sc.lr_multiplier(0, 1000, 0.0, 0.65, 0.05, warmup_steps=0) == 1.0  # no warmup
    # the steps win over the ratio when both are given
    assert sc.lr_multiplier(5, 1000, 0.5, 0.0, 0.0, warmup_steps=10) == pytest.approx(0.6)


def test_base_muon_momentum():
    """0.85 -> 0.97 linearly over steps 0..400, 0.97 until the warmdown starts (n = 2000, ratio 0.5:
    step 1000), then linearly to 0.90 at the end."""
    def m(i):
        return sc.base_muon_momentum(i, 2000, 0.5)
    assert m(0) == pytest.approx(0.85) and m(100) == pytest.approx(0.88) and m(200) == pytest.approx(0.91)
    assert m(400) == pytest.approx(0.97) and m(999) == pytest.approx(0.97) and m(1000) == pytest.approx(0.97)
    assert m(1500) == pytest.approx(0.935) and m(2000) == pytest.approx(0.90)
    # a short run whose warmdown starts inside the 400-step warmup: the warmup wins there
    assert sc.base_muon_momentum(100, 300, 0.65) == pytest.approx(0.88)
    assert sc.base_muon_momentum(50, 500, 0.0) == pytest.approx(0.865)  # no warmdown: flat after 400
    assert sc.base_muon_momentum(450, 500, 0.0) == pytest.approx(0.97)


def test_weight_decay_cosine_to_zero():
    wd = [sc.weight_decay_at(i, 0.2, 100) for i in range(101)]
    assert wd[0] == pytest.approx(0.2) and wd[50] == pytest.approx(0.1) and wd[100] == pytest.approx(0.0, abs=1e-12)
    assert wd[25] == pytest.approx(0.2 * 0.5 * (1 + 2 ** -0.5))  # cos(pi/4) = 1/sqrt(2)
    assert all(a > b for a, b in zip(wd, wd[1:]))


def test_derived_batch_size_is_power_law_and_divisible():
    ref = 1.3e9  # the d12 reference horizon
    assert sc.derive_total_batch_size(ref, ref, 32 * 2048 * 8) == 2 ** 19  # the reference itself
    # 4.4x the tokens: 2^19 x 4.4^0.383 = 2^19 x 1.764 -> log2 = 19.82 -> 2^20
    assert sc.derive_total_batch_size(4.4 * ref, ref, 2048) == 2 ** 20
    # 2.4x: 2^19 x 1.399 -> log2 = 19.48 -> stays 2^19
    assert sc.derive_total_batch_size(2.4 * ref, ref, 2048) == 2 ** 19
    small = sc.derive_total_batch_size(ref / 100, ref, 4 * 512)
    assert small == 2 ** 19 // 2 ** 3 and small % (4 * 512) == 0   # 100^-0.383 = 2^-2.54 -> 2^16
    assert sc.derive_total_batch_size(10, ref, 4 * 512) == 4 * 512  # at least one micro-batch
    assert sc.derive_total_batch_size(ref, ref, 3 * 1000) % 3000 == 0


def test_batch_lr_scale_and_weight_decay_rule():
    assert sc.batch_lr_scale(2 ** 19) == 1.0 and sc.batch_lr_scale(2 ** 20) == pytest.approx(2 ** 0.5)
    assert sc.batch_lr_scale(512) == pytest.approx(1 / 32)  # 2^9 / 2^19 = 2^-10
    # lambda = 0.28 x sqrt(B / 2^19) x (D_ref / D)
    assert sc.scaled_weight_decay(0.28, 2 ** 19, 1e9, 1e9) == pytest.approx(0.28)
    assert sc.scaled_weight_decay(0.28, 2 ** 20, 4e9, 1e9) == pytest.approx(0.28 * 2 ** 0.5 / 4)
    assert sc.scaled_weight_decay(0.28, 2 ** 17, 1e8, 1e9) == pytest.approx(0.28 * 0.5 * 10)
    counts = dict(wte=5, value_embeds=7, lm_head=11, transformer_matrices=13, scalars=2, total=38)
    assert sc.scaling_params(counts) == 24  # matrices + lm_head only


def test_set_lrs_scales_initial_lrs_and_sets_muon_momentum():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, 2))
    opt = types.SimpleNamespace(param_groups=[
        dict(kind="adamw", params=[p], initial_lr=0.2, lr=0.2, betas=(0.8, 0.95)),
        dict(kind="muon", params=[q], initial_lr=0.02, lr=0.02, momentum=0.95)])
    sc.set_lrs(opt, 0.5, momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.1), pytest.approx(0.01)]
    assert opt.param_groups[1]["momentum"] == 0.9 and "momentum" not in opt.param_groups[0]
    sc.set_lrs(opt, 0.25)  # no momentum given: Muon's stays
    assert opt.param_groups[1]["lr"] == pytest.approx(0.005) and opt.param_groups[1]["momentum"] == 0.9
    sc.set_lrs(opt, 1.0, weight_decay=0.07)  # the weight decay schedule: Muon groups only
    assert opt.param_groups[1]["weight_decay"] == 0.07 and "weight_decay" not in opt.param_groups[0]


def test_is_due():
    def due(every, n=10, **kw):
        return [s for s in range(n + 1) if tr.is_due(s, every, s == n, **kw)]
    assert due(4) == [4, 8, 10]                          # a save: every 4 and always at the end
    assert due(4, at_start=True) == [0, 4, 8, 10]         # an evaluation: also before the first step
    assert due(-1) == [10] and due(-1, at_start=True) == [10]   # -1 = only at the end
    assert due(4, at_end=False) == [4, 8, 10]             # CORE / samples: every N and at the end...
    assert due(-1, at_end=False) == []                    # ...and -1 = never
    assert due(5) == [5, 10]                              # the end that is also a period counts once


def test_format_time():
    assert tr.format_time(0) == "0m00s" and tr.format_time(59.9) == "0m59s" and tr.format_time(61) == "1m01s"
    assert tr.format_time(3600) == "1h00m" and tr.format_time(7322) == "2h02m" and tr.format_time(-5) == "0m00s"


def test_step_log_ema_record_and_state():
    log = tr.StepLog(torch.device("cpu"), total_batch_size=1000, num_iterations=4)
    for loss in (4.0, 2.0):
        log.begin_step()
        log.end_step(torch.tensor(loss))
    rec = log.line(2, lrm=0.5, first_step=0, flops_per_token=6.0, peak_flops=1e3, trained_tokens=7)
    # biased EMA 0.1*4 = 0.4, then 0.9*0.4 + 0.1*2 = 0.56; debiased by 1 - 0.9^2 = 0.19
    assert rec["smooth_loss"] == pytest.approx(0.56 / 0.19) and rec["loss"] == 2.0
    assert rec["step"] == 2 and rec["lrm"] == 0.5 and rec["tokens"] == 2000 and rec["trained_tokens"] == 7
    assert rec["tok_per_sec"] == pytest.approx(1000 / rec["dt"]) and rec["mfu"] == pytest.approx(6 * rec["tok_per_sec"] / 1e3)
    assert "lr" not in rec  # one key for the multiplier
    state = log.state()
    resumed = tr.StepLog(torch.device("cpu"), 1000, 4, **state)
    assert float(resumed.smooth) == pytest.approx(0.56) and resumed.total_time == state["total_time"]
    assert log.due(3, 2) is False and log.due(4, 3) is True and log.due(2, 2) is True


def test_inherited_lrs():
    args = types.SimpleNamespace(embedding_lr=None, unembedding_lr=0.01, matrix_lr=None, scalar_lr=None)
    base_meta = {"user_config": {"embedding_lr": 0.3, "unembedding_lr": 0.004, "matrix_lr": 0.03, "scalar_lr": 0.5}}
    assert sc.inherited_lrs(base_meta, args) == dict(embedding_lr=0.3, unembedding_lr=0.01, matrix_lr=0.03, scalar_lr=0.5)
    mid_meta = {"lrs": dict(embedding_lr=0.1, unembedding_lr=0.002, matrix_lr=0.01, scalar_lr=0.25), "user_config": {}}
    assert sc.inherited_lrs(mid_meta, args)["embedding_lr"] == 0.1  # a chat stage's own lrs win
    assert sc.inherited_lrs({}, args) == dict(sc.LR_DEFAULTS, unembedding_lr=0.01)


def test_resolve_resume(tmp_path):
    d = str(tmp_path / "ckpt")
    fresh = types.SimpleNamespace(resume=False, resume_from_step=None)
    assert run.resolve_resume(d, fresh, 1) == (None, None)
    latest = types.SimpleNamespace(resume=True, resume_from_step=None)
    with pytest.raises(UserError, match="nothing to resume"):
        run.resolve_resume(d, latest, 1)
    for step in (2, 5):
        ck.save_checkpoint(d, step, {"w": torch.zeros(1)}, {}, {"model_config": {}, "world_size": 2, "loop": {}})
    step, meta = run.resolve_resume(d, latest, 2)
    assert step == 5 and meta["step"] == 5
    assert run.resolve_resume(d, types.SimpleNamespace(resume=False, resume_from_step=2), 2)[0] == 2
    with pytest.raises(UserError, match="no complete checkpoint for step 3.*2, 5"):
        run.resolve_resume(d, types.SimpleNamespace(resume=False, resume_from_step=3), 2)
    with pytest.raises(UserError, match="saved by 2 process"):
        run.resolve_resume(d, latest, 1)
    run.check_horizon(5, 5)
    with pytest.raises(UserError, match="past --num-iterations 4"):
        run.check_horizon(5, 4)


def test_clear_grads_keeps_cpu_gradients_and_steps_the_same():
    """On the CPU the gradients stay allocated (zeroed in place: no heap churn), and the next
    step's gradients are the same as from freshly created ones."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 8)
    a(x).square().sum().backward()
    storage = a.weight.grad.data_ptr()
    tr.clear_grads(a)
    assert a.weight.grad is not None and a.weight.grad.data_ptr() == storage
    assert not a.weight.grad.any() and not a.bias.grad.any()
    a(x * 2).square().sum().backward()
    b(x * 2).square().sum().backward()  # b never had gradients
    assert a.weight.grad.data_ptr() == storage
    torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(a.bias.grad, b.bias.grad, rtol=0, atol=0)
