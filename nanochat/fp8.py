"""FP8 training of the transformer's big matmuls (`nanochat train base --fp8`), tensorwise scaling.

A Linear layer does three matmuls per training step:

    forward    y  = x @ W.T           (rows, in) x (in, out)
    backward   dx = dy @ W            (rows, out) x (out, in)
               dW = dy.T @ x          (out, rows) x (rows, in)

With --fp8 each of the three runs on the GPU's FP8 tensor cores through torch._scaled_mm. Each
operand is quantized with one scale for the whole tensor ("tensorwise", dynamic: recomputed from
the tensor's current absolute maximum on every call):

    scale = FP8_MAX / max(amax(t), EPS)      t_fp8 = saturate(t * scale) cast to FP8

and _scaled_mm takes the inverse scales and multiplies them back in after the FP8 products are
accumulated (in fp32 inside the kernel). The formats follow torchao's float8 training recipes
(and upstream nanochat): float8_e4m3fn (max 448, 3 mantissa bits) for activations and weights,
which want precision; float8_e5m2 (max 57344, 2 mantissa bits, the exponent range of fp16) for
the gradients dy, which want range. The forward uses the fast (lower precision) accumulation
mode of the Hopper kernel, the two backward GEMMs the exact one, as torchao does.

What stays as it was: the fp32 master weights (the optimizer sees ordinary fp32 parameters and
their fp32 gradients; the weight is quantized from fp32 on every forward), the module and
parameter names (checkpoints hold ordinary weights: evaluation, chat and export load them with
no trace of fp8), and everything that is not a converted Linear. convert_to_fp8 skips lm_head
(nanochat's fused loss reads lm_head.weight directly, so the module is never called) and layers
too small to gain (a dimension < 128, the value-embedding gates) or that the kernel cannot take
(a dimension not a multiple of 16). A converted layer computes in FP8 only in training mode and
for row counts that are multiples of 16 (the kernel's rule for the dW GEMM); evaluation, CORE and
sampling (model.eval()) use the ordinary matmul in the compute dtype, as upstream does.

FP8 tensor cores exist from compute capability 8.9 (Ada, Hopper, Blackwell). torch._scaled_mm
also runs on CPU in recent torch (a slow reference implementation), which is how the tests check
these exact code paths; the training stage refuses --fp8 anywhere but on such a GPU
(unsupported_reason). The speed-up needs torch.compile (upstream measured uncompiled FP8 about 4x
slower than bf16: the scaling ops are only cheap when fused).

Not verified on a GPU yet (bench/gpu_check.sh 1 does it: its fp8 and compiled checks).
"""
import collections
import re

import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn  # activations and weights
E5M2 = torch.float8_e5m2    # gradients
EPS = 1e-12                 # amax floor: an all-zero tensor gets a finite scale (and quantizes to zeros)
MIN_DIM = 128               # layers with a smaller dimension stay in the compute dtype
MULTIPLE = 16               # every dimension _scaled_mm sees must be a multiple of this (CUDA)


def fp8_max(dtype):
    return torch.finfo(dtype).max


def scale_from_amax(amax, dtype):
    """fp32 scale mapping [0, amax] onto [0, FP8_MAX] of `dtype`. The division is done in fp64
    (as torchao does) so that eager and compiled code round it the same way."""
    return (fp8_max(dtype) / amax.double().clamp(min=EPS)).float()


def quantize(t, dtype, scale=None):
    """(t * scale saturated to +-FP8_MAX, cast to `dtype`; the inverse scale, an fp32 scalar).
    scale defaults to the tensorwise dynamic one. Saturation matters: an out-of-range value
    would become inf (e5m2) or nan (e4m3fn has no inf) instead of the largest finite value;
    with the dynamic scale only rounding of t * scale can step over the edge."""
    t = t.float()
    if scale is None:
        scale = scale_from_amax(t.abs().amax(), dtype)
    m = fp8_max(dtype)
    return (t * scale).clamp(-m, m).to(dtype), scale.reciprocal()


def dequantize(t_fp8, inv_scale):
    """The fp32 values an FP8 tensor and its inverse scale stand for."""
    return t_fp8.float() * inv_scale


def _col_major(t):
    """Same values, column-major strides (what _scaled_mm wants for its second operand)."""
    return t.t().contiguous().t()


