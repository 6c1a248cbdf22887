"""The training loop of `nanochat train mid` and `nanochat train sft` (stages/train_mid.py and
stages/train_sft.py hold their flags and defaults; docs/chat_training.md the whole story).

mid (stage="mid"): conversations packed like pretraining, every token a target, val bpb.
sft (stage="sft"): whole conversations padded into rows, assistant tokens only, small ChatCORE.
Same loop, flags, metrics and resume mechanism as `train base`; learning rates are inherited
from the source checkpoint (nanochat.training.inherited_lrs) times --init-lr-frac.
"""
import torch
import torch.distributed as dist

from nanochat import checkpoint as ck
from nanochat.chat_data import MIXTURE_HELP, ConversationLoader, Mixture, default_mixture, estimate_rows
from nanochat.chat_eval import small_chatcore
from nanochat.common import UserError, autocast_ctx, autodetect_device_type, compute_cleanup, compute_init, init_wandb, print0
from nanochat.loss_eval import evaluate_bpb, evaluate_loss
from nanochat.tokenizer import get_token_bytes
from nanochat.training import (StepLog, add_compile_flag, clear_grads, announce_start, check_common_args, check_horizon,
                               check_schedule_args, evaluated_before, global_sum, inherited_lrs, is_due, log_report,
                               lr_multiplier, muon_momentum, resolve_start, set_lrs, write_record)


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


def train(args, stage, section):
    check_common_args(args)
    check_schedule_args(args)
    if args.max_seq_len == 0 or args.max_seq_len < -1 or args.max_seq_len == 1:
        raise UserError(f"--max-seq-len must be >= 2 (or -1 for the model's), not {args.max_seq_len}")
    device_type = args.device_type or autodetect_device_type()
    mode = "pack" if stage == "mid" else "pad"
    is_dist, rank, local_rank, world_size, device = compute_init(device_type, seed=args.seed)
    master = rank == 0
    try:
        return _train(args, stage, section, mode, rank, world_size, master, device)
    finally:
        compute_cleanup()


