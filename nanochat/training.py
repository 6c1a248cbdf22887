"""What the training stages (`train base`, `mid`, `sft`, `rl`) share: schedules, the step log,
learning-rate inheritance, flags and their checks, resume resolution, and small distributed sums.

A training loop has the same skeleton in every stage:

    while True:
        last = step == num_iterations
        fresh = resumed and step == start_step     # this boundary was handled before the stop
        ... evaluations due at this boundary (is_due) -> record ...
        write_record(...); save when is_due(step, save_every, last)
        if last: break
        set_lrs(optimizer, lr_multiplier(step, ...), momentum); one optimizer step; step += 1
        log a line when log.due(step, log_every)
"""
import argparse
import math
import time

import torch
import torch.distributed as dist

from nanochat.common import UserError, add_common_flags, print0, synchronize

# ---------------------------------------------------------------------------
# The --depth rules of `train base` (docs/training.md)


def model_dims(depth, aspect_ratio, head_dim):
    """(model_dim, n_head): depth * aspect_ratio rounded up to a multiple of head_dim."""
    dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    return dim, dim // head_dim


# The reference run the hyperparameters were tuned at (upstream nanochat): a depth-12 model
# trained on --target-param-data-ratio x its scaling parameters, at 2^19 tokens per step.
REF_DEPTH = 12
REF_BATCH_TOKENS = 2 ** 19
BATCH_EXPONENT = 0.383  # B_opt ~ D^0.383 ("Power Lines", Bergsma et al. 2025, arXiv:2505.13738)


def scaling_params(counts):
    """The parameter count the horizon and the batch rule use (upstream's "scaling params"): the
    transformer matrices and the output head; not the embedding tables (lookups, no FLOPs) nor
    the scalars. `counts`: GPT.num_params_by_category()."""
    return counts["transformer_matrices"] + counts["lm_head"]


def derive_total_batch_size(train_tokens, ref_tokens, tokens_per_fwdbwd):
    """Tokens per step for a horizon of `train_tokens`: 2^19 x (train_tokens / ref_tokens)^0.383,
    rounded to the nearest power of two, then to a whole number (at least 1) of micro-batches
    (tokens_per_fwdbwd = device batch x seq len x processes)."""
    target = REF_BATCH_TOKENS * (max(train_tokens, 1.0) / ref_tokens) ** BATCH_EXPONENT
    target = 2 ** round(math.log2(target))
    return max(1, round(target / tokens_per_fwdbwd)) * tokens_per_fwdbwd


def batch_lr_scale(total_batch_size):
    """Every learning rate is multiplied by sqrt(B / 2^19), B = the run's tokens per step (the
    AdamW rule, used for Muon too, as upstream does)."""
    return (total_batch_size / REF_BATCH_TOKENS) ** 0.5


def scaled_weight_decay(weight_decay, total_batch_size, train_tokens, ref_tokens):
    """Muon's weight decay for this run from the reference one (tuned at d12, 2^19 tokens per
    step): lambda_ref x sqrt(B / 2^19) x (ref_tokens / train_tokens). With lr ~ sqrt(B) this keeps
    B / (lr x lambda x D) (the "T_epoch" of Wang & Aitchison, arXiv:2405.13698) at the reference's."""
    return weight_decay * batch_lr_scale(total_batch_size) * (ref_tokens / train_tokens)


# ---------------------------------------------------------------------------
# Schedules


