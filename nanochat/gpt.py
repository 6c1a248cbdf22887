"""The GPT model (docs/model.md has the details and the reasons).

- token embedding followed by a parameter-free RMSNorm, then "smear": each position gets a
  learned, gated share of the previous position's embedding; pre-norm blocks (parameter-free RMSNorm)
- rotary position embeddings (base 100,000), computed on the fly from positions (no buffers)
- QK-norm, then q and k scaled by 1.2; grouped-query attention (n_kv_head divides n_head)
- causal attention with a per-layer window pattern ("SSSL": short, short, short, long, tiled
  over the layers; the last layer always sees the full context)
- ReLU^2 MLP (4x), no biases, untied embedding and lm_head, logits soft-capped at 15 in fp32
- value embeddings mixed into the values of alternating layers through a learned per-head gate
- per-layer learned residual scalars and x0 (input embedding) scalars
- "backout": the residual stream after layer n_layer // 2, times a learned scalar, is subtracted
  before the final norm
- KVCache: a preallocated cache whose rows may hold sequences of different lengths
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanochat.attention import KVCache, attention, cache_mask, window_mask
from nanochat.common import get_compute_dtype
from nanochat.loss import lm_loss, softcap
from nanochat.optim import MuonAdamW

ROPE_BASE = 100_000
VE_GATE_CHANNELS = 12        # the value-embedding gate looks at the first 12 channels of x
VE_GATE_RANGE = 3.0          # value-embedding gate = VE_GATE_RANGE * sigmoid(...), in (0, 3)
SMEAR_CHANNELS = 24          # the smear gate looks at the first 24 channels of the embedding
QK_SCALE = 1.2               # q and k are multiplied by this after QK-norm
BACKOUT_INIT = 0.2           # initial backout_lambda


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"  # "S" = short window, "L" = full context; tiled over the layers
    short_window: int = 0         # tokens a short-window query sees (itself included); 0 = sequence_len // 4
    smear: bool = True            # False: the forward skips the smear (its parameters still exist, unused)
    backout: bool = True          # False: the forward skips the backout (backout_lambda exists, unused)

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if not (1 <= self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0):
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError("head_dim (n_embd // n_head) must be even for rotary embeddings")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            raise ValueError(f"window_pattern must be made of 'S' and 'L', not '{self.window_pattern}'")
        if self.short_window <= 0:
            self.short_window = max(1, self.sequence_len // 4)

    def layer_windows(self):
        """Per layer: how many tokens a query may see (itself included); None = full context."""
        pattern = self.window_pattern.upper()
        windows = [self.short_window if pattern[i % len(pattern)] == "S" else None for i in range(self.n_layer)]
        windows[-1] = None  # the last layer always sees everything
        return windows


def outdated_architecture(state):
    """Why a saved GPT state dict comes from an older architecture than this code's, or None.
    Checkpoints from before the smear, backout and 12-channel value-embedding gate (which also
    changed the gate's range and scaled q and k by 1.2) would load wrongly or not at all."""
    if "wte.weight" not in state:
        return None  # not a GPT state dict
    missing = [k for k in ("smear_gate.weight", "smear_lambda", "backout_lambda") if k not in state]
    if missing:
        return f"it has no {', '.join(missing)}: it was saved before the smear and backout were added"
    want = min(VE_GATE_CHANNELS, state["wte.weight"].shape[1])
    for k, w in state.items():
        if k.endswith("attn.ve_gate.weight") and w.shape[1] != want:
            return (f"its value-embedding gates read {w.shape[1]} channels ({k}), this model's read {want}: "
                    f"it was saved before the gate changed")
    return None


def has_value_embedding(layer_idx, n_layer):
    """Alternating layers, always including the last one."""
    return layer_idx % 2 == (n_layer - 1) % 2


def as_dtype(x, dtype):
    """x in dtype; x itself when it already is (skips a `.to` call: a decode step makes hundreds)."""
    return x if x.dtype == dtype else x.to(dtype)


def norm(x):
    """Parameter-free RMSNorm that returns x's dtype: under CUDA autocast rms_norm computes (and
    would return) fp32; the statistics need it, the activations that follow do not."""
    return as_dtype(F.rms_norm(x, (x.size(-1),)), x.dtype)


def rotary_cos_sin(pos, head_dim):
    """pos: integer positions of any shape (...). Returns cos, sin of shape (..., head_dim // 2), fp32."""
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
    angles = pos.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """The pairs (x[i], x[i + D/2]) of x (..., D) rotated by the angles whose cos/sin are given,
    written into the two halves of a new tensor: four passes, no concatenation."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    out = torch.empty_like(x)
    torch.mul(x1, cos, out=out[..., :d]).addcmul_(x2, sin)
    torch.mul(x2, cos, out=out[..., d:]).addcmul_(x1, sin, value=-1.0)
    return out


class Rotary(torch.autograd.Function):
    """rotate() with its backward: a rotation's gradient is the rotation by the opposite angles."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate(grad.contiguous(), cos, -sin), None, None


def apply_rotary(x, cos, sin):
    """x: (B, T, H, D); cos/sin broadcastable to (B, T, 1, D/2). Rotates the pairs (x[i], x[i + D/2]).
    Eager: Rotary (fewer passes over x than autograd through the formula); compiled: the formula."""
    d = x.size(-1) // 2
    cos, sin = as_dtype(cos, x.dtype), as_dtype(sin, x.dtype)
    if torch.compiler.is_compiling():
        x1, x2 = x[..., :d], x[..., d:]
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)
    return Rotary.apply(x, cos, sin) if torch.is_grad_enabled() else rotate(x, cos, sin)


