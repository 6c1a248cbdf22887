"""`--device-batch-size auto`: the largest micro-batch whose training step fits in GPU memory.

A step holds the fp32 parameters and gradients, the optimizer state of this rank, and the
activations the backward needs. The optimizer state is sharded (optim.py): with N ranks each
keeps about 1/N of it, so it is counted per rank, not as whole copies of the parameters. The
activations are what the model that trains saves: the compiled one (with FP8 and activation
checkpointing if on), which needs less than the eager model.

Two steps, so that a run compiles at most one shape it will not use:
1. estimated_batch: from the shapes alone (works on the meta device), with ACT_BYTES bytes per
   token, layer and channel, the eager bf16 figure (~47-49 x n_embd, measured upstream and here):
   an upper bound of what the compiled step needs, so the estimate fits.
2. probe_order + largest_fitting: the candidate above the estimate and then the estimate itself,
   each tried with the compiled step (fits_measured): the first that fits on every rank wins.
   Its compiled graph is the one training then runs (same shapes).
"""
import torch

from nanochat.optim import SHARD_MIN_NUMEL, gpt_param_groups

ACT_BYTES = 48    # bytes saved per token, per layer, per channel by an eager bf16 forward (estimate)
HEADROOM = 0.9    # the share of GPU memory a step may use (the rest: allocator slack, NCCL, cuBLAS)


def optimizer_state_bytes(model, world_size=1):
    """Bytes of MuonAdamW state one of `world_size` ranks holds, from the shapes alone (optim.py's
    sharding rules): a Muon group's K matrices are split ceil(K / N) per rank, each with a
    momentum buffer and a per-row (rows >= cols) or per-column variance; an AdamW tensor has two
    moments, split along dim 0 when it is big enough and dim 0 divides by N, else kept whole."""
    total = 0
    for group in gpt_param_groups(model):
        params = group["params"]
        size = params[0].element_size()
        if group["kind"] == "muon":
            rows, cols = params[0].shape
            per_rank = -(-len(params) // world_size)
            total += per_rank * (rows * cols + max(rows, cols)) * size
        else:
            for p in params:
                sharded = world_size == 1 or (p.dim() > 0 and p.numel() >= SHARD_MIN_NUMEL and p.size(0) % world_size == 0)
                total += 2 * (p.numel() // world_size if sharded else p.numel()) * size
    return total


def fixed_bytes(model, world_size=1):
    """Memory a step needs whatever the batch: parameters, their gradients, this rank's optimizer state."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * params + optimizer_state_bytes(model, world_size)


def estimated_bytes(model, B, T, world_size=1, act_bytes=ACT_BYTES):
    """Peak bytes of a training step at micro-batch B (see the module docstring)."""
    c = model.config
    return fixed_bytes(model, world_size) + B * T * c.n_layer * c.n_embd * act_bytes


def estimated_batch(model, T, total_bytes, candidates, world_size=1, act_bytes=ACT_BYTES, headroom=HEADROOM):
    """The largest of `candidates` (largest first) whose estimated step fits in headroom x total_bytes, or None."""
    budget = headroom * total_bytes
    return next((b for b in candidates if estimated_bytes(model, b, T, world_size, act_bytes) <= budget), None)


def probe_order(candidates, estimate):
    """The candidates worth measuring: the one above the estimate (the compiled step may fit it),
    then the estimate and everything below (in case the estimate was wrong)."""
    if estimate is None:
        return list(candidates)
    i = list(candidates).index(estimate)
    return list(candidates)[max(0, i - 1):]


def fits_measured(step, reserve_bytes, device, headroom=HEADROOM):
    """fits(b) for training.largest_fitting on CUDA: run step(b) (a forward + backward of the model
    training will run) and require its peak allocated memory plus `reserve_bytes` (what is not
    allocated yet: the optimizer state) to stay within headroom x the GPU's memory. An
    out-of-memory error inside step means "does not fit" (largest_fitting catches it).
    The batches tried are kept in fits.tried, the peaks of those that ran in fits.peaks ({b: bytes})."""
    total = torch.cuda.get_device_properties(device).total_memory

    def fits(b):
        fits.tried.append(b)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step(b)
        torch.cuda.synchronize(device)
        fits.peaks[b] = torch.cuda.max_memory_allocated(device)
        return fits.peaks[b] + reserve_bytes <= headroom * total
    fits.peaks, fits.tried = {}, []
    return fits
