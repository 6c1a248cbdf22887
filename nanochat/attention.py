"""Attention for the GPT: causal masks, sliding windows, FlexAttention, and the KV cache.

Everything device-specific about attention lives here; gpt.py only asks for `attention(q, k, v,
mask)` with a mask from `window_mask` (training, no cache) or `cache_mask` (a KV cache).

A "mask" is one of:
  None                     causal over Tq == Tk tokens (SDPA is_causal: flash kernels everywhere)
  bool tensor              True = may attend, broadcastable to (B, H, Tq, Tk) (SDPA, any device)
  FlexAttention BlockMask  sliding window on CUDA (only FlexAttention makes windows cheaper)
"""
import os

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

USE_FLEX_ATTENTION = os.environ.get("NANOCHAT_FLEX_ATTENTION", "1") != "0"
_flex_fn = None
_block_masks = {}


def compile_flex(backend="inductor"):
    """FlexAttention compiled (uncompiled it is a slow reference implementation; compiled, a
    Triton kernel). With dynamo's automatic dynamic shapes (dynamic=None): the first shape
    compiles static, and the first call at another shape recompiles with the changing sizes
    symbolic. Evaluations (CORE, chat tasks, RL) feed it a new sequence length almost every
    call; with dynamic=False each one was a recompile, and past the recompile limit (8) torch
    fell back to the unfused implementation."""
    return torch.compile(flex_attention, dynamic=None, backend=backend)


def _flex_attention():
    """The compiled FlexAttention kernel used outside a compiled model (evaluation)."""
    global _flex_fn
    if _flex_fn is None:
        _flex_fn = compile_flex()
    return _flex_fn


def use_flex(device):
    return device.type == "cuda" and USE_FLEX_ATTENTION


