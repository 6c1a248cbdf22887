"""The model: shapes, parameter counts, training signal, and that every fast path (chunked loss,
activation checkpointing, KV cache) computes the same thing as the plain path. Tiny fp32 models."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as flex

import nanochat.attention as attn
from nanochat.attention import KVCache
from nanochat.gpt import GPT, GPTConfig

V = 300  # vocabulary used directly in the config: no tokenizer needed


def make_model(seed=0, randomize=True, **kw):
    cfg = dict(sequence_len=64, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
               window_pattern="SL", short_window=8)
    cfg.update(kw)
    config = GPTConfig(**cfg)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    if randomize:
        # the real init zeroes the output projections (blocks start as the identity), which would
        # make attention invisible in the equivalence tests: give every weight some signal
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and "wte" not in name and "value_embeds" not in name:
                    p.normal_(0.0, 0.3 / math.sqrt(p.size(1)) if "lm_head" not in name else 0.1)
                    if "lm_head" in name:
                        p.mul_(20)  # spread the logits so argmax has no near-ties
                elif p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
    return model


def expected_param_count(c: GPTConfig):
    C, V_, L = c.n_embd, c.vocab_size, c.n_layer
    D = C // c.n_head
    kv = c.n_kv_head * D
    per_layer = C * c.n_head * D + 2 * C * kv + c.n_head * D * C + 2 * 4 * C * C
    n_ve = sum(1 for i in range(L) if i % 2 == (L - 1) % 2)
    return dict(wte=V_ * C, lm_head=V_ * C, value_embeds=n_ve * V_ * kv,
                transformer_matrices=L * per_layer,
                scalars=2 * L + n_ve * min(32, C) * c.n_kv_head)


@pytest.mark.parametrize("depth,n_head,n_kv_head,n_embd", [(1, 2, 2, 64), (2, 4, 2, 64), (3, 4, 1, 128), (4, 8, 4, 128)])
def test_param_counts_and_shapes(depth, n_head, n_kv_head, n_embd):
    model = make_model(n_layer=depth, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd, randomize=False)
    want = expected_param_count(model.config)
    got = model.num_params_by_category()
    for k, v in want.items():
        assert got[k] == v, k
    assert got["total"] == sum(want.values()) == sum(p.numel() for p in model.parameters())
    # value embeddings on alternating layers, always the last one
    assert str(depth - 1) in model.value_embeds
    assert len(model.value_embeds) == (depth + 1) // 2
    assert all(b.attn.c_q.bias is None and b.mlp.c_fc.bias is None for b in model.blocks)
    assert model.lm_head.weight.data_ptr() != model.wte.weight.data_ptr()
    idx = torch.randint(0, V, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, V) and logits.dtype == torch.float32
    loss = model(idx, targets=idx)
    assert loss.shape == () and torch.isfinite(loss)


def test_init_meta_device_no_nans_and_seeded():
    a = make_model(seed=3, randomize=False, n_layer=3)
    b = make_model(seed=3, randomize=False, n_layer=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, q), name
    assert all(p.device.type == "cpu" for p in a.parameters())
    # output projections start at zero, the residual scalars at their documented values
    assert all((blk.attn.c_proj.weight == 0).all() and (blk.mlp.c_proj.weight == 0).all() for blk in a.blocks)
    assert (a.resid_lambdas == 1).all() and torch.allclose(a.x0_lambdas, torch.full((3,), 0.1))
    idx = torch.randint(0, V, (2, 32))
    loss = a(idx, targets=idx)
    # near-uniform predictions at init
    assert abs(loss.item() - math.log(V)) < 0.1
    assert torch.isfinite(a(idx)).all()


def test_softcap_and_loss_reductions():
    model = make_model()
    idx = torch.randint(0, V, (3, 20))
    logits = model(idx)
    assert logits.abs().max() <= 15.0
    targets = torch.randint(0, V, (3, 20))
    targets[0, :5] = -1
    targets[2, 7] = -1
    per_tok = model(idx, targets=targets, loss_reduction="none")
    assert per_tok.shape == (3, 20)
    assert (per_tok[targets == -1] == 0).all() and (per_tok[targets != -1] > 0).all()
    n = (targets != -1).sum()
    torch.testing.assert_close(model(idx, targets=targets, loss_reduction="sum"), per_tok.sum())
    torch.testing.assert_close(model(idx, targets=targets), per_tok.sum() / n)
    with pytest.raises(ValueError):
        model(idx, targets=targets, loss_reduction="max")


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = make_model(randomize=False, sequence_len=32)
    idx = torch.randint(0, V, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    first = None
    for _ in range(50):
        loss = model(x, targets=y)
        first = first if first is not None else loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    final = model(x, targets=y).item()
    assert first > 5.0 and final < 1.0, (first, final)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_loss_equals_full_loss(reduction):
    model = make_model()
    idx = torch.randint(0, V, (3, 21))
    targets = torch.randint(0, V, (3, 21))
    targets[1, 3:9] = -1

    def run(chunked):
        model.zero_grad(set_to_none=True)
        if chunked:
            model.loss_chunk_rows = 10  # 63 rows -> 7 chunks, the last one short
            loss = model(idx, targets=targets, loss_reduction=reduction)
        else:
            logits = model(idx)  # the plain path: full fp32 logits, then cross-entropy
            loss = F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1,
                                   reduction=reduction)
            if reduction == "none":
                loss = loss.view(3, 21)
        weights = torch.linspace(0.5, 1.5, 63).view(3, 21) if reduction == "none" else 1.0
        (loss * weights).sum().backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    full, full_grads = run(False)
    chunked, chunked_grads = run(True)
    assert model.loss_chunk_rows < 63
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    for name in full_grads:
        # fp32 round-off relative to the gradient's scale (the fused path computes tanh as
        # 2 sigmoid(2u) - 1: same fp32 accuracy against an fp64 reference, different rounding)
        scale = full_grads[name].abs().max().item()
        torch.testing.assert_close(chunked_grads[name], full_grads[name], rtol=1e-4, atol=2e-6 * max(scale, 1.0),
                                   msg=name)
    # without grads (evaluation) the chunked path gives the same numbers
    with torch.no_grad():
        torch.testing.assert_close(model(idx, targets=targets, loss_reduction=reduction), full, rtol=1e-5, atol=1e-6)


def test_fused_loss_workspace_reused_across_calls():
    """On CPU the fused loss keeps its (rows, vocab) buffers between calls: calls of other sizes
    in between (the workspace grows, then is reused) must not change a result."""
    model = make_model()
    a_idx, a_tgt = torch.randint(0, V, (2, 16)), torch.randint(0, V, (2, 16))
    b_idx, b_tgt = torch.randint(0, V, (4, 30)), torch.randint(0, V, (4, 30))

    def grads(idx, tgt, chunk=None):
        model.loss_chunk_rows = chunk
        model.zero_grad(set_to_none=True)
        loss = model(idx, targets=tgt)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    l0, g0 = grads(a_idx, a_tgt)
    grads(b_idx, b_tgt)            # 120 rows in one chunk: the workspace grows
    grads(b_idx, b_tgt, chunk=7)   # short chunks in the larger workspace
    l1, g1 = grads(a_idx, a_tgt)
    assert torch.equal(l0, l1)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name
    with torch.no_grad():  # and it is the plain cross-entropy
        plain = F.cross_entropy(model(a_idx).view(-1, V), a_tgt.view(-1))
    torch.testing.assert_close(l0, plain, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_same_gradients():
    model = make_model(n_layer=3, window_pattern="SSL")
    idx = torch.randint(0, V, (2, 24))

    def grads(flag):
        model.checkpoint_activations = flag
        model.zero_grad(set_to_none=True)
        loss = model(idx, targets=idx)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    l0, g0 = grads(False)
    l1, g1 = grads(True)
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_layer_windows():
    c = GPTConfig(sequence_len=64, vocab_size=V, n_layer=6, n_head=2, n_kv_head=2, n_embd=32, window_pattern="SSL")
    assert c.short_window == 16  # default: sequence_len // 4
    assert c.layer_windows() == [16, 16, None, 16, 16, None]
    c = GPTConfig(sequence_len=64, vocab_size=V, n_layer=3, n_head=2, n_kv_head=2, n_embd=32, window_pattern="S",
                  short_window=5)
    assert c.layer_windows() == [5, 5, None]  # the last layer is always full
    with pytest.raises(ValueError):
        GPTConfig(n_layer=2, window_pattern="SXL")
    with pytest.raises(ValueError):
        GPTConfig(n_head=6, n_kv_head=4)


def test_sliding_window_blocks_influence_beyond_window():
    w = 5
    model = make_model(n_layer=2, window_pattern="SL", short_window=w)
    model.eval()
    outs = {}
    model.blocks[0].register_forward_hook(lambda mod, inp, out: outs.__setitem__("b0", out.detach()))
    idx = torch.randint(0, V, (1, 16))
    logits = model(idx)
    base = outs["b0"]
    idx2 = idx.clone()
    idx2[0, 2] = (idx[0, 2] + 1) % V  # perturb the token at position 2
    logits2 = model(idx2)
    diff = (outs["b0"] - base).abs().amax(dim=-1)[0]  # per position, after the windowed layer
    assert (diff[:2] == 0).all()                 # causal: earlier positions untouched
    assert (diff[2:2 + w] > 1e-4).all()           # inside the window (positions 2..6): influenced
    assert (diff[2 + w:] == 0).all()              # beyond the window: no influence at all
    # the last layer has full context, so the logits far away do change
    assert (logits2[0, -1] - logits[0, -1]).abs().max() > 1e-4
    # and a full-context model lets the perturbation reach every later position of layer 0
    full = make_model(n_layer=2, window_pattern="L")
    full.blocks[0].register_forward_hook(lambda mod, inp, out: outs.__setitem__("b0", out.detach()))
    full(idx)
    base = outs["b0"]
    full(idx2)
    assert ((outs["b0"] - base).abs().amax(dim=-1)[0, 2:] > 1e-4).all()


# ---------------------------------------------------------------------------
# KV cache

CACHE_CONFIGS = [
    dict(window_pattern="L", n_kv_head=4),
    dict(window_pattern="SL", short_window=6, n_kv_head=2),
    dict(window_pattern="SSL", short_window=4, n_kv_head=1, n_layer=3),
]


def new_cache(model, batch, max_len=64):
    c = model.config
    return KVCache(batch, c.n_layer, c.n_kv_head, c.n_embd // c.n_head, max_len, "cpu", torch.float32)


@pytest.mark.parametrize("cfg", CACHE_CONFIGS)
def test_kv_cache_prefill_then_decode_matches_full_forward(cfg):
    model = make_model(**cfg)
    model.eval()
    idx = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        ref = model(idx)
        cache = new_cache(model, 2, max_len=24)
        outs = [model(idx[:, :9], kv_cache=cache)]          # prefill 9 tokens
        outs.append(model(idx[:, 9:12], kv_cache=cache))    # a 3-token chunk
        for t in range(12, 20):                             # then one token at a time
            outs.append(model(idx[:, t:t + 1], kv_cache=cache))
    assert cache.lengths.tolist() == [20, 20]
    torch.testing.assert_close(torch.cat(outs, dim=1), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        model(idx[:, :5], kv_cache=cache)  # 25 > max_len 24


@pytest.mark.parametrize("cfg", CACHE_CONFIGS)
def test_kv_cache_static_kv_len_and_logits_positions(cfg):
    """kv_len given by the caller (no host sync): exact, or the whole cache (static shapes), gives
    the same logits as the synced path; logits_positions picks rows' positions before lm_head."""
    model = make_model(**cfg)
    model.eval()
    idx = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        ref = model(idx)
        lengths = torch.tensor([7, 12])
        # (lm_head over fewer rows may round differently: close, not bitwise equal)
        torch.testing.assert_close(model(idx, logits_positions=lengths - 1), ref[torch.arange(2), lengths - 1],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(idx, logits_positions=-1), ref[:, -1], rtol=1e-5, atol=1e-5)
        for static in (False, True):
            cache = new_cache(model, 2, max_len=24)
            # right-padded prefill of rows of lengths 7 and 12, then lengths reset (as the engine does)
            first = model(idx[:, :12], kv_cache=cache, kv_len=24 if static else 12, logits_positions=lengths - 1)
            torch.testing.assert_close(first, ref[torch.arange(2), lengths - 1], rtol=1e-5, atol=1e-5)
            cache.lengths.copy_(lengths)
            pos = lengths.clone()
            for step in range(6):  # decode: each row continues its own sequence at its own position
                tok = idx[torch.arange(2), pos][:, None]
                kv_len = 24 if static else int(pos.max()) + 1
                out = model(tok, kv_cache=cache, kv_len=kv_len, logits_positions=-1)
                torch.testing.assert_close(out, ref[torch.arange(2), pos], rtol=1e-5, atol=1e-5)
                pos += 1
            assert cache.lengths.tolist() == pos.tolist()
        with pytest.raises(ValueError):
            model(idx[:, :1], kv_cache=cache, kv_len=25)  # beyond max_len 24


