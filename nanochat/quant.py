"""Weight formats for inference: fp32, bf16 and int8 (`--weights` of chat, serve, eval and bench/infer.py).

Decoding one token reads every weight once, so its speed is set by the bytes the weights take
(docs/serving.md, "Weight formats"). fp32 and bf16 are the model's own weights in that dtype.
int8 is weight-only: every matrix (attention, MLP, lm_head) and every embedding table (the token
and value embeddings: most of a small model's bytes) is stored as int8 with one symmetric fp32
scale per output channel (a matrix's row; an embedding's row), w ~ q * scale, q in [-127, 127].
Activations, the small gates, the per-layer scalars and the KV cache stay in the compute dtype.
An embedding dequantizes only the rows it looks up. The matrices use torch's int8 weight-only
kernel (`aten._weight_int8pack_mm`); `reference_int8_linear` is the definition tests hold it to.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import UserError, compute_dtype_choice
from nanochat.inference_layout import weight_ptrs

WEIGHT_FORMATS = ("fp32", "bf16", "int8")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def add_weights_flag(parser):
    parser.add_argument("--weights", default=None, choices=WEIGHT_FORMATS,
                        help="inference weight format (default: bf16 where the compute-dtype probe picks bf16, "
                             "fp32 otherwise; int8 = weight-only, per-channel scales)")


def weights_choice(weights, device_type):
    """(weights, activation dtype, why) for --weights (None = the default for this device)."""
    dtype, why = compute_dtype_choice(device_type)
    if weights is None:
        weights = "bf16" if dtype == torch.bfloat16 else "fp32"
        why = f"default, compute dtype {DTYPE_NAMES.get(dtype, dtype)}: {why}"
    elif weights not in WEIGHT_FORMATS:
        raise UserError(f"--weights must be one of {', '.join(WEIGHT_FORMATS)}, not '{weights}'")
    if weights == "fp32":
        return weights, torch.float32, why
    if weights == "bf16":
        return weights, torch.bfloat16, why
    return weights, dtype, why  # int8: activations in the compute dtype


def describe_weights(weights, device_type):
    """The startup line's words for the format, e.g. 'weights int8 (activations fp32; ...)'."""
    weights, dtype, why = weights_choice(weights, device_type)
    return f"weights {weights} (activations {DTYPE_NAMES.get(dtype, dtype)}; {why})"


# ---------------------------------------------------------------------------
# int8

def quantize_rows(w):
    """(q, scale) with w ~ q * scale[:, None]: q int8 in [-127, 127] (contiguous), scale fp32 (rows,),
    symmetric, one per row (a Linear's output channel, an embedding's token)."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return q, scale


def reference_int8_linear(x, q, scale):
    """The definition: x @ (q * scale).T in fp32, returned in x's dtype."""
    return (F.linear(x.float(), q.float()) * scale.float()).to(x.dtype)


KERNEL_MAX_ROWS = 16  # more rows at once (prefill, evaluation): a dense matmul of the dequantized matrix is faster


def int8_linear(x, q, scale, ones):
    """x (..., K) @ (q * scale).T, the result in x's dtype. Decoding (at most KERNEL_MAX_ROWS rows)
    on CPU: torch's int8 weight-only kernel, which is vectorized (AVX2/AVX-512) for bf16 inputs
    only (with fp32 ones it runs ~10x slower than an fp32 matmul, docs/serving.md): x goes in
    rounded to bf16, accumulation is fp32, the product comes out in bf16. The kernel gets unit
    scales (`ones`, bf16) and the fp32 scales are applied after, so they are not rounded to bf16.
    Many rows, or off CPU: the matrix dequantized for the call and a dense matmul in x's dtype
    (at 64 rows the kernel took ~2x the fp32 matmul's time here)."""
    shape = x.shape
    if x.device.type != "cpu" or x.numel() // shape[-1] > KERNEL_MAX_ROWS:
        return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), q, ones)
    return y.to(x.dtype).mul_(scale).view(*shape[:-1], q.size(0))


