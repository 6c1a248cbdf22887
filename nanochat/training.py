"""The plumbing of a training loop that the stages share (nanochat/run.py holds the lifecycle):
the step log, when periodic jobs are due, clearing gradients, the announcement of a mid/sft/rl
run, and small collectives (sums, max, agreement) with the out-of-memory handling of the
micro-batch probe."""
import time

import torch
import torch.distributed as dist

from nanochat.common import print0, synchronize


def clear_grads(model):
    """Zero the gradients for the next step: freed on CUDA (the caching allocator reuses the
    memory), kept and zeroed in place on the CPU, where re-allocating them every step fragments
    glibc's heap and the resident memory keeps growing (docs/benchmarks.md, "Memory")."""
    model.zero_grad(set_to_none=next(model.parameters()).device.type != "cpu")


def is_due(step, every, last, at_start=False, at_end=True):
    """Is a periodic job (an evaluation, a save) due at step boundary `step`? Every `every` steps
    when every > 0 (step 0 only with at_start), and at the last boundary when at_end (so
    `every` = -1 means "only at the end") or when every > 0 (at_end=False: -1 means "never")."""
    if every > 0 and step % every == 0 and (step > 0 or at_start):
        return True
    return last and (at_end or every > 0)


# ---------------------------------------------------------------------------
# The step log


def format_time(s):
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class StepLog:
    """The bookkeeping of a training loop's log lines, shared by train base, mid and sft: step
    timing (evaluations excluded), the EMA of the train loss kept on the device (updated every
    step without waiting for it), tokens/s, MFU and ETA. `line()` is the only place that waits
    for the device. The EMA and the total time are saved in checkpoints (state()) so that a
    resumed run continues the same curve."""

    def __init__(self, device, total_batch_size, num_iterations, smooth_loss=0.0, total_time=0.0, beta=0.9):
        self.device = device
        self.total_batch_size = total_batch_size
        self.num_iterations = num_iterations
        self.beta = beta
        self.smooth = torch.full((), float(smooth_loss), device=device)  # biased EMA (debiased when shown)
        self.total_time = total_time
        self.t0 = time.time()
        self.steps = 0          # steps since the last log line
        self.dt_ema = None      # smoothed seconds per step, for the ETA
        self.loss = None        # the last step's train loss (a device tensor)

    def begin_step(self):
        """Call before each optimizer step: the clock runs from the first step after a log line
        (evaluations between two steps do not count as training time)."""
        if self.steps == 0:
            self.t0 = time.time()

    def end_step(self, train_loss):
        self.loss = train_loss
        self.smooth.mul_(self.beta).add_(train_loss, alpha=1 - self.beta)
        self.steps += 1

    def due(self, step, log_every):
        return step % log_every == 0 or step == self.num_iterations

    def lap(self):
        """Seconds per step since the last lap (waits for the device); adds them to total_time."""
        synchronize(self.device)
        now = time.time()
        dt = (now - self.t0) / self.steps
        self.total_time += now - self.t0
        self.t0, self.steps = now, 0
        return dt

    def line(self, step, lrm, first_step, flops_per_token=None, peak_flops=None, world_size=1, text="", **extra):
        """Print the log line of `step` and return its metrics record (extra keys included)."""
        dt = self.lap()
        loss = float(self.loss)
        smooth = float(self.smooth) / (1 - self.beta ** step)
        tok_per_sec = self.total_batch_size / dt
        mfu = flops_per_token * tok_per_sec / (peak_flops * world_size) if (peak_flops and flops_per_token) else None
        if step > first_step + 1:  # the first step includes compilation and warm-up
            self.dt_ema = dt if self.dt_ema is None else 0.9 * self.dt_ema + 0.1 * dt
        eta = (self.dt_ema or dt) * (self.num_iterations - step)
        mfu_s = f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""
        print0(f"step {step:05d}/{self.num_iterations:05d} ({100 * step / self.num_iterations:.1f}%) | loss {loss:.4f} "
               f"(smooth {smooth:.4f}) | lrm {lrm:.3f}{text} | dt {1000 * dt:.1f}ms | tok/s {tok_per_sec:,.0f}"
               f"{mfu_s} | eta {format_time(eta)}")
        return dict(step=step, loss=loss, smooth_loss=smooth, lrm=lrm, dt=dt, tok_per_sec=tok_per_sec,
                    mfu=mfu, total_time=self.total_time, tokens=step * self.total_batch_size, **extra)

    def state(self):
        return dict(smooth_loss=float(self.smooth), total_time=self.total_time)

    def load_state(self, state):
        self.smooth.fill_(float(state.get("smooth_loss", 0.0)))
        self.total_time = state.get("total_time", 0.0)


def announce_start(args, model_tag, src_step, out_dir, lrs, world_size, plan, **extra):
    """The derived configuration of a mid/sft/rl run: its source, its learning rates (inherited
    `lrs` x --init-lr-frac) and `extra`. Prints where it starts, `plan` (what it will do) and the
    learning rates; with --dry-run, the whole configuration."""
    derived = dict(model_tag=model_tag, source=f"{args.source}/{model_tag}@{src_step}", world_size=world_size,
                   **extra, lrs={k: v * args.init_lr_frac for k, v in lrs.items()})
    print0(f"from {args.source}/{model_tag} step {src_step} -> {out_dir}")
    print0(plan)
    print0("learning rates: " + ", ".join(f"{k} {v:.4g}" for k, v in derived["lrs"].items())
           + f" (inherited x {args.init_lr_frac})")
    if args.dry_run:
        print0(derived)
    return derived


# ---------------------------------------------------------------------------
# Sums over processes, out-of-memory, agreeing on a micro-batch


def distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_sum(x: float, device) -> float:
    """Sum of a number over all processes (itself without torchrun)."""
    if distributed():
        t = torch.tensor([float(x)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())
    return float(x)


def global_max(x: int, device) -> int:
    """Max of an integer over all processes (itself without torchrun)."""
    if distributed():
        t = torch.tensor([x], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())
    return int(x)


def all_agree(flag: bool, device) -> bool:
    """True when `flag` is true on every process (a MIN all-reduce; `flag` itself without torchrun)."""
    if distributed():
        t = torch.tensor([int(bool(flag))], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())
    return bool(flag)


def is_out_of_memory(e) -> bool:
    """torch's OutOfMemoryError, or a RuntimeError that an allocator or library raised saying so
    (e.g. a cuBLAS workspace that could not be allocated)."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def largest_fitting(candidates, fits, device):
    """The first of `candidates` (largest first) for which fits(candidate) holds on every process,
    or None. All processes try the same candidates in the same order and agree on each answer
    (all_agree), so they all choose the same value: a rank that chose alone could pick another
    micro-batch, hence another accumulation count, and the step's collectives would hang. An
    out-of-memory error inside fits means "does not fit"; any other error is raised."""
    for c in candidates:
        try:
            ok = bool(fits(c))
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            ok = False
        if all_agree(ok, device):
            return c
    return None