@pytest.mark.parametrize("cfg", CACHE_CONFIGS[1:])
def test_kv_cache_rows_of_different_lengths(cfg):
    model = make_model(**cfg)
    model.eval()
    a = torch.randint(0, V, (1, 18))
    b = torch.randint(0, V, (1, 18))
    with torch.no_grad():
        ref_a, ref_b = model(a), model(b)
        cache = new_cache(model, 3)
        # row 0 holds a (prefill 5), row 2 holds b (prefill 11) through narrow views; row 1 unused
        model(a[:, :5], kv_cache=cache.narrow(0, 1))
        model(b[:, :11], kv_cache=cache.narrow(2, 1))
        assert cache.lengths.tolist() == [5, 0, 11]
        # now advance rows 0 and 2 together, each at its own position
        # rows 0 and 2 are not contiguous: step them in a 3-row batch (row 1 takes filler tokens)
        filler = torch.zeros(1, 1, dtype=torch.long)
        got_a, got_b = [], []
        for step in range(7):
            batch = torch.cat([a[:, 5 + step:6 + step], filler, b[:, 11 + step:12 + step]])
            out = model(batch, kv_cache=cache)
            got_a.append(out[0:1])
            got_b.append(out[2:3])
        assert cache.lengths.tolist() == [12, 7, 18]
        torch.testing.assert_close(torch.cat(got_a, 1), ref_a[:, 5:12], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat(got_b, 1), ref_b[:, 11:18], rtol=1e-5, atol=1e-5)
        # a multi-token append to rows of different lengths (rows 0 and 1 through a 2-row view)
        two = cache.narrow(0, 2)
        out = model(torch.cat([a[:, 12:15], b[:, :3]]), kv_cache=two)
        torch.testing.assert_close(out[0:1], ref_a[:, 12:15], rtol=1e-5, atol=1e-5)
        assert cache.lengths.tolist() == [15, 10, 18]  # the view's writes went through
        # reset of a view empties only its rows
        cache.narrow(2, 1).reset()
        assert cache.lengths.tolist() == [15, 10, 0]
        torch.testing.assert_close(model(b[:, :4], kv_cache=cache.narrow(2, 1)), ref_b[:, :4], rtol=1e-5, atol=1e-5)


