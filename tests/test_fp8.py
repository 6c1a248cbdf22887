"""nanochat/fp8.py on the CPU: the tensorwise scaling math by hand, the FP8 Linear (torch 2.13 runs
the real torch._scaled_mm on CPU) against an fp32 emulation, the layer choice, a few training
steps against fp32, and `train base --fp8` refusing a machine without FP8 tensor cores."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat import checkpoint as ck
from nanochat import metrics
from nanochat import models
from nanochat import fp8
from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig
from nanochat.stages import train_base as tb

E4M3, E5M2 = fp8.E4M3, fp8.E5M2


def values(t_fp8):
    return t_fp8.float().tolist()


# ---------------------------------------------------------------------------
# scaling math, hand-computed

def test_scale_maps_amax_onto_the_format_maximum():
    assert fp8.fp8_max(E4M3) == 448 and fp8.fp8_max(E5M2) == 57344
    assert fp8.scale_from_amax(torch.tensor(4.0), E4M3).item() == 112.0      # 448 / 4
    assert fp8.scale_from_amax(torch.tensor(4.0), E5M2).item() == 14336.0    # 57344 / 4
    assert fp8.scale_from_amax(torch.tensor(0.5), E4M3).dtype == torch.float32


def test_quantize_is_exact_on_representable_values():
    q, inv = fp8.quantize(torch.tensor([1.0, -2.0, 0.5, 4.0]), E4M3)
    # x * 112: 112 = 1.75 * 2^6, 224 = 1.75 * 2^7, 56 = 1.75 * 2^5, 448 = 1.75 * 2^8: all e4m3 values
    assert q.dtype == E4M3 and values(q) == [112.0, -224.0, 56.0, 448.0]
    assert inv.item() == pytest.approx(1 / 112, rel=1e-7)
    assert fp8.dequantize(q, inv).tolist() == pytest.approx([1.0, -2.0, 0.5, 4.0], rel=1e-6)


def test_quantize_rounds_to_nearest_even():
    one = torch.tensor(1.0)
    # e4m3 steps 0.125 in [1, 2): 1.0625 is a tie -> 1.0 (even), 1.1 -> 1.125, 1.19 -> 1.25
    q, _ = fp8.quantize(torch.tensor([1.0625, 1.1, 1.19]), E4M3, scale=one)
    assert values(q) == [1.0, 1.125, 1.25]
    # e5m2 steps 0.25 in [1, 2): 1.1 -> 1.0, 1.2 -> 1.25, 1.375 is a tie -> 1.5 (even)
    q, _ = fp8.quantize(torch.tensor([1.1, 1.2, 1.375]), E5M2, scale=one)
    assert values(q) == [1.0, 1.25, 1.5]


def test_quantize_saturates_instead_of_overflowing():
    one = torch.tensor(1.0)
    x = torch.tensor([1.0, 1000.0, -1e6])
    assert values(fp8.quantize(x, E4M3, scale=one)[0]) == [1.0, 448.0, -448.0]
    # 1000 is inside e5m2's range: between 896 (1.75 * 2^9) and 1024 it rounds to 1024
    assert values(fp8.quantize(x, E5M2, scale=one)[0]) == [1.0, 1024.0, -57344.0]
    # without the clamp a plain cast overflows (what the clamp is there for)
    assert torch.isinf(torch.tensor([1e6]).to(E5M2).float()).all()


def test_zero_tensor_gives_a_finite_scale_and_zeros():
    q, inv = fp8.quantize(torch.zeros(3, 16), E4M3)
    assert torch.isfinite(inv) and inv.item() > 0 and values(q) == [[0.0] * 16] * 3
    assert inv.item() == pytest.approx(fp8.EPS / 448, rel=1e-6)
    x = torch.zeros(16, 32, requires_grad=True)
    w = torch.randn(48, 32, requires_grad=True)
    y = fp8.fp8_matmul(x, w)
    y.backward(torch.zeros_like(y))  # an all-zero gradient too
    for t in (y, x.grad, w.grad):
        assert torch.isfinite(t).all() and not t.any()


@pytest.mark.parametrize("dtype,rel,sub_half_step", [(E4M3, 2 ** -4, 2 ** -10), (E5M2, 2 ** -3, 2 ** -17)])
def test_round_trip_error_bounds(dtype, rel, sub_half_step):
    """Round to nearest: at most half a step. Normal numbers: 3 (e4m3) or 2 (e5m2) mantissa bits,
    a relative error <= 2^-4 or 2^-3; subnormals (below 2^-6 or 2^-14 in scaled units) have a fixed
    step of 2^-9 or 2^-16, so an absolute error <= half of it, divided by the scale."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=g) * torch.logspace(-4, 2, 64)[:, None]  # 6 decades in one tensor
    q, inv = fp8.quantize(x, dtype)
    err = (fp8.dequantize(q, inv) - x).abs()
    bound = rel * x.abs() + sub_half_step * inv
    assert (err <= bound * (1 + 1e-5)).all()
    normal = x.abs() * (1 / inv) > 2 * fp8.fp8_max(dtype) * 2 ** -8  # well inside the normal range
    assert (err[normal] / x.abs()[normal]).max() > 0.75 * rel  # and the bound is nearly reached: it is tight
    # the largest magnitude lands on the format's maximum and comes back as itself
    i = x.abs().argmax()
    assert q.flatten()[i].float().abs().item() == fp8.fp8_max(dtype)
    assert fp8.dequantize(q, inv).flatten()[i].item() == pytest.approx(x.flatten()[i].item(), rel=1e-6)


