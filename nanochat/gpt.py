"""The GPT model (docs/model.md has the details and the reasons).

- token embedding followed by a parameter-free RMSNorm; pre-norm blocks (parameter-free RMSNorm)
- rotary position embeddings (base 100,000), computed on the fly from positions (no buffers)
- QK-norm, grouped-query attention (n_kv_head divides n_head)
- causal attention with a per-layer window pattern ("SSSL": short, short, short, long, tiled
  over the layers; the last layer always sees the full context)
- ReLU^2 MLP (4x), no biases, untied embedding and lm_head, logits soft-capped at 15 in fp32
- value embeddings mixed into the values of alternating layers through a learned per-head gate
- per-layer learned residual scalars and x0 (input embedding) scalars
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
from nanochat.loss import lm_loss, logits_of
from nanochat.optim import MuonAdamW

ROPE_BASE = 100_000
VE_GATE_CHANNELS = 32        # the value-embedding gate looks at the first 32 channels of x


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


def norm(x):
    """Parameter-free RMSNorm that returns x's dtype: under CUDA autocast rms_norm computes (and
    would return) fp32; the statistics need it, the activations that follow do not."""
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)


def rotary_cos_sin(pos, head_dim):
    """pos: integer positions of any shape (...). Returns cos, sin of shape (..., head_dim // 2), fp32."""
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
    angles = pos.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """x: (B, T, H, D); cos/sin broadcastable to (B, T, 1, D/2). Rotates the pairs (x[i], x[i + D/2])."""
    d = x.size(-1) // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


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
        self.ve_gate_channels = min(VE_GATE_CHANNELS, C)
        self.ve_gate = (nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False)
                        if has_value_embedding(layer_idx, config.n_layer) else None)

    def forward(self, x, ve, cos, sin, mask, cache):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.c_q(x).view(B, T, H, D)
        k = self.c_k(x).view(B, T, Hkv, D)
        v = self.c_v(x).view(B, T, Hkv, D)
        if ve is not None:
            # per-head gate in (0, 2), 1 at init (zero weights)
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, Hkv, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # QK-norm; .to(v.dtype) keeps q, k, v in the compute dtype whatever rms_norm does under autocast
        q, k = norm(q), norm(k)  # QK-norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            kv_cache, q_pos, kv_len = cache
            k, v = kv_cache.store(self.layer_idx, k, v, q_pos, kv_len)
            k, v = k.to(q.dtype), v.to(q.dtype)  # no-op when the cache is in the compute dtype
        y = attention(q, k, v, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, H * D)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


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
        self.windows = config.layer_windows()
        self.checkpoint_activations = False  # torch.utils.checkpoint around each block when training
        # rows of the (B*T, vocab) logits computed at once by the chunked loss; None = automatic
        # (nanochat.loss.default_chunk_rows)
        self.loss_chunk_rows = None

    @torch.no_grad()
    def init_weights(self):
        """Explicit init (the model is usually built on the meta device, then to_empty)."""
        C = self.config.n_embd
        s = math.sqrt(3.0 / C)  # uniform(-s, s) has std 1/sqrt(C): unit-variance outputs for unit-RMS inputs
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)  # RMS-normalized right after anyway
        for emb in self.value_embeds.values():
            nn.init.uniform_(emb.weight, -s, s)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            # output projections start at zero: every block starts as the identity
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)  # gate = 2*sigmoid(0) = 1
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)

    def get_device(self):
        return self.wte.weight.device

    def new_kv_cache(self, batch_size, max_len, dtype=None):
        """A KVCache sized for this model (dtype: default the compute dtype of the device)."""
        device = self.get_device()
        c = self.config
        dtype = dtype or get_compute_dtype(device.type)
        return KVCache(batch_size, c.n_layer, c.n_kv_head, c.n_embd // c.n_head, max_len, device, dtype)

    # ---- forward

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", kv_len=None, logits_positions=None):
        """idx (B, T). Without targets: fp32 soft-capped logits (B, T, vocab), or only those of
        `logits_positions` (an int, or a (B,) LongTensor with one position per row): (B, vocab).
        With a KV cache, `kv_len` (an int the caller knows on the host, at least the longest
        row's length + T, at most the cache's max_len) is how many cache positions attention
        spans; keys beyond a row's own length are masked, so any such value gives the same
        result. Given, the forward never waits for the device and, with a fixed value (e.g.
        max_len), every decode step has the same shapes; None = computed from the lengths (one
        host sync)."""
        B, T = idx.shape
        device = idx.device
        D = self.config.n_embd // self.config.n_head
        if kv_cache is None:
            pos = torch.arange(T, device=device)
            cos, sin = rotary_cos_sin(pos, D)                 # (T, D/2)
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
            cos, sin = rotary_cos_sin(q_pos, D)               # (B, T, D/2)
            cos, sin = cos[:, :, None], sin[:, :, None]       # (B, T, 1, D/2)
            masks = {w: cache_mask(w, q_pos, kv_len) for w in set(self.windows)}
            cache = (kv_cache, q_pos, kv_len)

        # Activations in the compute dtype from the start (the embedding tables are fp32 master
        # weights, which autocast leaves alone), so every matmul and attention runs in it; only
        # the softcapped logits and the loss are fp32 (docs/model.md, "Precision").
        on = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if on else self.wte.weight.dtype
        x = norm(self.wte(idx).to(dtype))
        x0 = x
        ckpt = self.checkpoint_activations and torch.is_grad_enabled() and kv_cache is None
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(dtype) if str(i) in self.value_embeds else None
            args = (x, ve, cos, sin, masks[self.windows[i]], cache)
            x = checkpoint(block, *args, use_reentrant=False) if ckpt else block(*args)
        if kv_cache is not None:
            kv_cache.lengths += T

        if targets is None:
            if logits_positions is not None:
                # only the positions asked for go through lm_head (prefill needs one per row)
                if isinstance(logits_positions, int):
                    x = x[:, logits_positions]
                else:
                    x = x[torch.arange(B, device=device), logits_positions.to(device)]
            return self._logits(norm(x))
        return self._loss(norm(x), targets, loss_reduction)

    def _logits(self, x):
        return logits_of(x, self.lm_head.weight)

    def _loss(self, x, targets, reduction):
        """lm_head + softcap + cross-entropy in chunks of rows (nanochat/loss.py)."""
        B, T, C = x.shape
        losses = lm_loss(x.reshape(B * T, C), self.lm_head.weight, targets.reshape(B * T), reduction,
                         self.loss_chunk_rows)
        return losses.view(B, T) if reduction == "none" else losses

    # ---- accounting

    def num_params_by_category(self):
        wte = self.wte.weight.numel()
        value_embeds = sum(p.numel() for p in self.value_embeds.parameters())
        lm_head = self.lm_head.weight.numel()
        gates = sum(b.attn.ve_gate.weight.numel() for b in self.blocks if b.attn.ve_gate is not None)
        scalars = self.resid_lambdas.numel() + self.x0_lambdas.numel() + gates
        total = sum(p.numel() for p in self.parameters())
        matrices = total - wte - value_embeds - lm_head - scalars
        return dict(wte=wte, value_embeds=value_embeds, lm_head=lm_head,
                    transformer_matrices=matrices, scalars=scalars, total=total)

    def estimate_flops(self):
        """Training FLOPs per token: 6 x (params except the embedding tables, which are lookups)
        + 12 x head_dim x n_head x (context a query sees) summed over layers; the context is
        sequence_len for full layers and min(short_window, sequence_len) for windowed ones."""
        c = self.config
        counts = self.num_params_by_category()
        n = counts["total"] - counts["wte"] - counts["value_embeds"]
        head_dim = c.n_embd // c.n_head
        attn = sum(12 * head_dim * c.n_head * (c.sequence_len if w is None else min(w, c.sequence_len))
                   for w in self.windows)
        return 6 * n + attn

    # ---- optimizer

    def optimizer_groups(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, scalar_lr=0.5,
                         weight_decay=0.0, adam_betas=(0.8, 0.95)):
        """The parameter groups of setup_optimizer (every parameter in exactly one group)."""
        scale = (self.config.n_embd / 768) ** -0.5  # AdamW lrs were tuned at width 768

        def adamw(params, lr, scaled=True):
            return dict(kind="adamw", params=params, lr=lr * (scale if scaled else 1.0), betas=adam_betas,
                        eps=1e-10, weight_decay=0.0)
        gates = [b.attn.ve_gate.weight for b in self.blocks if b.attn.ve_gate is not None]
        groups = [
            adamw([self.lm_head.weight], unembedding_lr),
            adamw([self.wte.weight] + list(self.value_embeds.parameters()), embedding_lr),
            # scalars and gates are not width-scaled: their scale does not grow with the width,
            # and scaling them up at tiny widths makes early training spike
            adamw([self.x0_lambdas] + gates, scalar_lr, scaled=False),
            # the residual scalars get 1% of the scalar lr: at init their true gradient is ~0 (the
            # blocks start as identities and RMSNorm ignores scale), so Adam would turn round-off
            # into full-size random steps
            adamw([self.resid_lambdas], scalar_lr * 0.01, scaled=False),
        ]
        matrices = {}
        for b in self.blocks:
            for lin in (b.attn.c_q, b.attn.c_k, b.attn.c_v, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj):
                matrices.setdefault(tuple(lin.weight.shape), []).append(lin.weight)
        for shape in sorted(matrices):
            groups.append(dict(kind="muon", params=matrices[shape], lr=matrix_lr, momentum=0.95,
                               weight_decay=weight_decay))
        for g in groups:
            g["initial_lr"] = g["lr"]
        assert sum(len(g["params"]) for g in groups) == len(list(self.parameters()))
        return groups

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, scalar_lr=0.5,
                        weight_decay=0.0, adam_betas=(0.8, 0.95), compile=None):
        """compile: torch.compile the optimizer's update functions (None = MuonAdamW's default,
        on CUDA only). On CPU the eager AdamW update makes ~7 temporaries per parameter; compiled
        it is one fused loop (docs/benchmarks.md)."""
        return MuonAdamW(self.optimizer_groups(unembedding_lr, embedding_lr, matrix_lr, scalar_lr,
                                               weight_decay, adam_betas), compile=compile)

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