class Int8Linear(nn.Module):
    """A bias-free nn.Linear stored as int8 with one fp32 scale per output channel."""

    def __init__(self, linear, dtype=torch.float32, quantized=None):
        """quantized: (q, scale, ones) already made (views of a stacked q/k/v), else made from linear."""
        super().__init__()
        self.dtype = dtype  # of the activations it multiplies
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if quantized is None:
            q, scale = quantize_rows(linear.weight)
            quantized = q, scale, torch.ones(q.size(0), dtype=torch.bfloat16, device=q.device)
        q, scale, ones = quantized
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("ones", ones, persistent=False)

    def forward(self, x):
        return int8_linear(x, self.qweight, self.scale, self.ones)

    @property
    def weight(self):
        """The dequantized matrix (a new tensor, in the activations' dtype), for code that needs the
        matrix itself: the chunked loss of evaluation (one per call, not per token)."""
        return (self.qweight.float() * self.scale[:, None]).to(self.dtype)


class Int8Embedding(nn.Module):
    """An nn.Embedding stored as int8 with one fp32 scale per row; a lookup dequantizes only the
    rows it reads, into `dtype`."""

    def __init__(self, embedding, dtype):
        super().__init__()
        q, scale = quantize_rows(embedding.weight)
        self.dtype = dtype
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)

    def forward(self, idx):
        return (self.qweight[idx].to(torch.float32) * self.scale[idx].unsqueeze(-1)).to(self.dtype)


@torch.no_grad()
def quantize_int8(model, dtype):
    """Replace every matrix and embedding of a frozen GPT (model.freeze(dtype) first) by its int8
    form, in place. The tiny smear and value-embedding gates (24 and 12 inputs) stay as they are.
    Returns the model."""
    model.wte = Int8Embedding(model.wte, dtype)
    for name in list(model.value_embeds):
        model.value_embeds[name] = Int8Embedding(model.value_embeds[name], dtype)
    model.lm_head = Int8Linear(model.lm_head, dtype)
    for block in model.blocks:
        a = block.attn
        parts = (a.c_q, a.c_k, a.c_v)
        if getattr(a, "qkv_weight", None) is None:  # not in the CPU layout (off CPU): three products
            a.c_q, a.c_k, a.c_v = (Int8Linear(m, dtype) for m in parts)
        else:  # one int8 product for q, k and v, as the CPU layout stacks them (per-row scales: the same values)
            q, scale = quantize_rows(a.qkv_weight)
            ones = torch.ones(q.size(0), dtype=torch.bfloat16, device=q.device)
            ends = [sum(m.out_features for m in parts[:i + 1]) for i in range(3)]
            a.c_q, a.c_k, a.c_v = (Int8Linear(m, dtype, (q[s:e], scale[s:e], ones[s:e]))
                                   for m, s, e in zip(parts, [0] + ends, ends))
            a.qkv_weight = functools.partial(int8_linear, q=q, scale=scale, ones=ones)
            a.qkv_ptrs = weight_ptrs(a)
        a.c_proj = Int8Linear(a.c_proj, dtype)
        block.mlp.c_fc, block.mlp.c_proj = Int8Linear(block.mlp.c_fc, dtype), Int8Linear(block.mlp.c_proj, dtype)
    return model


def prepare_for_inference(model, weights, device_type):
    """Freeze `model` (GPT.freeze) with weights in the format `weights` (None = the default).
    Returns the model."""
    weights, dtype, _ = weights_choice(weights, device_type)
    model.freeze(dtype)  # int8 quantizes these (bf16 ones: its rounding first is at most 1/4 of an int8 step)
    if weights == "int8":
        quantize_int8(model, dtype)
    return model


def weight_bytes(model):
    """Bytes of every storage the model's parameters and buffers live in (each once: the CPU
    layout's q/k/v weights are views of one): its weights as stored."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