# ---------------------------------------------------------------------------
# the FP8 linear: real _scaled_mm (CPU) vs emulation vs fp32

def test_scaled_mm_runs_on_this_cpu():
    """The premise of the tests below: torch's CPU _scaled_mm takes both formats and the scales."""
    a = torch.tensor([[1.0, 2.0]]).to(E5M2)
    b = torch.tensor([[3.0], [4.0]]).to(E4M3)
    out = torch._scaled_mm(a, b, scale_a=torch.tensor(0.5), scale_b=torch.tensor(2.0), out_dtype=torch.float32)
    assert out.tolist() == [[11.0]]  # (1*3 + 2*4) * 0.5 * 2


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_equals_the_emulation(bias):
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(128, 96, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 128, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(96, generator=g))
    layer = fp8.FP8Linear(128, 96, bias=bias)
    layer.load_state_dict(lin.state_dict())
    ref_lin = lin  # the same weights, the ordinary fp32 layer
    x = (torch.randn(2, 24, 128, generator=g) * 3).requires_grad_()
    dy = torch.randn(2, 24, 96, generator=g) * 1e-3
    y = layer(x)
    y.backward(dy)
    assert y.shape == (2, 24, 96) and y.dtype == torch.float32
    assert layer.weight.grad.dtype == torch.float32  # straight into the fp32 master's gradient
    ry, rdx, rdw = fp8.reference_linear(x.detach().view(48, 128), layer.weight.detach(), dy.view(48, 96))
    if bias:
        ry = ry + layer.bias.detach()
        torch.testing.assert_close(layer.bias.grad, dy.sum((0, 1)))
    torch.testing.assert_close(y.detach().view(48, 96), ry, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.view(48, 128), rdx, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(layer.weight.grad, rdw, rtol=1e-5, atol=1e-7)
    # and it approximates the fp32 layer to within FP8's precision
    x2 = x.detach().clone().requires_grad_()
    y32 = ref_lin(x2)
    y32.backward(dy)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    assert rel(y.detach(), y32.detach()) < 0.08
    assert rel(x.grad, x2.grad) < 0.15 and rel(layer.weight.grad, ref_lin.weight.grad) < 0.15
    assert rel(y.detach(), y32.detach()) > 1e-4  # it really went through FP8


def test_fp8_linear_bf16_activations():
    """Under autocast the activations arrive in bf16: the output and dx are bf16, dW stays fp32."""
    layer = fp8.FP8Linear(64, 32, bias=False)
    x = torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.float32
    ry, rdx, rdw = fp8.reference_linear(x.detach(), layer.weight.detach(), torch.ones(16, 32, dtype=torch.bfloat16))
    torch.testing.assert_close(y.float(), ry, rtol=1e-2, atol=1e-2)  # the bf16 output rounding
    torch.testing.assert_close(layer.weight.grad, rdw, rtol=1e-5, atol=1e-6)


def test_non_contiguous_inputs_and_gradients():
    """_scaled_mm wants a row-major first operand: a transposed input or gradient is made
    contiguous first, and the result is the emulation's."""
    layer = fp8.FP8Linear(64, 48, bias=False)
    x = torch.randn(16, 2, 64).transpose(0, 1).requires_grad_()  # (2, 16, 64), not contiguous
    dy = torch.randn(48, 16, 2).permute(2, 1, 0)                 # (2, 16, 48), not contiguous
    y = layer(x)
    y.backward(dy)
    ry, rdx, rdw = fp8.reference_linear(x.detach().reshape(32, 64), layer.weight.detach(), dy.reshape(32, 48))
    torch.testing.assert_close(y.detach().reshape(32, 48), ry)
    torch.testing.assert_close(x.grad.reshape(32, 64), rdx)
    torch.testing.assert_close(layer.weight.grad, rdw)


def test_eval_mode_and_odd_row_counts_use_the_ordinary_matmul():
    layer = fp8.FP8Linear(64, 32, bias=False)
    x = torch.randn(16, 64)
    assert not torch.equal(layer(x), F.linear(x, layer.weight))  # training mode: FP8
    assert torch.equal(layer.eval()(x), F.linear(x, layer.weight))
    layer.train()
    x7 = torch.randn(7, 64)  # _scaled_mm's dW GEMM needs the rows to be a multiple of 16
    assert torch.equal(layer(x7), F.linear(x7, layer.weight))


# ---------------------------------------------------------------------------
# which layers

def tiny_gpt(vocab=512, depth=2, dim=128, heads=4, seq=64):
    config = GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=depth, n_head=heads, n_kv_head=heads,
                       n_embd=dim, window_pattern="L")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model


