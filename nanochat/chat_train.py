"""The training loop of `nanochat train mid` and `nanochat train sft` (stages/train_mid.py and
stages/train_sft.py hold their flags and defaults; docs/chat_training.md the whole story).

mid: conversations packed like pretraining, every token a target, val bpb (its ChatStage).
sft: whole conversations padded into rows, assistant tokens only, small ChatCORE.
Same loop, flags, metrics and resume mechanism as `train base`; learning rates are inherited
from the source checkpoint (nanochat.training.inherited_lrs) times --init-lr-frac.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat import checkpoint as ck
from nanochat import models
from nanochat.chat_data import MIXTURE_HELP, ConversationLoader, Mixture, default_mixture, estimate_rows
from nanochat.chat_eval import small_chatcore
from nanochat.attention import warm_window_masks
from nanochat.common import UserError, autocast_ctx, autodetect_device_type, compute_cleanup, compute_init, gc_step, print0
from nanochat.loss_eval import evaluate_bpb, evaluate_loss
from nanochat.run import ResumeState, Run, check_horizon, resolve_source
from nanochat.tokenizer import get_token_bytes
from nanochat.flags import add_compile_flag, check_common_args, check_schedule_args
from nanochat.hparams import inherited_lrs, lr_multiplier, set_lrs
from nanochat.training import StepLog, announce_start, clear_grads, global_sum, is_due


def add_chat_train_flags(parser, stage, max_seq_len_default=-1):
    g = parser.add_argument_group("data and schedule")
    g.add_argument("--mixture", default=None, help=f"training mixture (default: chosen by what is in the data root). {MIXTURE_HELP}")
    g.add_argument("--max-seq-len", type=int, default=max_seq_len_default,
                   help="row length in tokens (default -1: the model's context)")
    g.add_argument("--eval-tokens", type=int, default=-1, help="validation tokens per evaluation (default: 20 optimizer steps' worth)")
    g.add_argument("--chatcore-tasks", default="ARC-Easy,ARC-Challenge,MMLU,GSM8K,HumanEval,SpellingBee",
                   help="tasks of the periodic small ChatCORE (default: all six of eval chat; the ChatCORE "
                        "number is over the five upstream tasks among them, SpellingBee is reported beside it)")
    g.add_argument("--chatcore-max-problems", type=int, default=64,
                   help="problems per task of the small ChatCORE: the first N of eval chat's seed-42 shuffle (default 64)")
    g.add_argument("--chatcore-max-new-tokens", type=int, default=256, help="longest generative answer in the small ChatCORE (default 256)")
    add_compile_flag(g)
    return g


def token_normalized_loss(model, x, y, num_tokens, world_size=1):
    """Summed cross-entropy of one micro-batch over its non-ignored targets, divided by the number
    of such targets in the whole optimizer step (all micro-batches, all ranks): the accumulated
    gradient is then that of the mean over the step's tokens, whatever the share of each
    micro-batch. An all-masked micro-batch sums to 0 (finite, zero gradient), and a step with no
    target at all divides by max(1, 0). The optimizer AVERAGES gradients over ranks, hence the
    factor world_size."""
    loss_sum = model(x, y, loss_reduction="sum")
    return loss_sum * (world_size / max(1, num_tokens)), loss_sum.detach()


@dataclass
class ChatStage:
    """What `train mid` and `train sft` do differently; each passes its own (stages/train_mid.py,
    stages/train_sft.py)."""
    name: str                # checkpoints/<name>/, the default mixture, the wandb project's suffix
    section: str             # its section of the report card
    mode: str                # ConversationLoader: "pack" (every token a target) or "pad" (assistant tokens only)
    val_bpb: bool            # evaluate bits per byte besides the loss
    momentum: object = None  # Muon momentum at a step (None: the optimizer's own)


def train(args, stage):
    check_common_args(args)
    check_schedule_args(args)
    if args.max_seq_len == 0 or args.max_seq_len < -1 or args.max_seq_len == 1:
        raise UserError(f"--max-seq-len must be >= 2 (or -1 for the model's), not {args.max_seq_len}")
    device_type = args.device_type or autodetect_device_type()
    is_dist, rank, local_rank, world_size, device = compute_init(device_type, seed=args.seed)
    try:
        return plan_and_run(args, stage, rank, world_size, device)
    finally:
        compute_cleanup()


def plan_and_run(args, stage, rank, world_size, device):
    """Plan, build (the model from the source or the resumed checkpoint), loop."""
    src_dir, src_step, model_tag, out_dir = resolve_source(args, stage.name)
    run = Run(out_dir, args, world_size, rank)
    load_dir, load_step = (out_dir, run.resume_step) if run.resume_step is not None else (src_dir, src_step)
    model, tokenizer, load_meta = models.build_model(load_dir, load_step, device, phase="train")
    model_config = load_meta["model_config"]
    T = args.max_seq_len if args.max_seq_len > 0 else model_config["sequence_len"]
    B = args.device_batch_size
    spec, why = (args.mixture, "from --mixture") if args.mixture else default_mixture(stage.name)
    train_mix = Mixture(spec, "train", seed=args.seed)
    val_mix = Mixture(spec, "val", seed=args.seed, sources=train_mix.sources)
    print0(f"mixture ({why}): {spec}")
    print0(train_mix.describe())
    print0(f"validation: {len(val_mix):,} held-out conversations (1% of each source)")

    tokens_per_fwdbwd = B * T * world_size
    total_batch_size = args.total_batch_size if args.total_batch_size > 0 else tokens_per_fwdbwd
    if total_batch_size % tokens_per_fwdbwd:
        raise UserError(f"--total-batch-size {total_batch_size} is not a multiple of device-batch-size * "
                        f"max-seq-len * processes = {B} * {T} * {world_size} = {tokens_per_fwdbwd}")
    grad_accum = total_batch_size // tokens_per_fwdbwd
    rows_per_step = B * world_size * grad_accum
    est_rows = estimate_rows(train_mix, tokenizer, T, stage.mode)
    num_iterations = args.num_iterations if args.num_iterations > 0 else \
        max(1, round(args.num_epochs * est_rows / rows_per_step))
    check_horizon(run.resume_step, num_iterations)
    eval_steps = max(1, args.eval_tokens // tokens_per_fwdbwd) if args.eval_tokens > 0 else 20 * grad_accum
    lrs = inherited_lrs(ck.load_meta(src_dir, src_step), args)
    plan = (f"batch: {total_batch_size:,} tokens/step = {B} rows x {T} tokens x {world_size} procs x {grad_accum} accum; "
            f"{num_iterations:,} steps (~{est_rows / rows_per_step:.1f} steps per epoch)")
    derived = announce_start(args, model_tag, src_step, out_dir, lrs, world_size, plan, max_seq_len=T,
                             total_batch_size=total_batch_size, grad_accum=grad_accum, num_iterations=num_iterations,
                             estimated_rows_per_epoch=round(est_rows), mixture=spec, train_conversations=len(train_mix),
                             val_conversations=len(val_mix), eval_steps=eval_steps)
    if args.dry_run:
        return 0
    meta = dict(model_config=model_config, user_config=dict(vars(args)), derived=derived, lrs=lrs,
                source=dict(stage=args.source, model_tag=model_tag, step=src_step))
    return loop(args, stage, run, model, tokenizer, (train_mix, val_mix, meta))


class Evaluations:
    """What mid/sft evaluate at a step boundary: the val loss (and bpb), the small ChatCORE."""

    def __init__(self, args, stage, model, tokenizer, val_mix, eval_steps):
        self.args, self.model, self.tokenizer, self.val_mix, self.eval_steps = args, model, tokenizer, val_mix, eval_steps
        self.mode, self.device = stage.mode, model.get_device()
        self.token_bytes = get_token_bytes(self.device) if stage.val_bpb else None
        self.tasks = [t.strip() for t in args.chatcore_tasks.split(",") if t.strip()]
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.val_loss, self.chatcore = None, None

    def val_loader(self):
        T = self.args.max_seq_len if self.args.max_seq_len > 0 else self.model.config.sequence_len
        return ConversationLoader(self.val_mix, self.tokenizer, self.args.device_batch_size, T, mode=self.mode,
                                  device=self.device, loop=False)

    def __call__(self, step, last, num_iterations):
        a, out = self.args, {}
        if len(self.val_mix) >= self.world_size and is_due(step, a.eval_every, last, at_start=True):
            self.model.eval()
            with autocast_ctx(self.device):
                self.val_loss = out["val_loss"] = evaluate_loss(self.model, self.val_loader(), self.eval_steps, self.device)
                msg = f"val loss {self.val_loss:.4f}"
                if self.token_bytes is not None:
                    out["val_bpb"] = evaluate_bpb(self.model, self.val_loader(), self.eval_steps, self.token_bytes)
                    msg += f" | val bpb {out['val_bpb']:.4f}"
            self.model.train()
            print0(f"step {step:05d}/{num_iterations:05d} | {msg}")
        if self.tasks and is_due(step, a.chatcore_every, last, at_end=False):
            accs, self.chatcore = small_chatcore(self.model, self.tokenizer, self.device, self.tasks,
                                                 a.chatcore_max_problems, a.chatcore_max_new_tokens)
            print0(f"step {step:05d}/{num_iterations:05d} | ChatCORE {self.chatcore:.4f} ("
                   + ", ".join(f"{k} {v:.3f}" for k, v in accs.items()) + ")")
            out.update({"chatcore": self.chatcore, **{f"acc_{k}": v for k, v in accs.items()}})
        return out


def loop(args, stage, run, model, tokenizer, data):
    train_mix, val_mix, meta = data
    derived, device, world_size = meta["derived"], model.get_device(), run.world_size
    B, T, grad_accum, n = args.device_batch_size, derived["max_seq_len"], derived["grad_accum"], derived["num_iterations"]
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    if use_compile:  # masks first: an empty mask cache made the second call compile everything again
        warm_window_masks(model.config.layer_windows(), T, device)
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    optimizer = model.setup_optimizer(weight_decay=args.weight_decay, **derived["lrs"])
    loader = ConversationLoader(train_mix, tokenizer, B, T, mode=stage.mode, device=device, loop=True)
    log = StepLog(device, derived["total_batch_size"], n)
    run.begin(ResumeState(model, optimizer, [loader], log), n, "nanochat-" + stage.name, meta)
    evaluations = Evaluations(args, stage, model, tokenizer, val_mix, derived["eval_steps"])
    step, record = run.start_step, None
    while not run.boundary(step, record, lambda s, last: evaluations(s, last, n)):
        log.begin_step()
        # --- one optimizer step: fetch all micro-batches first, to count the step's targets
        lrm = lr_multiplier(step, n, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        set_lrs(optimizer, lrm, stage.momentum(step) if stage.momentum else None)
        batches, local_tokens = [], 0
        for _ in range(grad_accum):
            batches.append(next(loader))
            local_tokens += loader.last_targets  # counted on the host: no wait for the device
        num_tokens = int(global_sum(local_tokens, device))  # with torchrun the only per-step sync
        loss_total = torch.zeros((), device=device)
        for x, y in batches:
            with autocast_ctx(device):
                loss, loss_sum = token_normalized_loss(train_model, x, y, num_tokens, world_size)
            loss.backward()
            loss_total += loss_sum.float()
        if num_tokens > 0:
            optimizer.step()
        else:  # nothing to learn from in this step (every target masked): leave the weights alone
            print0(f"step {step + 1}: no trainable targets in the whole batch; skipped")
        clear_grads(model)
        if world_size > 1:
            dist.all_reduce(loss_total, op=dist.ReduceOp.SUM)
        log.end_step(loss_total / max(1, num_tokens))
        step += 1
        gc_step(step - run.start_step)  # after the first step: the collector frozen and off (upstream)
        record = log.line(step, lrm, run.start_step, text=f" | trained tokens {num_tokens:,}", trained_tokens=num_tokens,
                          epoch=loader.epoch) if log.due(step, args.log_every) else None
    run.finish(stage.section, {
        "model tag": derived["model_tag"], "source": derived["source"], "mixture": derived["mixture"], "steps": n,
        "tokens": n * derived["total_batch_size"], "total batch size": derived["total_batch_size"],
        "training time (min)": round(log.total_time / 60, 2), "final val loss": evaluations.val_loss,
        "ChatCORE (small)": evaluations.chatcore, "processes": world_size})
    return 0