# ---------------------------------------------------------------------------
# The model

class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        C, D = config.n_embd, self.head_dim
        self.c_q = nn.Linear(C, self.n_head * D, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * D, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * D, bias=False)
        self.c_proj = nn.Linear(self.n_head * D, C, bias=False)
        self.ve_gate_channels = min(VE_GATE_CHANNELS, C)  # a Linear: a 2-D matrix trained by Muon
        self.ve_gate = (nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False)
                        if has_value_embedding(layer_idx, config.n_layer) else None)
        self.qkv_weight, self._qkv_ptrs = None, None  # see GPT.use_inference_layout

    def _packed_qkv(self):
        """The (q, k, v)-stacked weight whose rows c_q, c_k and c_v's weights are views of
        (GPT.use_inference_layout), or None: not packed, compiling, or the weights were replaced
        since (a `.to()`: the new tensors are no longer views of it, so it is dropped)."""
        w = self.qkv_weight
        if w is None or torch.compiler.is_compiling():
            return None
        if (self.c_q.weight.data_ptr(), self.c_k.weight.data_ptr(), self.c_v.weight.data_ptr()) != self._qkv_ptrs:
            self.qkv_weight = self._qkv_ptrs = None
            return None
        return w

    def forward(self, x, ve, cos, sin, mask, cache):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        packed = self._packed_qkv()
        if packed is not None:  # one product; q and k stay side by side in it
            qkv = F.linear(x, packed).view(B, T, H + 2 * Hkv, D)
            qk, v = qkv[:, :, :H + Hkv], qkv[:, :, H + Hkv:]
        else:
            q = self.c_q(x).view(B, T, H, D)
            k = self.c_k(x).view(B, T, Hkv, D)
            v = self.c_v(x).view(B, T, Hkv, D)
        if ve is not None:
            # per-kv-head gate in (0, 3); ~1.5 at init (small positive weights)
            gate = VE_GATE_RANGE * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, Hkv, D)
        # rotary, then QK-norm (norm returns the compute dtype), then a fixed 1.2 on both:
        # attention logits are 1.44 q.k / sqrt(D), sharper than plain QK-norm allows
        if packed is not None:  # both at once (the same per-head operations)
            qk = norm(apply_rotary(qk, cos, sin)) * QK_SCALE
            q, k = qk[:, :, :H], qk[:, :, H:]
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
        if cache is not None:
            kv_cache, index, kv_len = cache
            k, v = kv_cache.store(self.layer_idx, k, v, index, kv_len)  # (B, Hkv, kv_len, D)
            k, v = as_dtype(k, q.dtype), as_dtype(v, q.dtype)  # the cache may hold another dtype
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        y = attention(q.transpose(1, 2), k, v, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, H * D)
        return self.c_proj(y)


class ReluSquared(torch.autograd.Function):
    """relu(x)^2 with a backward of two passes (2 relu(x) * grad) instead of autograd's four
    (pow's three, then relu's). Used in eager mode; a compiled graph fuses the plain formula anyway."""

    @staticmethod
    def forward(ctx, x):
        h = torch.relu(x)
        ctx.save_for_backward(h)
        return h * h

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return torch.mul(grad, h).mul_(2.0)


