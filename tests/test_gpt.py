"""The model: shapes, parameter counts, training signal, and that every fast path (chunked loss,
activation checkpointing, KV cache) computes the same thing as the plain path. Tiny fp32 models."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as flex

import nanochat.attention as attn
from nanochat.attention import KVCache
from nanochat.engine import reference_generate
from nanochat.gpt import GPT, GPTConfig
from nanochat.inference_layout import use_inference_layout
from nanochat.optim import gpt_param_groups

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
    # the value-embedding gates (12 channels -> n_kv_head) live in the blocks; the smear gate
    # (24 -> 1), smear_lambda and backout_lambda are model-level scalars
    return dict(wte=V_ * C, lm_head=V_ * C, value_embeds=n_ve * V_ * kv,
                transformer_matrices=L * per_layer + n_ve * 12 * c.n_kv_head,
                scalars=2 * L + 24 + 1 + 1)


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
    torch.testing.assert_close(a.resid_lambdas.data, torch.tensor([1.15, 1.10, 1.05]))
    torch.testing.assert_close(a.x0_lambdas.data, torch.tensor([0.20, 0.125, 0.05]))
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
    model = make_model(n_layer=3)  # (with 2 layers there is no backout, and no backout_lambda gradient)
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
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, full_grads = run(False)
    chunked, chunked_grads = run(True)
    assert model.loss_chunk_rows < 63
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    assert chunked_grads.keys() == full_grads.keys()
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
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    l0, g0 = grads(a_idx, a_tgt)
    grads(b_idx, b_tgt)            # 120 rows in one chunk: the workspace grows
    grads(b_idx, b_tgt, chunk=7)   # short chunks in the larger workspace
    l1, g1 = grads(a_idx, a_tgt)
    assert torch.equal(l0, l1) and g0.keys() == g1.keys()
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
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    l0, g0 = grads(False)
    l1, g1 = grads(True)
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    assert g0.keys() == g1.keys()
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


@pytest.mark.parametrize("smear", [False, True])
def test_sliding_window_blocks_influence_beyond_window(smear):
    w = 5
    # the smear carries token 2 into position 3's embedding: the window then reaches one further
    reach = w + 1 if smear else w
    model = make_model(n_layer=2, window_pattern="SL", short_window=w)
    with torch.no_grad():  # no smear: its lambda at 0
        model.smear_lambda.fill_(0.5 if smear else 0.0)
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
    assert (diff[2:2 + reach] > 1e-4).all()       # inside the window (positions 2..6, or ..7): influenced
    assert (diff[2 + reach:] == 0).all()          # beyond the window: no influence at all
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
    return KVCache(batch, c.n_layer, c.n_kv_head, c.n_embd // c.n_head, max_len, "cpu", torch.float32,
                   keep_tokens=True)


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
        rows = torch.arange(2)
        torch.testing.assert_close(model(idx, logits_positions=(rows, lengths - 1)), ref[rows, lengths - 1],
                                   rtol=1e-5, atol=1e-5)
        for static in (False, True):
            cache = new_cache(model, 2, max_len=24)
            # right-padded prefill of rows of lengths 7 and 12, then lengths reset (as the engine does)
            first = model(idx[:, :12], kv_cache=cache, kv_len=24 if static else 12, logits_positions=(rows, lengths - 1))
            torch.testing.assert_close(first, ref[torch.arange(2), lengths - 1], rtol=1e-5, atol=1e-5)
            cache.lengths.copy_(lengths)
            pos = lengths.clone()
            for step in range(6):  # decode: each row continues its own sequence at its own position
                tok = idx[torch.arange(2), pos][:, None]
                kv_len = 24 if static else int(pos.max()) + 1
                out = model(tok, kv_cache=cache, kv_len=kv_len, logits_positions=(rows, torch.zeros_like(rows)))
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
    a = list(reference_generate(model, prompt, 12, temperature=1.0, seed=7))
    b = list(reference_generate(model, prompt, 12, temperature=1.0, seed=7))
    c = list(reference_generate(model, prompt, 12, temperature=1.0, seed=8))
    assert a == b and len(a) == 12 and all(isinstance(t, int) and 0 <= t < V for t in a)
    assert a != c
    # top_k=1 is greedy whatever the temperature
    greedy = list(reference_generate(model, prompt, 12, temperature=0.0))
    assert list(reference_generate(model, prompt, 12, temperature=1.0, top_k=1, seed=123)) == greedy


def test_greedy_generate_matches_argmax_of_full_forward():
    model = make_model(window_pattern="SL", short_window=4)
    prompt = [5, 17, 42, 99, 250]
    out = list(reference_generate(model, prompt, 15, temperature=0.0))
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
    # every Linear weight: lm_head, the blocks (value-embedding gates included), the smear gate;
    # not the tables (lookups) nor the per-layer scalars
    n = counts["lm_head"] + counts["transformer_matrices"] + 24
    assert n == full.num_matmul_params()
    assert n == sum(p.numel() for name, p in full.named_parameters() if p.dim() == 2) - counts["wte"] - counts["value_embeds"]
    D = 64 // 4
    assert full.estimate_flops() == 6 * n + 4 * 12 * D * 4 * 64
    assert win.estimate_flops() == 6 * n + (3 * 12 * D * 4 * 16 + 12 * D * 4 * 64)
    assert win.estimate_flops() < full.estimate_flops()
    # the dominant term is 6 x the matmul parameters
    assert 6 * n < full.estimate_flops() < 6 * counts["total"] + 4 * 12 * D * 4 * 64


def test_optimizer_groups():
    """Membership and hyperparameters of every group, as upstream nanochat's setup_optimizer."""
    model = make_model(randomize=False, n_layer=3, n_embd=128, n_head=4, n_kv_head=2)
    groups = gpt_param_groups(model, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, scalar_lr=0.5,
                                    weight_decay=0.1)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each exactly once
    scale = (128 / 768) ** -0.5
    adamw = [g for g in groups if g["kind"] == "adamw"]
    muon = [g for g in groups if g["kind"] == "muon"]

    def group_of(p):
        (g,) = [g for g in groups if any(q is p for q in g["params"])]
        return g
    want = {  # parameter -> (lr, betas, weight decay)
        "lm_head": ([model.lm_head.weight], 0.004 * scale, (0.8, 0.96), 0.01),
        "wte": ([model.wte.weight], 0.2 * scale, (0.8, 0.995), 0.001),
        "value_embeds": (list(model.value_embeds.parameters()), 0.2 * scale * 0.5, (0.8, 0.995), 0.01),
        "resid": ([model.resid_lambdas], 0.5 * 0.01, (0.8, 0.95), 0.05),
        "x0": ([model.x0_lambdas], 0.5, (0.96, 0.95), 0.0),
        "smear/backout": ([model.smear_gate.weight, model.smear_lambda, model.backout_lambda], 0.2, (0.8, 0.95), 0.0),
    }
    assert len(adamw) == len(want)
    for name, (params, lr, betas, wd) in want.items():
        g = group_of(params[0])
        assert g["kind"] == "adamw" and len(g["params"]) == len(params), name
        assert all(group_of(p) is g for p in params), name
        assert g["lr"] == pytest.approx(lr, rel=1e-12) and g["betas"] == betas and g["weight_decay"] == wd, name
        assert g["eps"] == 1e-10
    shapes = set()
    for g in muon:
        assert g["lr"] == 0.02 and g["momentum"] == 0.95 and g["beta2"] == 0.9 and g["ns_steps"] == 5
        assert g["weight_decay"] == 0.1
        assert len({tuple(p.shape) for p in g["params"]}) == 1
        assert all(p.dim() == 2 for p in g["params"])
        shapes.add(tuple(g["params"][0].shape))
    assert len(shapes) == len(muon)  # one group per distinct shape
    # c_q/c_proj, c_k/c_v, c_fc, mlp c_proj, and the value-embedding gates (2 kv heads x 12 channels)
    assert {(128, 128), (64, 128), (512, 128), (128, 512), (2, 12)} == shapes
    gates = [b.attn.ve_gate.weight for b in model.blocks if b.attn.ve_gate is not None]
    assert len(gates) == 2 and all(group_of(w)["kind"] == "muon" and len(group_of(w)["params"]) == 2 for w in gates)
    assert sum(len(g["params"]) for g in muon) == len(list(model.blocks.parameters()))
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


