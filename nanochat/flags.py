"""The command-line flags the training stages share, and their checks (one-line UserErrors)."""
import argparse

from nanochat.checkpoint import SOURCES
from nanochat.common import UserError, add_common_flags
from nanochat.hparams import LR_KEYS
from nanochat.quant import add_weights_flag

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


def add_compile_flag(group):
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the model (default: on for CUDA, off elsewhere)")


def add_model_flags(parser):
    """-i SOURCE and the common flags of the commands that load one model (chat, serve, export hf)."""
    parser.add_argument("-i", "--source", default=None, choices=list(SOURCES),
                        help="which checkpoints to load (default: the first of sft, mid, base that exists)")
    add_weights_flag(parser)
    parser.add_argument("--allow-unverified", action="store_true",
                        help="load a checkpoint whose meta records no checksums (its bytes cannot be verified)")
    add_common_flags(parser)