def lr_multiplier(it, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac, warmup_steps=None):
    """Linear warmup, constant, linear warmdown to final_lr_frac. `it` counts from 0. The warmup
    is warmup_steps steps when given, else round(warmup_ratio * num_iterations)."""
    warmup = warmup_steps if warmup_steps is not None else round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if it < warmup:
        return (it + 1) / warmup
    if it <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - it) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(it, warmup=300, peak=0.95, num_iterations=None, warmdown_ratio=0.0, final=0.90):
    """0.85 -> `peak` linearly over the first `warmup` steps (high momentum early makes training
    unstable), then `peak`. With num_iterations: from the start of the lr warmdown (the last
    round(warmdown_ratio * num_iterations) steps, as lr_multiplier) linearly down to `final` at
    the end (the warmup wins where they overlap). Defaults: mid's schedule, 0.85 -> 0.95."""
    if it < warmup:
        frac = it / warmup
        return (1 - frac) * 0.85 + frac * peak
    warmdown = round(warmdown_ratio * num_iterations) if num_iterations is not None else 0
    start = num_iterations - warmdown if warmdown else None
    if start is not None and it >= start:
        progress = (it - start) / warmdown
        return (1 - progress) * peak + progress * final
    return peak


def base_muon_momentum(it, num_iterations, warmdown_ratio):
    """`train base`'s Muon momentum (upstream HEAD): 0.85 -> 0.97 over 400 steps, 0.97, then down
    to 0.90 over the lr warmdown."""
    return muon_momentum(it, warmup=400, peak=0.97, num_iterations=num_iterations,
                         warmdown_ratio=warmdown_ratio, final=0.90)


def weight_decay_at(it, weight_decay, num_iterations):
    """Muon's weight decay at step `it`: cosine from weight_decay at step 0 to 0 at the end."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * it / num_iterations))


def set_lrs(optimizer, lrm, momentum=None, weight_decay=None):
    """Every group's lr = its initial lr x lrm; Muon groups also get `momentum` and
    `weight_decay` when given."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group.get("kind") == "muon":
            if momentum is not None:
                group["momentum"] = momentum
            if weight_decay is not None:
                group["weight_decay"] = weight_decay


def clear_grads(model):
    """Zero the gradients for the next step. On CUDA they are freed (set to None: the caching
    allocator hands the memory back next step). On the CPU they are kept and zeroed in place:
    freeing and re-allocating the parameter-sized gradients every step fragments glibc's heap,
    and the process's resident memory grew by ~30-45 MB per step without a plateau (d4, vocab
    32K: 1.5 GB -> 3.2 GB over 40 steps); kept, it levels off (docs/benchmarks.md, memory)."""
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
# Learning rates inherited along base -> mid -> sft -> rl

LR_KEYS = ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")
LR_DEFAULTS = dict(embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, scalar_lr=0.5)  # train base's


def inherited_lrs(meta, args) -> dict:
    """The source checkpoint's learning rates (its meta's `lrs`, written by mid/sft/rl, else its
    user_config, written by train base; nanochat's defaults if neither has them), each overridden
    by this stage's flag when given. Not yet scaled by --init-lr-frac."""
    src = meta.get("lrs") or meta.get("user_config") or {}
    out = {}
    for k in LR_KEYS:
        flag = getattr(args, k, None)
        out[k] = float(flag if flag is not None else src.get(k, LR_DEFAULTS[k]))
    return out


def add_lr_flags(parser, init_lr_frac, weight_decay=0.0):
    g = parser.add_argument_group("optimization")
    for k in LR_KEYS:
        g.add_argument("--" + k.replace("_", "-"), type=float, default=None,
                       help=f"override the source checkpoint's {k} (default: inherited)")
    g.add_argument("--init-lr-frac", type=float, default=init_lr_frac,
                   help=f"multiply the inherited learning rates by this (default {init_lr_frac})")
    g.add_argument("--weight-decay", type=float, default=weight_decay, help=f"Muon weight decay (default {weight_decay})")
    return g


def add_schedule_flags(group, warmdown_ratio, final_lr_frac=0.0, warmup_steps=None):
    """The learning-rate schedule of lr_multiplier: warmup, constant, warmdown to a final fraction.
    The warmup is --warmup-ratio (a fraction of the steps), or --warmup-steps when warmup_steps
    (its default) is given."""
    if warmup_steps is None:
        group.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear lr warmup (default 0)")
    else:
        group.add_argument("--warmup-steps", type=int, default=warmup_steps,
                           help=f"steps of linear lr warmup (default {warmup_steps})")
    group.add_argument("--warmdown-ratio", type=float, default=warmdown_ratio,
                       help=f"fraction of steps of linear lr decay at the end (default {warmdown_ratio})")
    group.add_argument("--final-lr-frac", type=float, default=final_lr_frac,
                       help=f"lr multiplier at the last step (default {final_lr_frac})")


