"""Speed-only forms of two of the model's operations, the same numbers as gpt.py's formulas:
the rotary embedding and relu(x)^2 with hand-written backwards (fewer passes over the
activations than autograd through the formula). Used in eager mode only; a compiled graph
fuses the plain formula by itself."""
import torch


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


def rotary(x, cos, sin):
    """Eager rotary embedding: with gradients through Rotary, without them rotate() alone."""
    return Rotary.apply(x, cos, sin) if torch.is_grad_enabled() else rotate(x, cos, sin)


class ReluSquared(torch.autograd.Function):
    """relu(x)^2 with a backward of two passes (2 relu(x) * grad) instead of autograd's four
    (pow's three, then relu's)."""

    @staticmethod
    def forward(ctx, x):
        h = torch.relu(x)
        ctx.save_for_backward(h)
        return h * h

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return torch.mul(grad, h).mul_(2.0)