def test_conversion_picks_the_big_matmuls_and_keeps_the_parameters():
    model = tiny_gpt()
    before = {k: v for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    converted, kept = fp8.convert_to_fp8(model)
    names = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert converted == [f"blocks.{i}.{n}" for i in range(2) for n in names]
    gates = [n for n in kept if n.endswith("ve_gate")]
    # value-embedding gates (12 channels -> kv heads) and the smear gate (24 -> 1) stay as they are
    assert gates and all(kept[n].startswith("a dimension is not a multiple") for n in gates)
    assert kept["smear_gate"].startswith("a dimension is not a multiple")
    assert kept["lm_head"] == "skipped by name" and set(kept) == set(gates) | {"lm_head", "smear_gate"}
    assert type(model.smear_gate) is nn.Linear and all(type(model.get_submodule(n)) is nn.Linear for n in gates)
    assert all(isinstance(model.get_submodule(n), fp8.FP8Linear) for n in converted)
    assert type(model.lm_head) is nn.Linear
    # the same parameter objects under the same names: optimizer groups and checkpoints see no change
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    assert model.state_dict().keys() == before.keys()
    plain = tiny_gpt()
    plain.load_state_dict(model.state_dict(), strict=True)
    assert fp8.convert_to_fp8(model) == ([], kept)  # converting twice changes nothing
    assert fp8.summarize(converted) == ", ".join(f"blocks.*.{n} x2" for n in names)


def test_conversion_rules_on_plain_layers():
    m = nn.Sequential(nn.Linear(128, 256), nn.Linear(100, 128), nn.Linear(64, 64), nn.Linear(256, 128))
    m.eval()
    converted, kept = fp8.convert_to_fp8(m)
    assert converted == ["0", "3"] and isinstance(m[0], fp8.FP8Linear) and m[0].bias is not None
    assert kept == {"1": "a dimension is not a multiple of 16", "2": "smaller than 128"}
    assert not m[0].training  # keeps the mode it had
    assert fp8.convert_to_fp8(nn.Sequential(nn.Linear(64, 64)), min_dim=64)[0] == ["0"]


def test_converted_model_compiles_without_graph_breaks():
    model = tiny_gpt()
    fp8.convert_to_fp8(model)
    idx = torch.randint(0, 512, (2, 64))
    ex = torch._dynamo.explain(model)(idx, idx)
    assert ex.graph_count == 1 and ex.graph_break_count == 0


@pytest.mark.slow
def test_compiled_fp8_linear_equals_eager():
    """torch.compile (inductor, here on CPU) of the FP8 layer: forward and both gradients as in eager."""
    layer = fp8.FP8Linear(128, 256, bias=False)
    x = torch.randn(4, 32, 128, requires_grad=True)
    y = torch.compile(layer)(x)
    y.sum().backward()
    grads = x.grad.clone(), layer.weight.grad.clone()
    x.grad = layer.weight.grad = None
    y2 = layer(x)
    y2.sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads, (x.grad, layer.weight.grad), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# training

def test_a_few_fp8_steps_track_fp32():
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 64, (8, 65), generator=g)  # few ids: learnable in a few steps

    def run(use_fp8):
        model = tiny_gpt()
        if use_fp8:
            assert len(fp8.convert_to_fp8(model)[0]) == 12
        opt = model.setup_optimizer(weight_decay=0.0)
        losses = []
        for _ in range(8):
            loss = model(data[:, :-1], data[:, 1:])
            loss.backward()
            opt.step()
            model.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses
    ref, got = run(False), run(True)
    assert got[-1] < got[0] - 0.5  # it learns
    assert got == pytest.approx(ref, rel=0.01)  # measured: within 0.2%
    assert got != ref


