"""The language-model loss: lm_head, logit soft-capping and cross-entropy, computed in chunks.

`reference_loss` is the readable definition (full fp32 logits, `F.cross_entropy`); `lm_loss` is
what the model runs, tested to give the same loss and gradients:
- the (B*T, vocab) fp32 logits never exist at once: rows are processed `chunk_rows` at a time;
- with gradients and a mean/sum reduction, `SoftcapCrossEntropy` computes the gradients of each
  chunk right away in its forward pass (no logits kept, nothing recomputed in the backward);
- with gradients and reduction "none" (per-token weights, e.g. RL), each chunk is checkpointed.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SOFTCAP = 15.0
CHUNK_ELEMENTS = 2**27  # at most this many fp32 logits live at once
CHUNK_ROWS_CPU = 1024   # on CPU smaller chunks are faster (docs/benchmarks.md)


def softcap(logits):
    """SOFTCAP * tanh(logits / SOFTCAP) of fp32 logits. On CPU without grads it is computed in
    place as 2 cap sigmoid(2u / cap) - cap: torch's CPU tanh is slower than its sigmoid."""
    if logits.device.type == "cpu" and not torch.is_grad_enabled():
        return logits.mul_(2.0 / SOFTCAP).sigmoid_().mul_(2.0 * SOFTCAP).sub_(SOFTCAP)
    return SOFTCAP * torch.tanh(logits / SOFTCAP)


def logits_of(x, weight):
    """Soft-capped fp32 logits of normalized hidden states x (..., C) through lm_head `weight`."""
    return softcap(F.linear(x, weight).float())


def reference_loss(x, weight, targets, reduction="mean"):
    """The definition: cross_entropy(softcap(x @ W.T), targets), ignore index -1. A mean over
    zero targets is 0 (not NaN), like lm_loss."""
    losses = F.cross_entropy(logits_of(x, weight), targets, ignore_index=-1, reduction="none")
    if reduction == "none":
        return losses
    total = losses.sum()
    return total if reduction == "sum" else total / (targets != -1).sum().clamp(min=1)


# logits turned into gradients at a time on CPU: 1 MB of fp32 stays in cache (8 rows at vocab 32K);
# counted in elements, not rows, so a small vocabulary does not pay a Python loop step per few rows
BLOCK_ELEMENTS_CPU = 8 * 32768

_workspace = {}  # (device, name) -> flat fp32 buffer reused by SoftcapCrossEntropy on CPU


def cpu_workspace(device, numel, name="logits"):
    """A reusable fp32 buffer of at least `numel` elements (CPU only). Freshly allocated
    tensors this big come straight from the OS (mmap) and every page is faulted in and zeroed
    by the kernel at first touch, a large share of a CPU training step at vocab 32K."""
    buf = _workspace.get((device, name))
    if buf is None or buf.numel() < numel:
        buf = _workspace[(device, name)] = torch.empty(numel, dtype=torch.float32, device=device)
    return buf


def softcap_ce_grad_(v, targets, block_rows, scratch):
    """The summed loss of one chunk, turning `v` into its gradient in place.

    v (n, V) fp32 holds the raw logits u scaled by 2 / cap. With s = sigmoid(v): tanh(u / cap) =
    2s - 1, so the soft-capped logits are z = cap (2s - 1) and dz/du = 1 - tanh^2 = 4 s (1 - s)
    (on CPU sigmoid takes a third of tanh's time). softmax(z) = exp(2 cap s) / sum(...): the
    constant exp(-cap) cancels, and 2 cap s lies in [0, 2 cap], so exp cannot overflow (no
    max-subtraction); the row loss is log(sum exp(2 cap s)) - 2 cap s_target. On return v holds
    dloss/du = (softmax - onehot) 4 s (1 - s), zero on ignored rows (target -1).
    The rows go `block_rows` at a time, their exp in `scratch` (>= block_rows x V elements): on
    CPU a block of 8 rows stays in cache through all six passes, so the big buffer is read and
    written once instead of six times."""
    total = v.new_zeros(())
    V = v.size(1)
    valid = targets != -1
    tgt = targets.clamp(min=0)[:, None]
    for b in range(0, v.size(0), block_rows):
        s = v[b:b + block_rows].sigmoid_()
        m = s.size(0)
        e = torch.mul(s, 2.0 * SOFTCAP, out=scratch[:m * V].view(m, V)).exp_()
        vb, tb = valid[b:b + m], tgt[b:b + m]
        sumexp = e.sum(dim=-1)
        total += ((sumexp.log() - (2.0 * SOFTCAP) * s.gather(1, tb).squeeze(1)) * vb).sum()
        e.mul_((4.0 * vb / sumexp)[:, None])              # 4 softmax; ignored rows -> 0
        e.scatter_add_(1, tb, -4.0 * vb[:, None].float())  # minus 4 one-hot of the target
        s.addcmul_(s, s, value=-1.0).mul_(e)               # through the soft-cap: x s (1 - s)
    return total


class SoftcapCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(SOFTCAP * tanh(x @ W.T / SOFTCAP), targets), ignore index -1.

    Fused and chunked: for each chunk of rows the fp32 logits are made, the loss taken, and the
    gradients with respect to x and W computed right away (softcap_ce_grad_), in place in one
    (rows, vocab) buffer. The backward pass only scales them by the incoming scalar gradient.
    Compared with autograd over the plain formula this saves the logits' memory, several full
    passes over them, and a recomputation. On CPU the buffers live in a workspace kept between
    calls (see cpu_workspace)."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows):
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = x.dtype
        w = weight.to(dtype)
        V = w.size(0)
        grad_x = torch.empty_like(x)
        # the first chunk sets it (zeros only when there are no rows at all)
        grad_w = (torch.empty if x.size(0) else torch.zeros)(weight.shape, dtype=torch.float32, device=weight.device)
        # accumulated out of place: torch 2.11's dynamo gives zero gradients to a Function whose
        # output was a tensor updated in place (`total +=`); 2.13 does not (tests/test_cuda_paths.py)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        cpu = x.device.type == "cpu" and not torch.compiler.is_compiling()
        rows = min(chunk_rows, x.size(0))
        if cpu:
            block = max(1, min(BLOCK_ELEMENTS_CPU // V, rows))
            scratch = cpu_workspace(x.device, block * V, "block")
        for s in range(0, x.size(0), chunk_rows):
            xc, tc = x[s:s + chunk_rows].to(dtype), targets[s:s + chunk_rows]
            n = xc.size(0)
            xs = xc * (2.0 / SOFTCAP)  # the 2/cap scales the (rows, C) input, not the (rows, V) logits
            if cpu and dtype == torch.float32:
                v = torch.mm(xs, w.t(), out=cpu_workspace(x.device, rows * V)[:n * V].view(n, V))
            else:
                v = (xs @ w.t()).float()
            if cpu:
                total = total + softcap_ce_grad_(v, tc, block, scratch)
            else:  # on a GPU one block of all the rows: few big kernels
                total = total + softcap_ce_grad_(v, tc, n, torch.empty_like(v))
            g = v.to(dtype)
            grad_x[s:s + chunk_rows] = (g @ w).to(x.dtype)
            if grad_w.dtype == g.dtype:
                if s == 0:
                    torch.mm(g.t(), xc, out=grad_w)
                else:
                    grad_w.addmm_(g.t(), xc)
            elif s == 0:
                grad_w.copy_(g.t() @ xc)
            else:
                grad_w += (g.t() @ xc).float()
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_x, grad_w = ctx.saved_tensors
        # in place: both are this function's own buffers, used nowhere else
        grad_x.mul_(grad_total.to(grad_x.dtype))
        return grad_x, grad_w.mul_(grad_total).to(ctx.weight_dtype), None, None


def default_chunk_rows(vocab_size, device):
    n = max(1, CHUNK_ELEMENTS // vocab_size)
    return min(n, CHUNK_ROWS_CPU) if device.type == "cpu" else n


def lm_loss(x, weight, targets, reduction="mean", chunk_rows=None):
    """reference_loss(x, weight, targets, reduction) for x (N, C), targets (N,), in chunks of
    `chunk_rows` rows (None = default_chunk_rows). A mean over zero targets is 0 with zero
    gradients, not NaN: a fully masked SFT micro-batch must not poison the step."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"loss_reduction must be mean, sum or none, not '{reduction}'")
    N = x.size(0)
    n = chunk_rows or default_chunk_rows(weight.size(0), x.device)
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if grad and reduction != "none":
        total = SoftcapCrossEntropy.apply(x, weight, targets, n)
        return total if reduction == "sum" else total / (targets != -1).sum().clamp(min=1)

    def chunk(xc, tc):
        return F.cross_entropy(logits_of(xc, weight), tc, ignore_index=-1, reduction="none")
    if N <= n:
        losses = chunk(x, targets)
    else:
        losses = torch.cat([checkpoint(chunk, x[s:s + n], targets[s:s + n], use_reentrant=False) if grad
                            else chunk(x[s:s + n], targets[s:s + n]) for s in range(0, N, n)])
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets != -1).sum().clamp(min=1)