def test_kv_cache_fork_and_copy_row():
    model = make_model(window_pattern="SL", short_window=6)
    model.eval()
    prompt = torch.randint(0, V, (1, 10))
    conts = torch.randint(0, V, (3, 6))
    with torch.no_grad():
        cache = new_cache(model, 3)
        model(prompt, kv_cache=cache.narrow(0, 1))  # prefill once in row 0
        cache.fork(0, [1, 2])
        assert cache.lengths.tolist() == [10, 10, 10]
        outs = [model(conts[:, t:t + 1], kv_cache=cache) for t in range(6)]
        got = torch.cat(outs, 1)
        for r in range(3):
            ref = model(torch.cat([prompt, conts[r:r + 1]], 1))[:, 10:]
            torch.testing.assert_close(got[r:r + 1], ref, rtol=1e-5, atol=1e-5)
        # copy_row: row 1 becomes row 2, continuing row 1 now continues row 2's sequence
        cache.copy_row(2, 1)
        nxt = torch.randint(0, V, (1, 1))
        out1 = model(nxt, kv_cache=cache.narrow(1, 1))
        ref = model(torch.cat([prompt, conts[2:3], nxt], 1))[:, -1:]
        torch.testing.assert_close(out1, ref, rtol=1e-5, atol=1e-5)
        cache.reset()
        assert cache.lengths.tolist() == [0, 0, 0]


