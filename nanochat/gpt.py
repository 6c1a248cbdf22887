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

from nanochat import kernels
from nanochat.attention import KVCache, attention, cache_mask, window_mask
from nanochat.common import get_compute_dtype
from nanochat.inference_layout import use_inference_layout
from nanochat.loss import lm_loss, softcap
from nanochat.optim import MuonAdamW, gpt_param_groups

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


def apply_rotary(x, cos, sin):
    """x: (B, T, H, D); cos/sin broadcastable to (B, T, 1, D/2). Rotates the pairs (x[i], x[i + D/2]):
    (x1 cos + x2 sin, x2 cos - x1 sin). Eager mode runs kernels.rotary (the same numbers, fewer passes)."""
    cos, sin = as_dtype(cos, x.dtype), as_dtype(sin, x.dtype)
    if not torch.compiler.is_compiling():
        return kernels.rotary(x, cos, sin)
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def relu_squared(x):
    """relu(x)^2; with gradients in eager mode through kernels.ReluSquared (a shorter backward)."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return F.relu(x).square()
    return kernels.ReluSquared.apply(x)


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

    def forward(self, x, ve, cos, sin, mask, cache):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.c_q(x).view(B, T, H, D)
        k = self.c_k(x).view(B, T, Hkv, D)
        v = self.add_value_embedding(x, self.c_v(x).view(B, T, Hkv, D), ve)
        return self.attend(self.rope_norm(q, cos, sin), self.rope_norm(k, cos, sin), v, mask, cache)

    def rope_norm(self, x, cos, sin):
        """Rotary, then QK-norm (norm returns the compute dtype), then a fixed 1.2 on q and k alike:
        attention logits are 1.44 q.k / sqrt(D), sharper than plain QK-norm allows."""
        return norm(apply_rotary(x, cos, sin)) * QK_SCALE

    def add_value_embedding(self, x, v, ve):
        if ve is None:
            return v
        # per-kv-head gate in (0, 3); ~1.5 at init (small positive weights)
        gate = VE_GATE_RANGE * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
        return v + gate.unsqueeze(-1) * ve.view(v.shape)

    def attend(self, q, k, v, mask, cache):
        """q (B, T, H, D), k and v (B, T, Hkv, D), through the KV cache if any -> (B, T, C)."""
        B, T, H, D = q.shape
        if cache is not None:
            kv_cache, index, kv_len = cache
            k, v = kv_cache.store(self.layer_idx, k, v, index, kv_len)  # (B, Hkv, kv_len, D)
            k, v = as_dtype(k, q.dtype), as_dtype(v, q.dtype)  # the cache may hold another dtype
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        y = attention(q.transpose(1, 2), k, v, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, H * D)
        return self.c_proj(y)


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
        self.smear_gate = nn.Linear(min(SMEAR_CHANNELS, C), 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.full((1,), BACKOUT_INIT))
        self.windows = config.layer_windows()
        self.checkpoint_activations = False  # torch.utils.checkpoint around each block when training
        self.loss_chunk_rows = None  # rows of logits per chunk of the loss; None = loss.default_chunk_rows
        self._rope = None  # (cos, sin) of positions 0..n-1, see _cos_sin

    @torch.no_grad()
    def init_weights(self):
        """Explicit init (the model is usually built on the meta device, then to_empty)."""
        C, L = self.config.n_embd, self.config.n_layer
        s = math.sqrt(3.0 / C)  # uniform(-s, s) has std 1/sqrt(C): unit-variance outputs for unit-RMS inputs
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.8)  # normed right after: sets the optimizer's scale
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
        """The weights' dtype as loaded: the scalars always have it, int8 models included (quant.py)."""
        return self.resid_lambdas.dtype

    def freeze(self, dtype=None):
        """For inference only (models.build_model's eval phase): eval mode, no gradients, the weights
        in `dtype` (None = as they are) and, on CPU, the inference layout (inference_layout.py)."""
        self.eval().requires_grad_(False)
        if dtype is not None:
            self.to(dtype)
        if self.get_device().type == "cpu":
            use_inference_layout(self)
        return self

    def new_kv_cache(self, batch_size, max_len, dtype=None):
        """A KVCache sized for this model that also keeps each position's token, for the smear. dtype:
        default what the forward computes in: the weights' own unless fp32, else the device's compute dtype."""
        device, c, own = self.get_device(), self.config, self.weights_dtype()
        if dtype is None:
            dtype = own if own != torch.float32 else get_compute_dtype(device.type)
        return KVCache(batch_size, c.n_layer, c.n_kv_head, c.n_embd // c.n_head, max_len, device, dtype,
                       keep_tokens=True)

    def backout_layer(self):
        """The layer whose output the backout subtracts (n_layer // 2), or None with n_layer <= 2:
        that layer is then the last, and the subtraction would only rescale what the norm undoes
        (docs/model.md)."""
        i = self.config.n_layer // 2
        return i if i < self.config.n_layer - 1 else None

    def _embed(self, idx, dtype):
        return norm(as_dtype(self.wte(idx), dtype))

    def _cos_sin(self, n, device, pos=None):
        """rotary_cos_sin of positions 0..n-1 (pos None) or of positions pos (all < n): rows of a
        table made once per device (not a buffer: nothing to save); compiled, computed directly."""
        D = self.config.n_embd // self.config.n_head
        if torch.compiler.is_compiling():
            return rotary_cos_sin(torch.arange(n, device=device) if pos is None else pos, D)
        if self._rope is None or self._rope[0].device != device or self._rope[0].size(0) < n:
            # not an inference tensor even under inference_mode (RL samples so, then trains on it)
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
        """idx (B, T). Without targets: fp32 soft-capped logits (B, T, vocab), or only those at
        `logits_positions`, a pair (rows, positions) of (N,) LongTensors on idx's device -> (N, vocab).
        With a KV cache, `kv_len` (a host int: at least the longest row's length + T, at most the
        cache's max_len) is how many cache positions attention spans (keys beyond a row's length
        are masked): no device sync, and fixed shapes when it is fixed; None = computed (one sync)."""
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

        # activations in the compute dtype from the embedding on (autocast leaves the fp32 tables
        # alone); only the logits and the loss are fp32 (docs/model.md, "Precision")
        on = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if on else self.weights_dtype()
        cos, sin = as_dtype(cos, dtype), as_dtype(sin, dtype)  # once, not in every layer
        x = self._embed(idx, dtype)
        # the smear's previous position: within the sequence a shift of x; with a cache, the
        # first new position of each row looks up the row's previous token (if any)
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
            if logits_positions is not None:  # only these go through lm_head (prefill needs one per row)
                rows, positions = logits_positions
                x = x[rows, positions]
            return softcap(self.lm_head(norm(x)).float())  # the module: it may be int8 (quant.py)
        return self._loss(norm(x), targets, loss_reduction)

    def _loss(self, x, targets, reduction):
        """lm_head + softcap + cross-entropy in chunks of rows (nanochat/loss.py)."""
        B, T, C = x.shape
        losses = lm_loss(x.reshape(B * T, C), self.lm_head.weight, targets.reshape(B * T), reduction,
                         self.loss_chunk_rows)
        return losses.view(B, T) if reduction == "none" else losses

    def num_params_by_category(self):
        """Parameter counts: embedding tables, lm_head, the blocks (transformer_matrices, value-embedding
        gates included) and the model-level scalars (resid/x0 lambdas, smear, backout)."""
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
        """Weights of every nn.Linear (gates and lm_head included): 2 FLOPs per weight per token
        forward. Embedding lookups and the scalars are left out."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def estimate_flops(self):
        """Training FLOPs per token: 6 x num_matmul_params + 12 x head_dim x n_head x (context a
        query sees: sequence_len, or the short window) summed over layers (QK^T and AV).
        Elementwise work (norms, softmax, sigmoids, scalars) is not counted."""
        c = self.config
        head_dim = c.n_embd // c.n_head
        attn = sum(12 * head_dim * c.n_head * (c.sequence_len if w is None else min(w, c.sequence_len))
                   for w in self.windows)
        return 6 * self.num_matmul_params() + attn

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, scalar_lr=0.5,
                        weight_decay=0.0, compile=None):
        """MuonAdamW over optim.gpt_param_groups. compile: torch.compile its update functions
        (None = MuonAdamW's default: on CUDA only)."""
        return MuonAdamW(gpt_param_groups(self, unembedding_lr, embedding_lr, matrix_lr, scalar_lr, weight_decay),
                         compile=compile)
