"""Inference weight formats (nanochat/quant.py): the int8 matmul against its definition, int8
models' size and outputs, and bf16 against fp32 greedy decoding of a trained model."""
import copy
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import make_model

from nanochat.models import load_model
from nanochat.dataset import iter_texts
from nanochat.engine import Engine, reference_generate
from nanochat.gpt import GPT, GPTConfig
from nanochat.quant import (KERNEL_MAX_ROWS, Int8Embedding, Int8Linear, int8_linear, prepare_for_inference, quantize_int8,
                            quantize_rows, reference_int8_linear, weight_bytes, weights_choice)


def test_quantize_rows_is_within_half_a_step():
    w = torch.randn(33, 70) * torch.rand(33, 1) * 5
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.is_contiguous() and scale.shape == (33,)
    assert int(q.abs().max()) == 127  # symmetric: each row's largest weight maps to +-127
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-6).all())


@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 3, 96), (40, 96)])
def test_int8_matmul_matches_reference(shape):
    """torch's kernel rounds x and the unscaled product to bf16 (2^-9 relative each), so
    |kernel - reference| <= 2^-8 (|x| @ |q|.T) scale; we allow 2^-7."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    q, scale = quantize_rows(torch.randn(80, 96))
    ones = torch.ones(80, dtype=torch.bfloat16)
    y, ref = int8_linear(x, q, scale, ones), reference_int8_linear(x, q, scale)
    assert y.shape == ref.shape == (*shape[:-1], 80) and y.dtype == torch.float32
    bound = (x.abs() @ q.float().abs().t()) * scale * 2 ** -7
    assert bool(((y - ref).abs() <= bound).all()), float(((y - ref).abs() / bound).max())
    if shape[0] <= KERNEL_MAX_ROWS:
        assert float((y - ref).abs().max()) > 0  # the kernel really ran in bf16, not the reference


def test_int8_modules_match_the_float_ones():
    torch.manual_seed(0)
    lin, emb = torch.nn.Linear(64, 48, bias=False), torch.nn.Embedding(100, 32)
    x, idx = torch.randn(5, 64), torch.tensor([[3, 99], [0, 3]])
    ql, qe = Int8Linear(lin), Int8Embedding(emb, torch.float32)
    # quantization error: at most half a step per weight
    assert torch.allclose(ql(x), lin(x), atol=float((x.abs().sum(1, keepdim=True) * ql.scale / 2 * 1.02).max()))
    assert torch.allclose(qe(idx), emb(idx), atol=float(qe.scale.max()) / 2 + 1e-6)
    assert torch.allclose(ql.weight, lin.weight, atol=float(ql.scale.max()) / 2 + 1e-6)


def _expected_int8_bytes(model):
    """fp32 model -> int8 bytes: each matrix and table 1 byte per weight + a 4-byte scale per
    row (+ 2 bytes of unit scales per Linear row for the kernel); the rest stays 4 bytes."""
    total = 0
    for name, p in model.named_parameters():
        quantized = p.dim() == 2 and "gate" not in name
        extra = 4 + (2 if not any(k in name for k in ("wte", "value_embeds")) else 0)
        total += p.numel() + p.size(0) * extra if quantized else p.numel() * 4
    return total


def test_int8_model_is_smaller_by_the_expected_factor_and_close():
    model = make_model(512, seed=3)
    fp32_bytes = weight_bytes(model.freeze())
    tokens = torch.randint(0, 512, (2, 12))
    ref = model(tokens)
    q = prepare_for_inference(copy.deepcopy(model), "int8", "cpu")
    assert weight_bytes(q) == _expected_int8_bytes(model)
    assert weight_bytes(q) / fp32_bytes < 0.3  # 1 byte of 4, plus per-row scales of 64-wide rows
    out = q(tokens)
    assert out.dtype == torch.float32
    # the big random weights of make_model give logits of size ~15 (the softcap); int8 moves them little
    assert float((out - ref).abs().mean()) < 0.05 * float(ref.abs().mean())
    # evaluation's chunked loss goes through the dequantized lm_head
    targets = torch.randint(0, 512, (2, 12))
    assert abs(float(q(tokens, targets)) - float(model(tokens, targets))) < 0.05 * float(model(tokens, targets))


def test_int8_model_stacks_q_k_v_into_one_product():
    """On CPU an int8 model multiplies each layer's q, k and v in one kernel call, as the fp32
    inference layout does, and gets exactly what the three separate int8 products give."""
    model = make_model(512, seed=4)
    q = prepare_for_inference(copy.deepcopy(model), "int8", "cpu")
    a = q.blocks[0].attn
    assert a.packed_qkv() is not None
    assert a.c_k.qweight.data_ptr() == a.c_q.qweight.data_ptr() + a.c_q.qweight.numel()  # views of one matrix
    assert weight_bytes(q) == _expected_int8_bytes(model)  # the views take no extra bytes
    separate_calls = []
    for block in q.blocks:
        for m in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
            m.register_forward_hook(lambda *_: separate_calls.append(1))
    tokens = torch.randint(0, 512, (1, 5))
    stacked = q(tokens)
    assert separate_calls == []  # one stacked product per layer, not c_q, c_k, c_v
    for block in q.blocks:  # the plain forward: c_q, c_k and c_v one by one
        block.attn.qkv_weight = block.attn.qkv_ptrs = None
    separate = q(tokens)
    assert len(separate_calls) == 3 * len(q.blocks)
    assert torch.equal(stacked, separate)


def test_int8_of_a_model_without_the_cpu_layout_keeps_three_products():
    """Off CPU a frozen model has no stacked q/k/v (GPT.freeze lays it out on CPU only): int8
    then quantizes c_q, c_k and c_v one by one, with the same values as the stacked form."""
    model = make_model(512, seed=4)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    plain = quantize_int8(copy.deepcopy(model), torch.float32)  # as a CUDA model would get it
    assert not hasattr(plain.blocks[0].attn, "qkv_weight")
    stacked = prepare_for_inference(copy.deepcopy(model), "int8", "cpu")
    for a, b in zip(plain.blocks, stacked.blocks):
        for name in ("c_q", "c_k", "c_v"):
            assert torch.equal(getattr(a.attn, name).qweight, getattr(b.attn, name).qweight)
            assert torch.equal(getattr(a.attn, name).scale, getattr(b.attn, name).scale)
    tokens = torch.randint(0, 512, (1, 5))
    assert torch.equal(plain(tokens), stacked(tokens))


def test_weights_choice_default_follows_the_compute_dtype(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    assert weights_choice(None, "cpu")[:2] == ("fp32", torch.float32)
    assert weights_choice("int8", "cpu")[:2] == ("int8", torch.float32)
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    assert weights_choice(None, "cpu")[:2] == ("bf16", torch.bfloat16)
    assert weights_choice("fp32", "cpu")[:2] == ("fp32", torch.float32)


def _trained_tiny_model(tokenizer, steps=150):
    """A 2-layer, 64-wide GPT trained (AdamW, a few seconds) on the first documents of the real
    pretraining shards, so that its greedy choices are decided by clear margins."""
    bos = tokenizer.get_bos_token_id()
    stream = []
    for text in iter_texts("train"):
        stream += tokenizer.encode(text, prepend=bos)
        if len(stream) > 40_000:
            break
    data = torch.tensor(stream)
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                    n_embd=64, window_pattern="L")
    model = GPT(cfg)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (16,))
        batch = torch.stack([data[s:s + 65] for s in starts.tolist()])
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, loss.item()


def test_bf16_and_int8_decode_like_fp32_on_a_trained_model(tokenizer):
    """Greedy tokens of a trained tiny model: after each prefix of fp32's greedy sequence, bf16
    weights pick fp32's token wherever fp32's top two logits are further apart than twice what
    bf16 moves a logit; int8 decodes through the engine."""
    trained, loss = _trained_tiny_model(tokenizer)
    assert loss < 6.0  # it learned something (ln 1024 = 6.93 at the start)
    state = trained.state_dict()
    bos = tokenizer.get_bos_token_id()
    n = 16
    prompt = tokenizer.encode("The capital of France is", prepend=bos)

    def loaded(weights):
        m = GPT(trained.config)
        m.load_state_dict(state)
        return prepare_for_inference(m, weights, "cpu")

    fp32, bf16 = loaded("fp32"), loaded("bf16")
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    seq = torch.tensor([prompt + list(reference_generate(fp32, prompt, n, temperature=0.0))])
    # each model's greedy choice after every prefix of fp32's greedy sequence (one forward each)
    ref, low = fp32(seq)[0, len(prompt) - 1:-1], bf16(seq)[0, len(prompt) - 1:-1]
    assert torch.equal(ref.argmax(-1), seq[0, len(prompt):])  # a full forward picks what generate picked
    top = torch.topk(ref, 2).values
    decided = (top[:, 0] - top[:, 1]) > 0.2  # bf16 moves these logits by < 0.1 (asserted below)
    assert float((low - ref).abs().max()) < 0.1
    assert int(decided.sum()) >= n // 2, f"the trained model's greedy choices are near ties: {top}"
    assert torch.equal(low.argmax(-1)[decided], ref.argmax(-1)[decided])
    int8 = loaded("int8")
    rows, _ = Engine(int8, tokenizer).generate_batch(prompt, num_samples=2, max_tokens=n, temperature=0.0)
    assert all(len(r) > len(prompt) for r in rows) and rows[0] == rows[1]


def nanochat(*args):
    r = subprocess.run([sys.executable, "-m", "nanochat", *args], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_eval_base_and_chat_take_the_weight_format(base_checkpoint, tokenizer):
    bpb = {}
    for weights in ("fp32", "int8"):
        out = nanochat("eval", "base", "--eval", "bpb", "--split-tokens", "1024", "--device-batch-size", "2",
                       "--device-type", "cpu", "--weights", weights)
        assert f"weights {weights} (activations fp32" in out  # the startup line
        bpb[weights] = float(re.search(r"val bpb: ([0-9.]+)", out).group(1))
    assert bpb["int8"] == pytest.approx(bpb["fp32"], rel=0.01)
    # the fixture's tag: other tests add base models to the same folder, and -i picks the largest
    reply = nanochat("chat", "-i", "base", "--model-tag", base_checkpoint.tag, "-p", "Hello", "-t", "0",
                     "--max-tokens", "8", "--weights", "int8", "--device-type", "cpu")
    model, tok, _ = load_model("base", "cpu", model_tag=base_checkpoint.tag, weights="int8")
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "Hello"}]})
    rows, _ = Engine(model, tok).generate_batch(prompt, max_tokens=8, temperature=0)
    assert reply == tok.decode(rows[0][len(prompt):]) + "\n"
    bad = subprocess.run([sys.executable, "-m", "nanochat", "chat", "-p", "hi", "--weights", "int4"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--weights" in bad.stderr