def check_schedule_args(args):
    names = ("warmup_ratio", "warmdown_ratio") if hasattr(args, "warmup_ratio") else ("warmdown_ratio",)
    for name in names:
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} must be between 0 and 1")
    if hasattr(args, "warmup_ratio") and args.warmup_ratio + args.warmdown_ratio > 1.0:
        raise UserError("--warmup-ratio + --warmdown-ratio must be at most 1")
    if getattr(args, "warmup_steps", 0) < 0:
        raise UserError(f"--warmup-steps must be >= 0, not {args.warmup_steps}")
    if not 0.0 <= args.final_lr_frac <= 1.0:
        raise UserError("--final-lr-frac must be between 0 and 1")


# ---------------------------------------------------------------------------
# Flags of the stages that start from a checkpoint (mid, sft, rl), and their checks


def add_training_flags(parser, stage, sources, device_batch_size, total_batch_size, eval_every, save_every):
    """The flags mid, sft and rl share (same names and meanings as `nanochat train base`)."""
    parser.add_argument("-i", "--source", default=sources[0], choices=sources,
                        help=f"checkpoints to start from (default {sources[0]}); --model-tag/--step pick one")
    add_common_flags(parser)
    g = parser.add_argument_group("batch and horizon")
    g.add_argument("--device-batch-size", type=int, default=device_batch_size,
                   help=f"sequences per micro-batch per process (default {device_batch_size})")
    if total_batch_size is not None:
        g.add_argument("--total-batch-size", type=int, default=total_batch_size,
                       help=f"tokens per optimizer step over all processes (default {total_batch_size})")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (default -1: from --num-epochs)")
    g.add_argument("--num-epochs", type=float, default=1.0, help="passes over the training data (default 1)")
    g.add_argument("--seed", type=int, default=42, help="data order / sampling seed (default 42)")
    g = parser.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-every", type=int, default=eval_every,
                   help=f"evaluate every N steps, -1 = only at the end (default {eval_every})")
    g.add_argument("--log-every", type=int, default=1, help="print/record a step line every N steps (default 1)")
    g.add_argument("--save-every", type=int, default=save_every,
                   help=f"checkpoint every N steps (always at the end) (default {save_every})")
    g.add_argument("--resume", action="store_true", help=f"continue from the latest complete checkpoint in checkpoints/{stage}/<tag>")
    g.add_argument("--resume-from-step", type=int, default=None, help="continue from this checkpoint step")
    g.add_argument("--dry-run", action="store_true", help="print the configuration and exit")
    return g


def check_loop_args(args):
    """The checks every training stage makes of its loop flags."""
    if args.num_iterations == 0 or args.num_iterations < -1:
        raise UserError(f"--num-iterations must be >= 1 (or -1 to derive it), not {args.num_iterations}")
    if args.log_every < 1:
        raise UserError("--log-every must be >= 1")
    if args.resume and args.resume_from_step is not None:
        raise UserError("give --resume or --resume-from-step, not both")


def check_common_args(args):
    """check_loop_args plus the flags of the stages that start from a checkpoint."""
    check_loop_args(args)
    if args.device_batch_size < 1:
        raise UserError(f"--device-batch-size must be >= 1, not {args.device_batch_size}")
    if args.num_epochs <= 0:
        raise UserError(f"--num-epochs must be > 0, not {args.num_epochs}")
    if args.init_lr_frac <= 0:
        raise UserError(f"--init-lr-frac must be > 0, not {args.init_lr_frac}")


# ---------------------------------------------------------------------------
# Sums over processes


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


def add_compile_flag(group):
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the model (default: on for CUDA, off elsewhere)")