# ---------------------------------------------------------------------------
# smear, backout, q/k scale, value-embedding gate, init (upstream nanochat's architecture)

def test_smear_math_on_a_tiny_tensor():
    model = make_model(randomize=False)
    with torch.no_grad():
        model.smear_gate.weight.fill_(0.01)
        model.smear_lambda.fill_(0.5)
    # three positions, each a constant vector: 1, 2, -1 (C = 64, the gate sees 24 channels)
    x = torch.tensor([1.0, 2.0, -1.0])[None, :, None].expand(1, 3, 64).contiguous()
    prev = torch.cat([torch.zeros(1, 1, 64), x[:, :-1]], dim=1)
    with torch.no_grad():
        out = model._smear(x, prev)
    sig = lambda z: 1 / (1 + math.exp(-z))
    # gate_t = sigmoid(0.01 * 24 * x_t): it reads the current token; x[t] += 0.5 * gate_t * x[t-1]
    want = [1.0, 2.0 + 0.5 * sig(0.48) * 1.0, -1.0 + 0.5 * sig(-0.24) * 2.0]
    for t in range(3):
        assert torch.allclose(out[0, t], torch.full((64,), want[t]), atol=1e-6), t


def _block_inputs(model, idx):
    """The residual stream entering each block (forward pre-hooks)."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone())) for b in model.blocks]
    try:
        with torch.no_grad():
            logits = model(idx)
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


def test_forward_smears_the_previous_token_embedding():
    model = make_model(n_layer=3)
    with torch.no_grad():
        model.smear_lambda.fill_(1.3)
    idx = torch.randint(0, V, (2, 10))
    seen, _ = _block_inputs(model, idx)
    with torch.no_grad():
        e = F.rms_norm(model.wte(idx), (64,))
        gate = torch.sigmoid(e[..., :24] @ model.smear_gate.weight.t())  # (B, T, 1)
        x0 = e.clone()
        x0[:, 1:] += 1.3 * gate[:, 1:] * e[:, :-1]
        # block 0 sees resid_lambdas[0] * x0 + x0_lambdas[0] * x0
        want = (model.resid_lambdas[0] + model.x0_lambdas[0]) * x0
    torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=1e-6)
    # at smear_lambda 0 (its init) the embedding goes in exactly unsmeared
    with torch.no_grad():
        model.smear_lambda.zero_()
    seen_off, _ = _block_inputs(model, idx)
    torch.testing.assert_close(seen_off[0], (model.resid_lambdas[0] + model.x0_lambdas[0]).detach() * e,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_layer", [1, 2, 3, 4])
def test_backout_subtracts_the_middle_residual(n_layer):
    model = make_model(n_layer=n_layer)
    # with 1 or 2 layers the middle layer is the last: no backout there (docs/model.md)
    assert model.backout_layer() == (n_layer // 2 if n_layer > 2 else None)
    with torch.no_grad():
        model.backout_lambda.fill_(0.35)
    idx = torch.randint(0, V, (2, 12))
    outs = []
    hooks = [b.register_forward_hook(lambda m, args, out: outs.append(out.detach().clone())) for b in model.blocks]
    with torch.no_grad():
        logits = model(idx)
    for h in hooks:
        h.remove()
    mid = outs[n_layer // 2] if n_layer > 2 else torch.zeros_like(outs[-1])  # after layer n_layer // 2
    with torch.no_grad():
        x = F.rms_norm(outs[-1] - 0.35 * mid, (64,))
        want = 15 * torch.tanh((x @ model.lm_head.weight.t()) / 15)
        assert torch.allclose(logits, want, rtol=1e-5, atol=1e-5)
        # at backout_lambda 0: no subtraction
        plain = 15 * torch.tanh((F.rms_norm(outs[-1], (64,)) @ model.lm_head.weight.t()) / 15)
        off = copy.deepcopy(model)
        off.backout_lambda.zero_()
        assert torch.allclose(off(idx), plain, rtol=1e-5, atol=1e-5)
        if n_layer > 2:
            assert not torch.allclose(logits, plain, atol=1e-3)
        else:
            assert torch.equal(logits, off(idx))


def test_attention_scales_q_and_k_by_1_2_and_gates_value_embeddings_by_3_sigmoid():
    from nanochat.gpt import apply_rotary, rotary_cos_sin
    model = make_model()
    attn_mod = model.blocks[1].attn  # the last layer: value embedding, full context
    assert attn_mod.ve_gate.weight.shape == (2, 12)
    B, T, H, Hkv, D = 2, 9, 4, 2, 16
    x = torch.randn(B, T, 64)
    cos, sin = rotary_cos_sin(torch.arange(T), D)
    cos, sin = cos[None, :, None], sin[None, :, None]
    with torch.no_grad():
        got = attn_mod(x, None, cos, sin, None, None)
        q = apply_rotary(attn_mod.c_q(x).view(B, T, H, D), cos, sin)
        k = apply_rotary(attn_mod.c_k(x).view(B, T, Hkv, D), cos, sin)
        v = attn_mod.c_v(x).view(B, T, Hkv, D)
        q = F.rms_norm(q, (D,)) * 1.2
        k = F.rms_norm(k, (D,)).repeat_interleave(2, dim=2) * 1.2
        v = v.repeat_interleave(2, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, H * D)
        torch.testing.assert_close(got, attn_mod.c_proj(y), rtol=1e-5, atol=1e-5)
        # gate = 3 * sigmoid(W x[:, :12]): with W = 0 it is 1.5, so ve = -c_v(x) / 1.5 cancels the values
        attn_mod.ve_gate.weight.zero_()
        ve = -attn_mod.c_v(x) / 1.5
        assert attn_mod(x, ve, cos, sin, None, None).abs().max() < 1e-5
        # the gate reads only the first 12 channels of x
        w = torch.randn(2, 12)
        attn_mod.ve_gate.weight.copy_(w)
        gate = 3 * torch.sigmoid(x[..., :12] @ w.t())  # (B, T, Hkv)
        ve = -attn_mod.c_v(x).view(B, T, Hkv, D) / gate[..., None]
        assert attn_mod(x, ve.reshape(B, T, Hkv * D), cos, sin, None, None).abs().max() < 1e-5


@pytest.mark.parametrize("n_layer", [1, 2, 5])
def test_init_statistics_and_ramps(n_layer):
    model = make_model(randomize=False, n_layer=n_layer, n_embd=128, n_head=4, n_kv_head=2, vocab_size=1000)
    C = 128
    s = math.sqrt(3 / C)
    assert abs(model.wte.weight.std().item() - 0.8) < 0.01 and abs(model.wte.weight.mean().item()) < 0.01
    assert abs(model.lm_head.weight.std().item() - 0.001) < 1e-4
    for b in model.blocks:
        fc = b.mlp.c_fc.weight
        assert fc.abs().max() <= 0.4 * s and fc.abs().max() > 0.39 * s  # uniform(-0.4 s, 0.4 s)
        assert abs(fc.std().item() - 0.4 * s / math.sqrt(3)) < 0.02 * 0.4 * s
        for lin in (b.attn.c_q, b.attn.c_k, b.attn.c_v):
            assert lin.weight.abs().max() <= s and lin.weight.abs().max() > 0.95 * s
        assert (b.attn.c_proj.weight == 0).all() and (b.mlp.c_proj.weight == 0).all()
        if b.attn.ve_gate is not None:
            g = b.attn.ve_gate.weight
            assert g.shape == (2, 12) and (g >= 0).all() and (g <= 0.02).all() and g.std() > 0
    for emb in model.value_embeds.values():
        assert emb.weight.abs().max() <= s and abs(emb.weight.std().item() - 1 / math.sqrt(C)) < 0.01
    g = model.smear_gate.weight
    assert g.shape == (1, 24) and (g >= 0).all() and (g <= 0.02).all() and g.std() > 0
    assert model.smear_lambda.tolist() == [0.0]
    assert model.backout_lambda.tolist() == pytest.approx([0.2])
    L = n_layer
    ramp = [i / max(L - 1, 1) for i in range(L)]
    assert model.resid_lambdas.tolist() == pytest.approx([1.15 - 0.10 * r for r in ramp])
    assert model.x0_lambdas.tolist() == pytest.approx([0.20 - 0.15 * r for r in ramp])
    assert model.resid_lambdas[0].item() == pytest.approx(1.15) and model.x0_lambdas[0].item() == pytest.approx(0.2)
    if L > 1:
        assert model.resid_lambdas[-1].item() == pytest.approx(1.05)
        assert model.x0_lambdas[-1].item() == pytest.approx(0.05)


def test_kv_cache_with_smear_rows_of_different_lengths_padded_prefill_and_fork():
    """The engine's pattern with a strong smear: a right-padded prefill of rows of different
    lengths (lengths reset afterwards), token-by-token decode at each row's own position, a
    multi-token append, a forked row, and the static kv_len of the compiled path."""
    model = make_model(n_layer=3, window_pattern="SSL", short_window=5)
    with torch.no_grad():
        model.smear_lambda.fill_(1.5)
        model.backout_lambda.fill_(0.4)
    model.eval()
    idx = torch.randint(0, V, (3, 22))
    with torch.no_grad():
        ref = model(idx)
        unsmeared = make_model(n_layer=3, window_pattern="SSL", short_window=5)
        unsmeared.load_state_dict(model.state_dict())
        unsmeared.smear_lambda.zero_()
        assert not torch.allclose(unsmeared(idx)[:, 1:], ref[:, 1:], atol=1e-2)  # the smear matters here
        for static in (False, True):
            cache = model.new_kv_cache(3, 24, dtype=torch.float32)
            assert cache.tokens is not None
            lengths = torch.tensor([4, 11, 7])
            rows = torch.arange(3)
            first = model(idx[:, :11], kv_cache=cache, kv_len=24 if static else 11, logits_positions=(rows, lengths - 1))
            torch.testing.assert_close(first, ref[torch.arange(3), lengths - 1], rtol=1e-5, atol=1e-5)
            cache.lengths.copy_(lengths)  # undo the padding, as BatchDecoder.add does
            pos = lengths.clone()
            for _ in range(5):
                tok = idx[torch.arange(3), pos][:, None]
                out = model(tok, kv_cache=cache, kv_len=24 if static else None, logits_positions=(rows, rows * 0))
                torch.testing.assert_close(out, ref[torch.arange(3), pos], rtol=1e-5, atol=1e-5)
                pos += 1
            # a 3-token chunk appended to rows 0 and 1 (lengths 9 and 16)
            out = model(idx[:2, :][torch.arange(2)[:, None], pos[:2, None] + torch.arange(3)],
                        kv_cache=cache.narrow(0, 2))
            for r in range(2):
                torch.testing.assert_close(out[r], ref[r, pos[r]:pos[r] + 3], rtol=1e-5, atol=1e-5)
            # row 2 forked into row 0: row 0 continues row 2's sequence (its previous token too)
            cache.fork(2, [0])
            p = int(pos[2])
            out = model(idx[2:3, p:p + 1], kv_cache=cache.narrow(0, 1))
            torch.testing.assert_close(out[0], ref[2, p:p + 1], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="keep the tokens"):
            model(idx[:, :3], kv_cache=KVCache(3, 3, 2, 16, 24, "cpu", torch.float32))


def test_old_checkpoints_fail_with_the_reason(tmp_path):
    from nanochat import checkpoint as ck
    from nanochat import models
    from nanochat.common import UserError
    import dataclasses
    model = make_model(randomize=False)
    meta = {"model_config": dataclasses.asdict(model.config)}
    state = model.state_dict()
    # before the smear/backout: no such keys, 32-channel value-embedding gates
    old = {k: v for k, v in state.items() if k not in ("smear_gate.weight", "smear_lambda", "backout_lambda")}
    old["blocks.1.attn.ve_gate.weight"] = torch.zeros(2, 32)
    ck.save_checkpoint(str(tmp_path / "old"), 1, old, None, meta)
    with pytest.raises(UserError, match="older nanochat architecture.*smear_gate.weight, smear_lambda, backout_lambda"):
        models.build_model(str(tmp_path / "old"), 1, "cpu")
    with pytest.raises(UserError, match="older nanochat architecture"):
        ck.load_checkpoint(str(tmp_path / "old"), 1)  # the resume path of train base reads it so
    gate_only = dict(state)
    gate_only["blocks.1.attn.ve_gate.weight"] = torch.zeros(2, 32)
    ck.save_checkpoint(str(tmp_path / "gate"), 1, gate_only, None, meta)
    with pytest.raises(UserError, match="value-embedding gates read 32 channels"):
        ck.load_checkpoint(str(tmp_path / "gate"), 1)
    ck.save_checkpoint(str(tmp_path / "new"), 1, state, None, meta)
    assert ck.load_checkpoint(str(tmp_path / "new"), 1)[0].keys() == state.keys()


@pytest.mark.parametrize("block_rows", [1, 3, 7])
def test_softcap_ce_grad_any_block_size(block_rows):
    """softcap_ce_grad_ turns scaled logits into dloss/dlogits in place, block by block: the
    loss and the gradient are autograd's over the plain formula, whatever the block size."""
    from nanochat.loss import SOFTCAP, softcap_ce_grad_
    u = (torch.randn(7, 50, dtype=torch.float64) * 20).requires_grad_()  # past the cap, both signs
    targets = torch.randint(0, 50, (7,))
    targets[2] = -1
    want = F.cross_entropy(SOFTCAP * torch.tanh(u / SOFTCAP), targets, ignore_index=-1, reduction="sum")
    want.backward()
    v = (u.detach() * (2.0 / SOFTCAP)).float()
    got = softcap_ce_grad_(v, targets, block_rows, torch.empty(block_rows * 50))
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v.double(), u.grad, rtol=1e-4, atol=1e-6)
    assert v[2].abs().max() == 0  # the ignored row has no gradient