# ---------------------------------------------------------------------------
# generate, flops, optimizer groups

def test_generate_is_deterministic_with_a_seed():
    model = make_model()
    prompt = [1, 2, 3, 4]
    a = list(model.generate(prompt, 12, temperature=1.0, seed=7))
    b = list(model.generate(prompt, 12, temperature=1.0, seed=7))
    c = list(model.generate(prompt, 12, temperature=1.0, seed=8))
    assert a == b and len(a) == 12 and all(isinstance(t, int) and 0 <= t < V for t in a)
    assert a != c
    # top_k=1 is greedy whatever the temperature
    greedy = list(model.generate(prompt, 12, temperature=0.0))
    assert list(model.generate(prompt, 12, temperature=1.0, top_k=1, seed=123)) == greedy


def test_greedy_generate_matches_argmax_of_full_forward():
    model = make_model(window_pattern="SL", short_window=4)
    prompt = [5, 17, 42, 99, 250]
    out = list(model.generate(prompt, 15, temperature=0.0))
    seq = torch.tensor([prompt + out])
    with torch.no_grad():
        pred = model(seq).argmax(-1)[0]
    # the token at position t+1 is the argmax of the logits at position t
    assert pred[len(prompt) - 1:-1].tolist() == out


def test_estimate_flops():
    c = dict(sequence_len=64, n_layer=4, n_head=4, n_kv_head=4, n_embd=64)
    full = make_model(randomize=False, window_pattern="L", **c)
    win = make_model(randomize=False, window_pattern="SSSL", short_window=16, **c)
    counts = full.num_params_by_category()
    n = counts["total"] - counts["wte"] - counts["value_embeds"]
    D = 64 // 4
    assert full.estimate_flops() == 6 * n + 4 * 12 * D * 4 * 64
    assert win.estimate_flops() == 6 * n + (3 * 12 * D * 4 * 16 + 12 * D * 4 * 64)
    assert win.estimate_flops() < full.estimate_flops()
    # the dominant term is 6 x the matmul parameters
    assert 6 * n < full.estimate_flops() < 6 * counts["total"] + 4 * 12 * D * 4 * 64