def relu_squared(x):
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return F.relu(x).square()
    return ReluSquared.apply(x)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(relu_squared(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, mask, cache):
        x = x + self.attn(norm(x), ve, cos, sin, mask, cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        C, V = config.n_embd, config.vocab_size
        kv_dim = config.n_kv_head * (C // config.n_head)
        self.wte = nn.Embedding(V, C)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in range(config.n_layer)
                                           if has_value_embedding(i, config.n_layer)})
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(C, V, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        # smear and backout parameters exist whatever config.smear / config.backout say (one
        # state-dict layout); switched off, the forward does not use them
        self.smear_gate = nn.Linear(min(SMEAR_CHANNELS, C), 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.full((1,), BACKOUT_INIT))
        self.windows = config.layer_windows()
        self.checkpoint_activations = False  # torch.utils.checkpoint around each block when training
        # rows of the (B*T, vocab) logits computed at once by the chunked loss; None = automatic
        # (nanochat.loss.default_chunk_rows)
        self.loss_chunk_rows = None
        self._rope = None  # (cos, sin) of positions 0..n-1, see _cos_sin

    @torch.no_grad()
    def init_weights(self):
        """Explicit init (the model is usually built on the meta device, then to_empty)."""
        C, L = self.config.n_embd, self.config.n_layer
        s = math.sqrt(3.0 / C)  # uniform(-s, s) has std 1/sqrt(C): unit-variance outputs for unit-RMS inputs
        # RMS-normalized right after, so the std only sets the scale the optimizer (steps, weight
        # decay) works against
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.8)
        for emb in self.value_embeds.values():
            nn.init.uniform_(emb.weight, -s, s)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            # output projections start at zero: every block starts as the identity
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)  # gate near 1.5
        # per-layer ramps: early layers keep more of the residual stream and of x0
        ramp = torch.arange(L, dtype=torch.float32) / max(L - 1, 1)  # 0 .. 1 over the layers
        self.resid_lambdas.copy_(1.15 - 0.10 * ramp)
        self.x0_lambdas.copy_(0.20 - 0.15 * ramp)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        self.smear_lambda.fill_(0.0)  # the smear starts off; training opens it
        self.backout_lambda.fill_(BACKOUT_INIT)

    def get_device(self):
        return self.resid_lambdas.device

    def weights_dtype(self):
        """The dtype of the weights as loaded (freeze), which a forward outside autocast computes
        in; the scalars are always in it, int8 models included (nanochat/quant.py)."""
        return self.resid_lambdas.dtype

    def freeze(self, dtype=None):
        """For inference only: eval mode, no gradients, the weights in `dtype` (None = as they
        are; no matmul then casts a weight per call, as autocast would every decode step), and on
        CPU the inference layout (below). checkpoint.build_model's eval phase calls it. Returns self."""
        self.eval().requires_grad_(False)
        if dtype is not None:
            self.to(dtype)
        if self.get_device().type == "cpu":
            self.use_inference_layout()
        return self

    @torch.no_grad()
    def use_inference_layout(self):
        """For a frozen model on CPU (freeze calls it; call it again after any `.to()`).
        Every nn.Linear weight (out, in) is stored as the transpose of a contiguous (in, out)
        matrix: the same values and shape, strides (1, out). F.linear then hands MKL an operand
        it need not transpose, and its products of 1 and 4 to 64 rows (decode steps, evaluation's
        scored positions) run 1.1-2.1x faster; 2 rows mostly a little slower, hundreds of rows
        about the same (docs/benchmarks.md, "Decode"). Each layer's c_q, c_k and c_v weights become row blocks
        of one stacked matrix (qkv_weight), so attention makes one product instead of three and
        rotates and norms q and k together. No extra memory; state_dict() holds the same values
        (non-contiguous tensors; the HF export makes them contiguous)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.data = m.weight.data.t().contiguous().t()
        for block in self.blocks:
            a = block.attn
            ws = (a.c_q.weight, a.c_k.weight, a.c_v.weight)
            packed = torch.cat([w.t() for w in ws], dim=1).t()  # (q + k + v rows, C), strides (1, rows)
            start = 0
            for w in ws:
                w.data = packed[start:start + w.size(0)]
                start += w.size(0)
            a.qkv_weight, a._qkv_ptrs = packed, tuple(w.data_ptr() for w in ws)

    def new_kv_cache(self, batch_size, max_len, dtype=None):
        """A KVCache sized for this model (dtype: default the dtype the forward computes in: the
        weights' own when they are not fp32, else the compute dtype of the device, which autocast
        may use); with the smear on it also keeps each position's token (KVCache, keep_tokens)."""
        device = self.get_device()
        c = self.config
        if dtype is None:
            dtype = self.weights_dtype() if self.weights_dtype() != torch.float32 else get_compute_dtype(device.type)
        return KVCache(batch_size, c.n_layer, c.n_kv_head, c.n_embd // c.n_head, max_len, device, dtype,
                       keep_tokens=c.smear)

    def backout_layer(self):
        """The layer whose output the backout subtracts (n_layer // 2), or None: switched off, or
        with n_layer <= 2, where that layer is the last one. There the subtraction would only
        rescale the final stream, which the norm undoes, so backout_lambda's true gradient is 0
        and Adam would turn the round-off it gets into full-size steps; past 1 it would flip the
        logits' sign. Upstream (which never trains such shallow models) applies it anyway."""
        i = self.config.n_layer // 2
        return i if self.config.backout and i < self.config.n_layer - 1 else None

    def _embed(self, idx, dtype):
        return norm(as_dtype(self.wte(idx), dtype))

    def _cos_sin(self, n, device, pos=None):
        """rotary_cos_sin of positions 0..n-1 (pos None) or of the integer positions pos (all < n):
        rows of a table computed once per device (at least sequence_len rows; not a buffer, so
        nothing to save or load). Under torch.compile computed directly (no table to trace)."""
        D = self.config.n_embd // self.config.n_head
        if torch.compiler.is_compiling():
            return rotary_cos_sin(torch.arange(n, device=device) if pos is None else pos, D)
        if self._rope is None or self._rope[0].device != device or self._rope[0].size(0) < n:
            # a normal tensor even when made under inference_mode (sampling inside RL training):
            # an inference tensor could not be saved for a later backward
            with torch.inference_mode(False), torch.no_grad():
                self._rope = rotary_cos_sin(torch.arange(max(n, self.config.sequence_len), device=device), D)
        cos, sin = self._rope
        return (cos[:n], sin[:n]) if pos is None else (cos[pos], sin[pos])

    def _smear(self, x, prev):
        """x[t] += smear_lambda * sigmoid(smear_gate(x[t, :24])) * prev[t] (prev[t] = x[t-1], zero
        where a row has no previous token). The gate reads the current token, before smearing."""
        gate = torch.sigmoid(self.smear_gate(x[..., :self.smear_gate.in_features]))  # (B, T, 1)
        return x + as_dtype(self.smear_lambda * gate, x.dtype) * prev

    # ---- forward

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", kv_len=None, logits_positions=None):
        """idx (B, T). Without targets: fp32 soft-capped logits (B, T, vocab), or only those of
        `logits_positions`: an int or a (B,) LongTensor with one position per row -> (B, vocab);
        a pair (rows, positions) of (N,) LongTensors -> (N, vocab).
        With a KV cache, `kv_len` (an int the caller knows on the host, at least the longest
        row's length + T, at most the cache's max_len) is how many cache positions attention
        spans; keys beyond a row's own length are masked, so any such value gives the same
        result. Given, the forward never waits for the device and, with a fixed value (e.g.
        max_len), every decode step has the same shapes; None = computed from the lengths (one
        host sync)."""
        B, T = idx.shape
        device = idx.device
        if kv_cache is None:
            cos, sin = self._cos_sin(T, device)                  # (T, D/2)
            cos, sin = cos[None, :, None], sin[None, :, None]  # (1, T, 1, D/2)
            masks = {w: window_mask(w, T, device) for w in set(self.windows)}
            cache = None
        else:
            if kv_cache.batch_size != B:
                raise ValueError(f"kv_cache has {kv_cache.batch_size} rows but the batch has {B}")
            q_pos = kv_cache.lengths[:, None] + torch.arange(T, device=device)  # (B, T) per-row positions
            if kv_len is None:
                kv_len = int(kv_cache.lengths.max()) + T  # one host sync
            if kv_len > kv_cache.max_len:
                raise ValueError(f"kv_cache overflow: {kv_len} tokens > max_len {kv_cache.max_len}")
            cos, sin = self._cos_sin(kv_len, device, q_pos)   # (B, T, D/2)
            cos, sin = cos[:, :, None], sin[:, :, None]       # (B, T, 1, D/2)
            masks = {w: cache_mask(w, q_pos, kv_len) for w in set(self.windows)}
            # where each layer writes its new keys: (row, position) pairs
            cache = (kv_cache, (torch.arange(B, device=device)[:, None], q_pos), kv_len)

        # Activations in the compute dtype from the start (the embedding tables are fp32 master
        # weights, which autocast leaves alone), so every matmul and attention runs in it; only
        # the softcapped logits and the loss are fp32 (docs/model.md, "Precision").
        on = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if on else self.weights_dtype()
        cos, sin = as_dtype(cos, dtype), as_dtype(sin, dtype)  # once, not in every layer
        x = self._embed(idx, dtype)
        if self.config.smear:
            # the previous position's embedding: within the sequence a shift of x; with a cache,
            # the first new position of each row looks up the row's previous token (if any)
            if kv_cache is None:
                first = torch.zeros_like(x[:, :1])
            else:
                if kv_cache.tokens is None:
                    raise ValueError("this model smears the previous token's embedding: its KV cache must keep "
                                     "the tokens (make it with model.new_kv_cache, or KVCache(..., keep_tokens=True))")
                prev_id, has_prev = kv_cache.previous_tokens(idx, q_pos)
                first = self._embed(prev_id[:, None], dtype) * has_prev[:, None, None].to(dtype)
            x = self._smear(x, torch.cat([first, x[:, :-1]], dim=1))
        x0 = x
        ckpt = self.checkpoint_activations and torch.is_grad_enabled() and kv_cache is None
        backout_layer = self.backout_layer()
        x_mid = None
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = as_dtype(self.value_embeds[str(i)](idx), dtype) if str(i) in self.value_embeds else None
            args = (x, ve, cos, sin, masks[self.windows[i]], cache)
            x = checkpoint(block, *args, use_reentrant=False) if ckpt else block(*args)
            if i == backout_layer:
                x_mid = x  # the residual stream after layer n_layer // 2
        if x_mid is not None:
            x = x - as_dtype(self.backout_lambda, x.dtype) * x_mid
        if kv_cache is not None:
            kv_cache.lengths += T

        if targets is None:
            if logits_positions is not None:
                # only the positions asked for go through lm_head (prefill needs one per row)
                if isinstance(logits_positions, int):
                    x = x[:, logits_positions]
                elif isinstance(logits_positions, tuple):  # (rows, positions): any number per row
                    rows, positions = logits_positions
                    x = x[rows.to(device), positions.to(device)]
                else:
                    x = x[torch.arange(B, device=device), logits_positions.to(device)]
            return softcap(self.lm_head(norm(x)).float())  # the module: it may be int8 (quant.py)
        return self._loss(norm(x), targets, loss_reduction)

    def _loss(self, x, targets, reduction):
        """lm_head + softcap + cross-entropy in chunks of rows (nanochat/loss.py)."""
        B, T, C = x.shape
        losses = lm_loss(x.reshape(B * T, C), self.lm_head.weight, targets.reshape(B * T), reduction,
                         self.loss_chunk_rows)
        return losses.view(B, T) if reduction == "none" else losses

    # ---- accounting

    def num_params_by_category(self):
        """Parameter counts: the embedding tables, lm_head, everything inside the blocks
        (transformer_matrices, the value-embedding gates included) and the model-level scalars
        (resid/x0 lambdas, smear gate and lambda, backout lambda)."""
        wte = self.wte.weight.numel()
        value_embeds = sum(p.numel() for p in self.value_embeds.parameters())
        lm_head = self.lm_head.weight.numel()
        matrices = sum(p.numel() for p in self.blocks.parameters())
        scalars = sum(p.numel() for p in self._scalar_params())
        total = sum(p.numel() for p in self.parameters())
        assert total == wte + value_embeds + lm_head + matrices + scalars
        return dict(wte=wte, value_embeds=value_embeds, lm_head=lm_head,
                    transformer_matrices=matrices, scalars=scalars, total=total)

    def _scalar_params(self):
        return [self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight, self.smear_lambda, self.backout_lambda]

    def num_matmul_params(self):
        """Weights of every nn.Linear (the smear and value-embedding gates and lm_head included):
        each multiplies the token stream, 2 FLOPs per weight per token forward. Embedding
        tables (lookups) and the per-layer scalars are left out."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def estimate_flops(self):
        """Training FLOPs per token: 6 x num_matmul_params (forward 2, backward 4) + 12 x head_dim
        x n_head x (context a query sees) summed over layers (QK^T and AV); the context is
        sequence_len for full layers and min(short_window, sequence_len) for windowed ones.
        Elementwise work (norms, softmax, gates' sigmoids, the scalars) is not counted. The
        smear gate is counted even when config.smear is off (it is ~C/768 of one layer's c_q)."""
        c = self.config
        head_dim = c.n_embd // c.n_head
        attn = sum(12 * head_dim * c.n_head * (c.sequence_len if w is None else min(w, c.sequence_len))
                   for w in self.windows)
        return 6 * self.num_matmul_params() + attn

    # ---- optimizer

    def optimizer_groups(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, scalar_lr=0.5,
                         weight_decay=0.0):
        """The parameter groups of setup_optimizer (every parameter in exactly one group), with
        upstream nanochat's hyperparameters (docs/model.md, "Optimizer groups")."""
        scale = (self.config.n_embd / 768) ** -0.5  # the AdamW lrs of the tables were tuned at width 768

        def adamw(params, lr, betas, wd):
            return dict(kind="adamw", params=params, lr=lr, betas=betas, eps=1e-10, weight_decay=wd)
        groups = [
            adamw([self.lm_head.weight], unembedding_lr * scale, (0.8, 0.96), 0.01),
            adamw([self.wte.weight], embedding_lr * scale, (0.8, 0.995), 0.001),
            adamw(list(self.value_embeds.parameters()), embedding_lr * scale * 0.5, (0.8, 0.995), 0.01),
            # the residual scalars get 1% of the scalar lr: at init their true gradient is ~0 (the
            # blocks start as identities and RMSNorm ignores scale), so Adam would turn round-off
            # into full-size random steps. Scalars are not width-scaled.
            adamw([self.resid_lambdas], scalar_lr * 0.01, (0.8, 0.95), 0.05),
            adamw([self.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),
            # a fixed lr, as upstream (not tied to scalar_lr)
            adamw([self.smear_gate.weight, self.smear_lambda, self.backout_lambda], 0.2, (0.8, 0.95), 0.0),
        ]
        # Muon: every matrix inside the blocks (the value-embedding gates too), one group per shape
        matrices = {}
        for p in self.blocks.parameters():
            matrices.setdefault(tuple(p.shape), []).append(p)
        for shape in sorted(matrices):
            groups.append(dict(kind="muon", params=matrices[shape], lr=matrix_lr, momentum=0.95, ns_steps=5,
                               beta2=0.9, weight_decay=weight_decay))
        for g in groups:
            g["initial_lr"] = g["lr"]
        assert sum(len(g["params"]) for g in groups) == len(list(self.parameters()))
        return groups

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, scalar_lr=0.5,
                        weight_decay=0.0, compile=None):
        """compile: torch.compile the optimizer's update functions (None = MuonAdamW's default,
        on CUDA only). On CPU the eager AdamW update makes ~7 temporaries per parameter; compiled
        it is one fused loop (docs/benchmarks.md)."""
        return MuonAdamW(self.optimizer_groups(unembedding_lr, embedding_lr, matrix_lr, scalar_lr,
                                               weight_decay), compile=compile)

    # ---- reference sampling

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Sample max_tokens ids after the prompt `tokens` (a list of ints), yielding each id.
        No KV cache: every step runs the full sequence (the reference for nanochat.engine).
        temperature 0 = greedy. Sampling: logits of the last position; with top_k, the top_k
        largest (torch.topk) are the candidates, else the whole vocabulary; divide by temperature,
        softmax, torch.multinomial with a torch.Generator on the model's device seeded with `seed`."""
        device = self.get_device()
        rng = None
        if temperature > 0:
            rng = torch.Generator(device=device)
            rng.manual_seed(seed)
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if temperature > 0:
                cand_ids = None
                if top_k is not None and 0 < top_k < logits.size(-1):
                    logits, cand_ids = torch.topk(logits, top_k, dim=-1)
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
                if cand_ids is not None:
                    next_id = cand_ids.gather(1, next_id)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()