def test_relu_squared_matches_autograd():
    from nanochat.kernels import ReluSquared
    x = torch.randn(5, 33, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ReluSquared.apply, (x,))
    y = ReluSquared.apply(x)
    torch.testing.assert_close(y, F.relu(x) ** 2)


def test_fused_loss_edge_cases():
    """No rows at all: zero loss, zero gradients (not uninitialized memory). A second backward
    through the same graph is refused: the backward scales its saved gradients in place."""
    from nanochat.loss import lm_loss
    w = torch.randn(20, 8, requires_grad=True)
    x = torch.randn(0, 8, requires_grad=True)
    lm_loss(x, w, torch.zeros(0, dtype=torch.long)).backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    x = torch.randn(5, 8, requires_grad=True)
    loss = lm_loss(x, w, torch.randint(0, 20, (5,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_training_after_inference_mode_sampling():
    """The rotary table made during a forward under torch.inference_mode (RL samples that way
    between its training steps) can be used by a training forward and backward afterwards."""
    model = make_model()
    idx = torch.randint(0, V, (2, 10))
    with torch.inference_mode():
        model(idx[:, :4])
    loss = model(idx, targets=idx)
    loss.backward()
    assert model.lm_head.weight.grad is not None and torch.isfinite(loss)


def test_inference_layout_gives_the_same_model():
    """The inference layout (frozen CPU models) changes only how the Linear weights are stored
    (transposed; c_q, c_k, c_v as views of one stacked matrix): the same logits with and without
    a KV cache, the same state dict; a load writes through into the stacked matrix, and a later
    `.to()` (new tensors) drops the stacking instead of using stale weights."""
    model = make_model()
    idx = torch.randint(0, V, (3, 10))
    with torch.no_grad():
        want = model(idx)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        use_inference_layout(model.requires_grad_(False))
        attn = model.blocks[0].attn
        assert model.lm_head.weight.stride() == (1, V) and model.blocks[0].mlp.c_fc.weight.t().is_contiguous()
        assert attn.c_k.weight.data_ptr() == attn.qkv_weight[attn.c_q.weight.size(0):].data_ptr()
        torch.testing.assert_close(model(idx), want, rtol=1e-5, atol=1e-5)
        for rows in (1, 2, 3):  # prefill, then a decode step of 1, 2 and 3 rows through the cache
            cache = model.new_kv_cache(rows, 16)
            model(idx[:rows, :9], kv_cache=cache)
            got = model(idx[:rows, 9:], kv_cache=cache, logits_positions=(torch.arange(rows), torch.zeros(rows, dtype=torch.long)))
            torch.testing.assert_close(got, want[:rows, -1], rtol=1e-5, atol=1e-5)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        model.load_state_dict({k: v * 0.5 for k, v in state.items()})
        assert model.lm_head.weight.stride() == (1, V) and attn.packed_qkv() is not None
        torch.testing.assert_close(attn.qkv_weight[:attn.c_q.weight.size(0)], state["blocks.0.attn.c_q.weight"] * 0.5)
        halved = model(idx)
        model.to(torch.float64)
        assert attn.packed_qkv() is None and attn.qkv_weight is None
        torch.testing.assert_close(model(idx).float(), halved, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(halved, want)


def test_rotary_function_matches_the_formula():
    from nanochat.gpt import rotary_cos_sin
    from nanochat.kernels import Rotary
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = rotary_cos_sin(torch.arange(5), 8)
    cos, sin = cos[None, :, None].double(), sin[None, :, None].double()
    assert torch.autograd.gradcheck(Rotary.apply, (x, cos, sin))
    x1, x2 = x[..., :4], x[..., 4:]
    torch.testing.assert_close(Rotary.apply(x, cos, sin), torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], -1))


def test_logits_positions_pairs_pick_the_full_logits():
    model = make_model()
    idx = torch.randint(0, V, (3, 12))
    rows, positions = torch.tensor([0, 0, 2, 1, 2]), torch.tensor([3, 4, 11, 0, 5])
    with torch.no_grad():
        full = model(idx)
        picked = model(idx, logits_positions=(rows, positions))
    torch.testing.assert_close(picked, full[rows, positions], rtol=1e-5, atol=1e-5)


def test_trained_model_logits_follow_every_optimizer_step():
    """Sampling during training (RL) sees the weights of the last step. torch's fused AdamW (our
    CPU AdamW) updates weights without bumping their version counter, so an inference-side copy
    of a weight keyed on it (an earlier lm_head cache did that) would go stale."""
    model = make_model()
    opt = model.setup_optimizer(unembedding_lr=0.5)
    idx = torch.randint(0, V, (3, 10))
    with torch.no_grad():
        first = model(idx, logits_positions=(torch.arange(3), torch.full((3,), 9)))
    model(idx, targets=idx).backward()
    opt.step()
    with torch.no_grad():
        second = model(idx, logits_positions=(torch.arange(3), torch.full((3,), 9)))
    assert not torch.allclose(first, second)
    want = model(idx)[:, -1].detach()  # with grads: all positions through the plain product
    torch.testing.assert_close(second, want, rtol=1e-5, atol=1e-5)
