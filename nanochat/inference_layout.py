"""The CPU inference layout of a frozen GPT (GPT.freeze applies it): the same model and the same
values, stored so that decoding runs faster (docs/benchmarks.md, "Decode").

- Every nn.Linear weight (out, in) becomes the transpose of a contiguous (in, out) matrix (same
  values and shape, strides (1, out)): F.linear then hands MKL an operand it need not transpose,
  which helps the small row counts of decode steps and scored positions.
- Each layer's c_q, c_k and c_v weights become row blocks of one stacked matrix, so attention
  makes one product instead of three and rotates and norms q and k together (PackedQKV). An
  int8 model (quant.py) stacks its int8 rows and scales the same way.

No extra memory; state_dict() holds the same values (non-contiguous tensors; the HF export makes
them contiguous). A later `.to()` replaces the weights: the stacked matrix is then no longer what
they view, and the attention falls back to the model's own forward."""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


class PackedQKV:
    """Mixed into a layer's attention class (gpt.CausalSelfAttention): its forward with c_q, c_k
    and c_v as views of one stacked weight, qkv_weight."""

    def packed_qkv(self):
        """The stacked weight (a tensor, or an int8 model's product function, quant.py), or
        None: compiling, or a `.to()` replaced the weights since (the new tensors are no longer
        views of it, so it is dropped)."""
        w = self.qkv_weight
        if w is None or torch.compiler.is_compiling():
            return None
        if weight_ptrs(self) != self.qkv_ptrs:
            self.qkv_weight = self.qkv_ptrs = None
            return None
        return w

    def forward(self, x, ve, cos, sin, mask, cache):
        packed = self.packed_qkv()
        if packed is None:
            return super().forward(x, ve, cos, sin, mask, cache)
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = packed(x) if callable(packed) else F.linear(x, packed)
        qkv = qkv.view(B, T, H + 2 * Hkv, D)  # one product; q and k side by side
        qk, v = qkv[:, :, :H + Hkv], qkv[:, :, H + Hkv:]
        v = self.add_value_embedding(x, v, ve)
        qk = self.rope_norm(qk, cos, sin)  # the same per-head operations, both at once
        return self.attend(qk[:, :, :H], qk[:, :, H:], v, mask, cache)


def weight_ptrs(attn):
    """Where c_q, c_k and c_v keep their weights (an int8 Linear's in `qweight`)."""
    return tuple((m.qweight if hasattr(m, "qweight") else m.weight).data_ptr() for m in (attn.c_q, attn.c_k, attn.c_v))


@functools.cache
def packed(cls):
    """cls with PackedQKV's forward in front of its own (one class per attention class)."""
    return cls if issubclass(cls, PackedQKV) else type(f"Packed{cls.__name__}", (PackedQKV, cls), {})


@torch.no_grad()
def use_inference_layout(model):
    """Store a frozen model's weights in the inference layout (call it again after any `.to()`)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.data = m.weight.data.t().contiguous().t()
    for block in model.blocks:
        a = block.attn
        ws = (a.c_q.weight, a.c_k.weight, a.c_v.weight)
        stacked = torch.cat([w.t() for w in ws], dim=1).t()  # (q + k + v rows, C), strides (1, rows)
        start = 0
        for w in ws:
            w.data = stacked[start:start + w.size(0)]
            start += w.size(0)
        a.__class__ = packed(type(a))
        a.qkv_weight, a.qkv_ptrs = stacked, weight_ptrs(a)
    return model