# ---------------------------------------------------------------------------
# the stage

TINY = ["--depth", "2", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "512",
        "--eval-tokens", "512", "--core-metric-every", "-1", "--sample-every", "-1", "--device-type", "cpu"]


def test_unsupported_reasons():
    assert "compute capability 8.9" in fp8.unsupported_reason("cpu")
    assert "this run is on cpu" in fp8.unsupported_reason(torch.device("cpu"))


def test_fp8_on_cpu_is_a_user_error(tokenizer):
    with pytest.raises(UserError, match="--fp8: FP8 training needs an NVIDIA GPU of compute capability 8.9"):
        tb.main(TINY + ["--num-iterations", "1", "--model-tag", "fp8cpu", "--fp8"])
    p = subprocess.run([sys.executable, "-m", "nanochat", "train", "base", *TINY, "--num-iterations", "1",
                        "--model-tag", "fp8cpu", "--fp8"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ))
    assert p.returncode == 1
    assert "nanochat train base: error: --fp8: FP8 training needs" in p.stderr and "train without --fp8" in p.stderr
    assert "Traceback" not in p.stderr
    assert not ck.complete_steps(ck.checkpoint_dir("base", "fp8cpu"))


def test_stage_trains_with_fp8_and_saves_ordinary_weights(tokenizer, monkeypatch, capsys):
    """The CPU has no FP8 tensor cores, so the stage refuses --fp8 here; with that one gate opened
    the stage runs the real FP8 path (CPU _scaled_mm) end to end."""
    assert tb.main(TINY + ["--dry-run", "--model-tag", "nofp8"]) == 0
    out = capsys.readouterr().out
    assert "fp8: off" in out and "'fp8': False" in out
    monkeypatch.setattr(fp8, "unsupported_reason", lambda device: None)
    assert tb.main(TINY + ["--dry-run", "--fp8", "--model-tag", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "fp8: on, tensorwise: 12 linear layers (blocks.*.attn.c_q x2," in out and "'fp8': True" in out
    assert "kept in the compute dtype: blocks.*.attn.ve_gate, lm_head, smear_gate" in out
    assert tb.main(TINY + ["--num-iterations", "3", "--eval-every", "-1", "--fp8", "--model-tag", "fp8"]) == 0
    rows = metrics.read_metrics(ck.checkpoint_dir("base", "fp8"))
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows) and "val_bpb" in rows[-1]
    model, _, meta = models.load_model("base", "cpu", model_tag="fp8")
    assert meta["derived"]["fp8"] is True and meta["user_config"]["fp8"] is True
    assert not any(isinstance(m, fp8.FP8Linear) for m in model.modules())  # a plain model loads it
    saved = ck.load_checkpoint(ck.checkpoint_dir("base", "fp8"), 3)[0]
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)