class _FP8Matmul(torch.autograd.Function):
    """x2d @ w.T with all three GEMMs in FP8. Saves the FP8 copies of x and w (half the bytes of
    bf16 activations) for the backward, not the originals."""

    @staticmethod
    def forward(ctx, x2d, w):
        xq, x_inv = quantize(x2d.contiguous(), E4M3)  # row-major FP8 copies (elementwise ops keep layout)
        wq, w_inv = quantize(w, E4M3)
        ctx.save_for_backward(xq, x_inv, wq, w_inv)
        ctx.dtypes = (x2d.dtype, w.dtype)
        # xq (rows, in) is row-major; wq.t() (in, out) is column-major without a copy
        return torch._scaled_mm(xq, wq.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=x2d.dtype,
                                use_fast_accum=True)

    @staticmethod
    def backward(ctx, dy):
        xq, x_inv, wq, w_inv = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        dyq, dy_inv = quantize(dy.contiguous(), E5M2)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # (rows, out) @ (out, in)
            dx = torch._scaled_mm(dyq, _col_major(wq), scale_a=dy_inv, scale_b=w_inv, out_dtype=x_dtype,
                                  use_fast_accum=False)
        if ctx.needs_input_grad[1]:  # (out, rows) @ (rows, in), straight into the fp32 master's dtype
            dw = torch._scaled_mm(dyq.t().contiguous(), _col_major(xq), scale_a=dy_inv, scale_b=x_inv,
                                  out_dtype=w_dtype, use_fast_accum=False)
        return dx, dw


def fp8_matmul(x2d, w):
    """x2d (rows, in) @ w (out, in).T, forward and backward in FP8 (see the module docstring)."""
    return _FP8Matmul.apply(x2d, w)


class FP8Linear(nn.Linear):
    """nn.Linear whose training-mode matmuls run in FP8; same parameters, same state_dict."""

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if not self.training or rows % MULTIPLE:
            return super().forward(x)  # evaluation and odd shapes: the ordinary matmul
        y = fp8_matmul(x.reshape(rows, x.shape[-1]), self.weight).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def eligible(module, name, min_dim=MIN_DIM, skip=("lm_head",)):
    """Why a Linear is kept out of FP8 (a short reason), or None if it is converted."""
    if name.rsplit(".", 1)[-1] in skip:
        return "skipped by name"
    dims = (module.in_features, module.out_features)
    if any(d % MULTIPLE for d in dims):
        return f"a dimension is not a multiple of {MULTIPLE}"
    if min(dims) < min_dim:
        return f"smaller than {min_dim}"
    return None


def convert_to_fp8(model, min_dim=MIN_DIM, skip=("lm_head",)):
    """Swap every eligible nn.Linear of `model` for an FP8Linear sharing its parameters (no copy),
    in place. Returns (converted, kept): the names of the converted Linears, and {name: reason}
    for the others."""
    converted, kept = [], {}
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        reason = eligible(module, name, min_dim, skip)
        if reason:
            kept[name] = reason
            continue
        with torch.device("meta"):  # a shell without memory, then the original parameters
            new = FP8Linear(module.in_features, module.out_features, bias=module.bias is not None)
        new.weight, new.bias = module.weight, module.bias
        new.train(module.training)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        converted.append(name)
    return converted, kept


def summarize(names):
    """'blocks.*.mlp.c_fc x12, lm_head': names with their layer numbers folded."""
    counts = collections.Counter(re.sub(r"\.\d+(?=\.|$)", ".*", n) for n in names)
    return ", ".join(k if c == 1 else f"{k} x{c}" for k, c in counts.items())


def unsupported_reason(device):
    """None if `device` can train in FP8 here, else why not (one sentence)."""
    device = torch.device(device)
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return f"this torch ({torch.__version__}) has no torch._scaled_mm / float8 dtypes"
    if device.type != "cuda":
        return (f"FP8 training needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, "
                f"Blackwell); this run is on {device.type}")
    if torch.version.hip:
        return "FP8 training is only wired for NVIDIA GPUs (ROCm uses other float8 formats)"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return (f"{torch.cuda.get_device_name(device)} has compute capability {cap[0]}.{cap[1]}; FP8 tensor "
                f"cores need 8.9 or newer (Ada, Hopper, Blackwell)")
    return None


def reference_linear(x2d, w, dy):
    """What the FP8 layer computes, emulated in fp32: every operand quantized and dequantized,
    then ordinary matmuls. Returns (y, dx, dw) for the upstream gradient dy (tests, gpu_check)."""
    xd, wd = dequantize(*quantize(x2d, E4M3)), dequantize(*quantize(w, E4M3))
    dyd = dequantize(*quantize(dy, E5M2))
    return xd @ wd.t(), dyd @ wd, dyd.t() @ xd