def test_optimizer_groups():
    model = make_model(randomize=False, n_layer=3, n_embd=128, n_head=4, n_kv_head=2)
    groups = model.optimizer_groups(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, scalar_lr=0.5,
                                    weight_decay=0.1)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each exactly once
    scale = (128 / 768) ** -0.5
    adamw = [g for g in groups if g["kind"] == "adamw"]
    muon = [g for g in groups if g["kind"] == "muon"]
    assert sorted(round(g["lr"] / scale, 6) for g in adamw[:2]) == [0.004, 0.2]
    assert adamw[2]["lr"] == 0.5 and adamw[3]["lr"] == 0.005  # scalars are not width-scaled
    for g in adamw:
        assert g["betas"] == (0.8, 0.95) and g["eps"] == 1e-10 and g["weight_decay"] == 0.0
    assert any(model.lm_head.weight is p for g in adamw for p in g["params"])
    shapes = set()
    for g in muon:
        assert g["lr"] == 0.02 and g["momentum"] == 0.95 and g["weight_decay"] == 0.1
        assert len({tuple(p.shape) for p in g["params"]}) == 1
        assert all(p.dim() == 2 for p in g["params"])
        shapes.add(tuple(g["params"][0].shape))
    assert len(shapes) == len(muon)  # one group per distinct shape
    assert {(128, 128), (64, 128), (512, 128), (128, 512)} == shapes
    assert all(g["initial_lr"] == g["lr"] for g in groups)


def test_setup_optimizer_trains():
    # the real MuonAdamW over the model's groups: a few steps on one batch lower the loss
    model = make_model(randomize=False, sequence_len=32)
    opt = model.setup_optimizer()
    idx = torch.randint(0, V, (4, 33))
    losses = []
    for _ in range(25):
        loss = model(idx[:, :-1], targets=idx[:, 1:])
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_sliding_window_path(monkeypatch):
    # the CUDA path for windows (FlexAttention block masks), run here with the eager (uncompiled)
    # FlexAttention on CPU, forward only (CPU FlexAttention has no backward): same logits as the
    # SDPA boolean-mask path
    model = make_model(n_layer=3, window_pattern="SSL", short_window=5, n_kv_head=2)
    model.eval()
    idx = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        ref = model(idx)
        monkeypatch.setattr(attn, "use_flex", lambda device: True)
        monkeypatch.setattr(attn, "_flex_fn", flex.flex_attention)
        monkeypatch.setattr(attn, "_block_masks", {})
        got = model(idx)
    assert list(attn._block_masks) == [(24, 5, "cpu")]  # the block mask was built once and used
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_all_ignored_targets_give_zero_loss_not_nan():
    model = make_model()
    idx = torch.randint(0, V, (2, 8))
    targets = torch.full((2, 8), -1)
    loss = model(idx, targets=targets)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() and (p.grad == 0).all() for p in model.parameters() if p.grad is not None)