def _train(args, stage, section, mode, rank, world_size, master, device):
    src_dir, src_step, model_tag, out_dir, resume_step = resolve_start(args, stage, world_size)
    load_dir, load_step = (out_dir, resume_step) if resume_step is not None else (src_dir, src_step)
    model, tokenizer, load_meta = ck.build_model(load_dir, load_step, device, phase="train")
    src_meta = ck.load_meta(src_dir, src_step)
    model_config = load_meta["model_config"]
    T = args.max_seq_len if args.max_seq_len > 0 else model_config["sequence_len"]
    B = args.device_batch_size

    spec, why = (args.mixture, "from --mixture") if args.mixture else default_mixture(stage)
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
    est_rows = estimate_rows(train_mix, tokenizer, T, mode)
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    else:
        num_iterations = max(1, round(args.num_epochs * est_rows / rows_per_step))
    check_horizon(resume_step, num_iterations)
    eval_steps = max(1, args.eval_tokens // tokens_per_fwdbwd) if args.eval_tokens > 0 else 20 * grad_accum
    lrs = inherited_lrs(src_meta, args)
    user_config = dict(vars(args))
    plan = (f"batch: {total_batch_size:,} tokens/step = {B} rows x {T} tokens x {world_size} procs x {grad_accum} accum; "
            f"{num_iterations:,} steps (~{est_rows / rows_per_step:.1f} steps per epoch)")
    derived = announce_start(args, model_tag, src_step, out_dir, lrs, world_size, plan, max_seq_len=T,
                             total_batch_size=total_batch_size, grad_accum=grad_accum, num_iterations=num_iterations,
                             estimated_rows_per_epoch=round(est_rows), mixture=spec, train_conversations=len(train_mix),
                             val_conversations=len(val_mix), eval_steps=eval_steps)
    if args.dry_run:
        return 0

    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    optimizer = model.setup_optimizer(weight_decay=args.weight_decay, **derived["lrs"])
    loader = ConversationLoader(train_mix, tokenizer, B, T, mode=mode, device=device, loop=True)

    loop = {}
    if resume_step is not None:
        _, shard, meta = ck.load_checkpoint(out_dir, resume_step, device, load_optimizer=True, rank=rank)
        optimizer.load_state_dict(shard["optimizer"])
        loader.load_state_dict(shard["extra"]["loader"])
        ck.set_rng_state(shard["rng"])
        loop = meta["loop"]
    done_at_start = evaluated_before(out_dir, resume_step)  # before begin_run trims the metrics
    ck.begin_run(out_dir, resume_step, master)
    start_step = resume_step or 0
    log = StepLog(device, total_batch_size, num_iterations, **loop)
    wandb_run = init_wandb(args.run, "nanochat-" + stage, {**user_config, **derived}, master)
    token_bytes = get_token_bytes(device) if stage == "mid" else None
    chatcore_tasks = [t.strip() for t in args.chatcore_tasks.split(",") if t.strip()]

    def save(step):
        meta = dict(model_config=model_config, user_config=user_config, derived=derived, step=step,
                    lrs=lrs, source=dict(stage=args.source, model_tag=model_tag, step=src_step),
                    world_size=world_size, loop=log.state())
        ck.save_checkpoint(out_dir, step, model.state_dict(), optimizer.state_dict(), meta, rank=rank,
                           extra={"loader": loader.state_dict()})
        print0(f"saved {out_dir} step {step}")

    def val_loader():
        return ConversationLoader(val_mix, tokenizer, B, T, mode=mode, device=device, loop=False)

    step, record, last_val, last_chatcore = start_step, None, None, None
    while True:
        last = step == num_iterations
        fresh = step == start_step and resume_step is not None  # this boundary was handled before the stop
        evaluate = not (fresh and done_at_start)
        saved = not fresh and is_due(step, args.save_every, last)
        if saved:  # first: an evaluation that fails never costs the step
            save(step)
        if evaluate and len(val_mix) >= world_size and is_due(step, args.eval_every, last, at_start=True):
            model.eval()
            with autocast_ctx(device):
                last_val = evaluate_loss(model, val_loader(), eval_steps, device)
                msg = f"val loss {last_val:.4f}"
                record = record or {"step": step}
                record["val_loss"] = last_val
                if token_bytes is not None:
                    record["val_bpb"] = evaluate_bpb(model, val_loader(), eval_steps, token_bytes)
                    msg += f" | val bpb {record['val_bpb']:.4f}"
            model.train()
            print0(f"step {step:05d}/{num_iterations:05d} | {msg}")
        if evaluate and chatcore_tasks and is_due(step, args.chatcore_every, last, at_end=False):
            accs, last_chatcore = small_chatcore(model, tokenizer, device, chatcore_tasks, args.chatcore_max_problems,
                                                 args.chatcore_max_new_tokens)
            print0(f"step {step:05d}/{num_iterations:05d} | ChatCORE {last_chatcore:.4f} ("
                   + ", ".join(f"{k} {v:.3f}" for k, v in accs.items()) + ")")
            record = record or {"step": step}
            record.update({"chatcore": last_chatcore, **{f"acc_{k}": v for k, v in accs.items()}})
        if (saved or fresh) and master and record:  # this step is a checkpoint: its evaluations go into its meta too
            ck.annotate_meta(out_dir, step, **{k: v for k, v in record.items() if k in ("val_loss", "val_bpb", "chatcore")})
        write_record(out_dir, record, wandb_run, master)
        record = None
        if last:
            break
        log.begin_step()

        # --- one optimizer step: fetch all micro-batches first, to count the step's targets
        lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        set_lrs(optimizer, lrm, muon_momentum(step) if stage == "mid" else None)
        batches, local_tokens = [], 0
        for _ in range(grad_accum):
            batches.append(next(loader))
            local_tokens += loader.last_targets  # counted on the host: no wait for the device
        # (with torchrun, one small all-reduce of the count: the only per-step sync)
        num_tokens = int(global_sum(local_tokens, device))
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
        if log.due(step, args.log_every):
            record = log.line(step, lrm, start_step, text=f" | trained tokens {num_tokens:,}",
                              trained_tokens=num_tokens, epoch=loader.epoch)

    summary = {"model tag": model_tag, "source": derived["source"], "mixture": spec, "steps": num_iterations,
               "tokens": num_iterations * total_batch_size, "total batch size": total_batch_size,
               "training time (min)": round(log.total_time / 60, 2), "final val loss": last_val,
               "ChatCORE (small)": last_chatcore, "processes": world_size}
    print0("summary: " + " | ".join(f"{k} {v}" for k, v in summary.items() if v is not None))
    if master:
        log_report(section, [user_config, summary])
    wandb_run.finish()
    return 0