def sliding_window_block_mask(T, window, device):
    """FlexAttention block mask: query i sees keys j with i - window < j <= i. Cached per (T, window),
    so it is built once per shape. create_block_mask traces into a compiled model's graph (no
    graph break), and a cached mask is an input of that graph."""
    key = (T, window, str(device))
    if key not in _block_masks:
        def sliding_causal(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < window)
        _block_masks[key] = create_block_mask(sliding_causal, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
    return _block_masks[key]


def warm_window_masks(windows, T, device):
    """Build the masks of `windows` (a model's config.layer_windows()) over T tokens now, before
    the first call of a compiled model. A compiled forward that finds the cache empty builds the
    mask inside its graph and adds it to the cache; dynamo guards on the cache, so the next call
    sees a changed dict and compiles the whole model again (one wasted training compile per
    stage, one per evaluation length). Filled beforehand, the cached mask is a plain graph input."""
    for w in set(windows):
        window_mask(w, T, torch.device(device))


def attention(q, k, v, mask):
    """q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D), all in one dtype. Returns (B, H, Tq, D)."""
    gqa = k.size(1) != q.size(1)
    if gqa and (isinstance(mask, torch.Tensor) or q.device.type == "mps"):
        # With enable_gqa, CUDA's SDPA has only its flash kernel (which takes no mask) and the
        # math fallback (which materializes every score): with a mask (KV-cache prefill and
        # decode, windows without FlexAttention) repeat the kv heads, so the memory-efficient
        # kernel runs. MPS may not take enable_gqa at all.
        rep = q.size(1) // k.size(1)
        k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if torch.compiler.is_compiling():
        # inside a compiled model: let the outer torch.compile trace flex_attention itself
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    return _flex_attention()(q, k, v, block_mask=mask, enable_gqa=gqa)


def window_mask(window, T, device):
    """Training/no-cache mask for `window` over T tokens (None = plain causal)."""
    if window is None or window >= T:
        return None
    if use_flex(device):
        return sliding_window_block_mask(T, window, device)
    i = torch.arange(T, device=device)
    diff = i[:, None] - i[None, :]
    return (diff >= 0) & (diff < window)


def cache_mask(window, q_pos, kv_len):
    """KV-cache mask (B, 1, T, kv_len): row b's query at absolute position p sees keys j <= p
    (and p - j < window). Keys beyond a row's own length are never seen since j <= p."""
    j = torch.arange(kv_len, device=q_pos.device)
    diff = q_pos[:, :, None] - j
    allowed = diff >= 0
    if window is not None:
        allowed = allowed & (diff < window)
    return allowed[:, None]


class KVCache:
    """Preallocated keys/values: per layer, k[layer] and v[layer] of shape (batch, n_kv_head,
    max_len, head_dim) in the compute dtype, and `lengths` (batch,) = tokens stored per row. A
    model forward with this cache writes the T new tokens of row b at positions lengths[b] ..
    lengths[b]+T-1 (that is also their rotary position), attends to row b's stored keys only, and
    advances lengths by T at the end. Stored entries beyond a row's length are garbage and never
    read. One tensor per layer (not one 5-D tensor): torch.compile writes into a whole tensor in
    place, but writing through a per-layer view of a bigger input made it copy the whole cache
    every step (docs/benchmarks.md).

    keep_tokens=True also keeps `tokens` (batch, max_len): the token id stored at each position,
    written like the keys. The model's smear mixes the previous position's embedding into each
    token's; a decode step (or a chunk appended to a row) reads the previous token of each row
    from here and looks its embedding up again (the embedding is a function of the id alone, so
    one int64 per position stands for n_embd stored values). Rows of any lengths, narrow views,
    copy_row/fork and padded prefill all work for it as they do for the keys."""

    def __init__(self, batch_size, num_layers, num_kv_heads, head_dim, max_len, device, dtype, keep_tokens=False):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch_size, max_len, dtype=torch.long, device=device) if keep_tokens else None

    @property
    def batch_size(self):
        return self.lengths.size(0)

    @property
    def max_len(self):
        return self.k[0].size(2)

    def _rows(self):
        """Every per-row tensor whose rows copy_row copies."""
        return self.k + self.v + ([self.tokens] if self.tokens is not None else [])

    def tensors(self):
        return self._rows() + [self.lengths]

    def narrow(self, start, n):
        """A KVCache over rows start .. start+n-1 sharing this one's storage (writes go through)."""
        view = KVCache.__new__(KVCache)
        view.k = [t.narrow(0, start, n) for t in self.k]
        view.v = [t.narrow(0, start, n) for t in self.v]
        view.lengths = self.lengths.narrow(0, start, n)
        view.tokens = self.tokens.narrow(0, start, n) if self.tokens is not None else None
        return view

    def copy_row(self, src, dst):
        for t in self._rows():
            t[dst].copy_(t[src])
        self.lengths[dst] = self.lengths[src]

    def fork(self, src, dsts):
        """Copy row src into each row of dsts (prefill a prompt once, sample K continuations)."""
        for dst in dsts:
            if dst != src:
                self.copy_row(src, dst)

    def reset(self):
        """Empty every row of this cache (or of this view)."""
        self.lengths.zero_()

    def store(self, layer, k, v, index, kv_len):
        """Write k, v (B, T, Hkv, D) at `index` = (rows (B, 1), positions (B, T)) of `layer` (one
        index for every layer of a forward); return this layer's keys and values (B, Hkv, kv_len,
        D) for attention."""
        kc, vc = self.k[layer], self.v[layer]
        # (B, max_len, Hkv, D) views: index (row, position) pairs, write through
        kc.transpose(1, 2)[index] = k if k.dtype == kc.dtype else k.to(kc.dtype)
        vc.transpose(1, 2)[index] = v if v.dtype == vc.dtype else v.to(vc.dtype)
        return kc[:, :, :kv_len], vc[:, :, :kv_len]

    def previous_tokens(self, idx, q_pos):
        """Store idx (B, T) at positions q_pos (B, T) of `tokens`; return (prev, has_prev): the
        token before each row's first new position (B,) and whether there is one (B,) bool
        (False for a row's first token). Needs keep_tokens=True."""
        rows = torch.arange(idx.size(0), device=idx.device)
        first = q_pos[:, 0]
        prev = self.tokens[rows, (first - 1).clamp(min=0)]  # read before the write below (it is at first - 1)
        self.tokens[rows[:, None], q_pos] = idx
        return prev, first > 0
