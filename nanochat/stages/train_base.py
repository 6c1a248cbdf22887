"""`nanochat train base`: pretrain a GPT from scratch. One dial, --depth, sets the rest.

    nanochat train base --depth 20                                  # one GPU or CPU
    torchrun --nproc_per_node=8 -m nanochat train base --depth 20   # one node
    nanochat train base --depth 2 --max-seq-len 128 --device-batch-size 4 \\
        --total-batch-size 512 --num-iterations 20 --eval-tokens 4096   # tiny, CPU, seconds

Derived from --depth (each can be overridden by its own flag; docs/training.md has the rules):
width = depth * aspect ratio rounded up to the head size, heads, the horizon (tokens =
--target-param-data-ratio * parameters), the total batch size, and the weight decay.

Checkpoints, metrics.jsonl and the resume state go to $NANOCHAT_BASE_DIR/checkpoints/base/<tag>.
"""
import argparse
import math
import time

import torch
import torch.distributed as dist

from nanochat import checkpoint as ck
from nanochat.common import (UserError, add_common_flags, autodetect_device_type, compute_cleanup,
                             compute_init, get_compute_dtype, get_peak_flops, init_wandb, print0,
                             synchronize)

# reference point for the batch-size rule: 2^19 tokens per step for a d20-sized run
REF_BATCH_TOKENS = 2 ** 19
REF_TRAIN_TOKENS = 5e9
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def build_parser():
    p = argparse.ArgumentParser(prog="nanochat train base", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(p)
    g = p.add_argument_group("model shape")
    g.add_argument("--depth", type=int, default=20, help="number of transformer layers: the one dial (default 20)")
    g.add_argument("--aspect-ratio", type=int, default=64, help="model_dim = depth * aspect_ratio, rounded up to --head-dim (default 64)")
    g.add_argument("--head-dim", type=int, default=128, help="attention head size (default 128)")
    g.add_argument("--n-kv-head", type=int, default=None, help="key/value heads for GQA (default: = query heads)")
    g.add_argument("--window-pattern", default=None,
                   help="per-layer attention windows, S=short L=long, repeated over layers, last layer always long "
                        "(default: SSSL on CUDA, L elsewhere)")
    g.add_argument("--short-window", type=int, default=None, help="tokens a short (S) window sees (default: max-seq-len/4)")
    g.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens (default 2048)")
    g = p.add_argument_group("batch and horizon")
    g.add_argument("--device-batch-size", default="32",
                   help="sequences per micro-batch per process, or 'auto' (CUDA: the largest that fits) (default 32)")
    g.add_argument("--total-batch-size", type=int, default=-1,
                   help="tokens per optimizer step over all processes (default -1: derived from the horizon)")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (overrides the two below)")
    g.add_argument("--target-flops", type=float, default=-1.0, help="training FLOPs budget (overrides the ratio)")
    g.add_argument("--target-param-data-ratio", type=float, default=10.5,
                   help="training tokens per (non-embedding) parameter (default 10.5)")
    g = p.add_argument_group("optimization")
    g.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr of the token and value embeddings (default 0.2)")
    g.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of the output head (default 0.004)")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr of the transformer matrices (default 0.02)")
    g.add_argument("--scalar-lr", type=float, default=0.5, help="AdamW lr of the per-layer scalars (default 0.5)")
    g.add_argument("--weight-decay", type=float, default=0.2,
                   help="Muon weight decay at depth 12; scaled by (12/depth)^2, at most 1.0 (default 0.2)")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear lr warmup (default 0)")
    g.add_argument("--warmdown-ratio", type=float, default=0.4, help="fraction of steps of linear lr decay at the end (default 0.4)")
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="lr multiplier at the last step (default 0)")
    g.add_argument("--seed", type=int, default=42, help="weights init seed (default 42)")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-every", type=int, default=250, help="val bits per byte every N steps, -1 = only at the end (default 250)")
    g.add_argument("--eval-tokens", type=int, default=-1, help="val tokens per evaluation (default: 20 total batches)")
    g.add_argument("--core-metric-every", type=int, default=2000, help="CORE every N steps and at the end, -1 = never (default 2000)")
    g.add_argument("--core-metric-max-per-task", type=int, default=500, help="CORE items per task (default 500)")
    g.add_argument("--sample-every", type=int, default=2000, help="greedy samples every N steps and at the end, -1 = never (default 2000)")
    g.add_argument("--log-every", type=int, default=1,
                   help="print/record a step line every N steps; each one waits for the device (default 1)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (always at the end) (default -1)")
    g.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint of this model tag")
    g.add_argument("--resume-from-step", type=int, default=None, help="continue from this checkpoint step")
    g = p.add_argument_group("speed and memory")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off elsewhere)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass: less memory, ~30%% more compute")
    g.add_argument("--dry-run", action="store_true", help="print the derived configuration and exit")
    return p


# ---------------------------------------------------------------------------
# Derived configuration (pure functions: tested on their own)

def model_dims(depth, aspect_ratio, head_dim):
    """(model_dim, n_head): depth * aspect_ratio rounded up to a multiple of head_dim."""
    dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    return dim, dim // head_dim


def derive_total_batch_size(train_tokens, tokens_per_fwdbwd):
    """Batch size grows with the horizon like D^0.383 (the power law in "Power Lines", Bergsma et
    al. 2025), anchored at 2^19 tokens for ~5B tokens; rounded to a power of two, at least one
    micro-batch per process, and a multiple of (device batch * seq len * processes)."""
    target = REF_BATCH_TOKENS * (max(train_tokens, 1.0) / REF_TRAIN_TOKENS) ** 0.383
    target = 2 ** round(math.log2(target))
    return max(1, round(target / tokens_per_fwdbwd)) * tokens_per_fwdbwd


def lr_multiplier(it, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """Linear warmup, constant, linear warmdown to final_lr_frac. `it` counts from 0."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if it < warmup:
        return (it + 1) / warmup
    if it <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - it) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(it):
    """0.85 -> 0.95 over the first 300 steps (high momentum early makes training unstable)."""
    frac = min(it / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def scaled_weight_decay(weight_decay, depth):
    # Longer runs (bigger models) need less decay per step for the same total shrinkage over the
    # horizon; steps grow ~depth^2, hence (12/depth)^2. Capped so tiny models are not crushed.
    return min(weight_decay * (12 / depth) ** 2, 1.0)


# ---------------------------------------------------------------------------
# Memory helpers (CUDA)

def probe_device_batch_size(model, seq_len, vocab_size, device, autocast, tokens_per_step_multiple):
    """Largest power-of-two micro-batch whose forward+backward fits, leaving room for the
    optimizer state (~2 fp32 copies of the parameters) and 10% slack; it must also divide
    the total batch (checked by the caller). Probed without compile (compiled code uses less)."""
    total = torch.cuda.get_device_properties(device).total_memory
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = 0.9 * total - 2 * param_bytes
    for b in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if tokens_per_step_multiple % b:
            continue
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            x = torch.randint(0, vocab_size, (b, seq_len), device=device)
            with autocast():
                loss = model(x, x)
            loss.backward()
            peak = torch.cuda.max_memory_allocated(device)
            ok = peak <= budget
        except torch.cuda.OutOfMemoryError:
            ok = False
        finally:
            model.zero_grad(set_to_none=True)
            loss = x = None
            torch.cuda.empty_cache()
        if ok:
            return b
    raise UserError(f"--device-batch-size auto: not even 1 sequence of {seq_len} tokens fits; "
                    f"lower --max-seq-len or use --activation-checkpointing")


# ---------------------------------------------------------------------------

def main(argv=None):
    args = build_parser().parse_args(argv)
    device_type = args.device_type or autodetect_device_type()

    # --- cheap flag checks, before any process group or data is touched
    if args.depth < 1:
        raise UserError(f"--depth must be >= 1, not {args.depth}")
    if args.aspect_ratio < 1 or args.head_dim < 1:
        raise UserError("--aspect-ratio and --head-dim must be >= 1")
    if args.max_seq_len < 2:
        raise UserError(f"--max-seq-len must be >= 2, not {args.max_seq_len}")
    auto_batch = args.device_batch_size == "auto"
    if auto_batch:
        if device_type != "cuda":
            raise UserError("--device-batch-size auto needs CUDA (it probes GPU memory); give a number")
    else:
        try:
            args.device_batch_size = int(args.device_batch_size)
        except ValueError:
            raise UserError(f"--device-batch-size must be a positive integer or 'auto', not '{args.device_batch_size}'")
        if args.device_batch_size < 1:
            raise UserError(f"--device-batch-size must be >= 1, not {args.device_batch_size}")
    for name in ("warmup_ratio", "warmdown_ratio"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} must be between 0 and 1")
    if args.warmup_ratio + args.warmdown_ratio > 1.0:
        raise UserError("--warmup-ratio + --warmdown-ratio must be at most 1")
    if args.num_iterations == 0 or args.num_iterations < -1:
        raise UserError(f"--num-iterations must be >= 1 (or -1 to derive it), not {args.num_iterations}")
    if args.log_every < 1:
        raise UserError("--log-every must be >= 1")
    if args.resume and args.resume_from_step is not None:
        raise UserError("give --resume or --resume-from-step, not both")
    model_dim, n_head = model_dims(args.depth, args.aspect_ratio, args.head_dim)
    n_kv_head = args.n_kv_head if args.n_kv_head is not None else n_head
    if n_kv_head < 1 or n_head % n_kv_head:
        raise UserError(f"--n-kv-head ({n_kv_head}) must divide the number of heads ({n_head})")
    window_pattern = (args.window_pattern or ("SSSL" if device_type == "cuda" else "L")).upper()
    if not window_pattern or set(window_pattern) - {"S", "L"}:
        raise UserError(f"--window-pattern must be made of S and L, not '{args.window_pattern}'")

    # --- tokenizer and data must exist before we spin anything up
    from nanochat.tokenizer import get_token_bytes, get_tokenizer
    from nanochat.dataset import list_shards, validate_shards
    tokenizer = get_tokenizer()
    validate_shards(list_shards())  # every train and val shard's schema, before anything starts
    vocab_size = tokenizer.get_vocab_size()

    is_dist, rank, local_rank, world_size, device = compute_init(device_type, seed=args.seed)
    master = rank == 0
    try:
        return train(args, tokenizer, vocab_size, device, rank, world_size, master, auto_batch,
                     model_dim, n_head, n_kv_head, window_pattern, get_token_bytes)
    finally:
        compute_cleanup()


def train(args, tokenizer, vocab_size, device, rank, world_size, master, auto_batch,
          model_dim, n_head, n_kv_head, window_pattern, get_token_bytes):
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.dataloader import PretrainLoader  # see docs/data.md
    device_type = device.type
    dtype = get_compute_dtype(device_type)
    autocast_on = dtype != torch.float32

    def autocast():
        return torch.autocast(device_type=device_type, dtype=dtype, enabled=autocast_on)

    model_tag = args.model_tag or f"d{args.depth}"
    ckpt_dir = ck.checkpoint_dir("base", model_tag)
    T = args.max_seq_len
    model_config = dict(sequence_len=T, vocab_size=vocab_size, n_layer=args.depth, n_head=n_head,
                        n_kv_head=n_kv_head, n_embd=model_dim, window_pattern=window_pattern)
    if args.short_window is not None:
        model_config["short_window"] = args.short_window

    # --- resume: which step, and does it fit the flags?
    resume_step = None
    if args.resume or args.resume_from_step is not None:
        steps = ck.complete_steps(ckpt_dir)
        if not steps:
            raise UserError(f"nothing to resume: no complete checkpoint in {ckpt_dir} "
                            f"(train without --resume first, or check --model-tag)")
        resume_step = steps[-1] if args.resume else args.resume_from_step
        if resume_step not in steps:
            raise UserError(f"no complete checkpoint for step {resume_step} in {ckpt_dir}; "
                            f"complete steps: {', '.join(map(str, steps))}")
        meta = ck.load_meta(ckpt_dir, resume_step, require=("model_config", "loop"))
        saved_cfg = meta["model_config"]
        diffs = [f"{k}: checkpoint {saved_cfg.get(k)!r} vs now {v!r}" for k, v in model_config.items()
                 if saved_cfg.get(k) != v]
        if diffs:
            raise UserError("the architecture flags differ from the checkpoint's: " + "; ".join(diffs))
        model_config = dict(saved_cfg)
        if meta.get("world_size", 1) != world_size:
            raise UserError(f"the checkpoint was saved by {meta.get('world_size')} process(es); "
                            f"resume with the same number (now {world_size})")

    # --- the model: built on meta, materialized, initialized
    config = GPTConfig(**model_config)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    torch.manual_seed(args.seed)
    model.init_weights()
    orig_model = model  # uncompiled: for saving, sampling and evaluation
    if args.activation_checkpointing:
        model.checkpoint_activations = True  # gpt.py wraps each block in torch.utils.checkpoint
    num_params = sum(p.numel() for p in model.parameters())
    counts = model.num_params_by_category()
    # the horizon counts the parameters that cost FLOPs: not the embedding lookups
    scaling_params = counts["total"] - counts["wte"] - counts["value_embeds"]
    flops_per_token = model.estimate_flops()

    # --- batch: micro-batch, total batch, gradient accumulation
    if auto_batch:
        args.device_batch_size = None
    B = args.device_batch_size
    ratio_tokens = args.target_param_data_ratio * scaling_params
    if auto_batch:
        multiple = args.total_batch_size // (T * world_size) if args.total_batch_size > 0 else 256
        if args.total_batch_size > 0 and args.total_batch_size % (T * world_size):
            raise UserError(f"--total-batch-size {args.total_batch_size} is not a multiple of "
                            f"max-seq-len * processes = {T * world_size}")
        B = probe_device_batch_size(model, T, vocab_size, device, autocast, multiple)
        print0(f"--device-batch-size auto: {B}")
    tokens_per_fwdbwd = B * T * world_size
    total_batch_size = args.total_batch_size if args.total_batch_size > 0 else \
        derive_total_batch_size(ratio_tokens, tokens_per_fwdbwd)
    if total_batch_size % tokens_per_fwdbwd:
        raise UserError(f"--total-batch-size {total_batch_size} is not a multiple of device-batch-size * "
                        f"max-seq-len * processes = {B} * {T} * {world_size} = {tokens_per_fwdbwd}")
    grad_accum = total_batch_size // tokens_per_fwdbwd
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif args.target_flops > 0:
        num_iterations = max(1, round(args.target_flops / (flops_per_token * total_batch_size)))
    else:
        num_iterations = max(1, round(ratio_tokens / total_batch_size))
    if resume_step is not None and resume_step > num_iterations:
        raise UserError(f"the checkpoint is at step {resume_step}, past --num-iterations {num_iterations}")
    weight_decay = scaled_weight_decay(args.weight_decay, args.depth)
    eval_tokens = args.eval_tokens if args.eval_tokens > 0 else 20 * total_batch_size
    eval_steps = max(1, eval_tokens // tokens_per_fwdbwd)

    print0(f"model: depth {args.depth}, dim {model_dim}, heads {n_head} (kv {n_kv_head}), windows {window_pattern}, "
           f"seq len {T}, vocab {vocab_size}")
    print0(f"parameters: {num_params:,} ({', '.join(f'{k} {v:,}' for k, v in counts.items())}); "
           f"FLOPs/token {flops_per_token:.3e}")
    print0(f"batch: {total_batch_size:,} tokens/step = {B} seqs x {T} tokens x {world_size} procs x {grad_accum} accum")
    print0(f"horizon: {num_iterations:,} steps = {num_iterations * total_batch_size:,} tokens "
           f"({num_iterations * total_batch_size / scaling_params:.2f} tokens/param), "
           f"{flops_per_token * total_batch_size * num_iterations:.3e} FLOPs; weight decay {weight_decay:.4g}")
    user_config = {k: v for k, v in vars(args).items()}
    derived = dict(model_tag=model_tag, device_batch_size=B, total_batch_size=total_batch_size,
                   grad_accum=grad_accum, num_iterations=num_iterations, weight_decay_scaled=weight_decay,
                   num_params=num_params, scaling_params=scaling_params, flops_per_token=flops_per_token,
                   world_size=world_size, dtype=str(dtype).replace("torch.", ""), eval_steps=eval_steps)
    if args.dry_run:
        print0(derived)
        return 0

    use_compile = args.compile if args.compile is not None else device_type == "cuda"
    if use_compile:
        model = torch.compile(model, dynamic=False)

    optimizer = orig_model.setup_optimizer(
        embedding_lr=args.embedding_lr, unembedding_lr=args.unembedding_lr, matrix_lr=args.matrix_lr,
        scalar_lr=args.scalar_lr, weight_decay=weight_decay,
        compile=use_compile or None)  # --compile on CPU compiles the optimizer's updates too

    # The data is split into grad_accum * world_size "data ranks", one loader each; micro-step k
    # of process r reads data rank r * grad_accum + k. The split depends only on the total and
    # micro batch sizes, not on the number of processes, so 1 GPU with 8 accumulation steps
    # reads exactly the same batches as 8 GPUs without accumulation (same run, up to float
    # summation order).
    data_ranks = grad_accum * world_size
    train_loaders = [PretrainLoader(tokenizer, B, T, split="train", device=device, rank=rank * grad_accum + k,
                                    world_size=data_ranks) for k in range(grad_accum)]
    loader_state = [ld.state_dict() for ld in train_loaders]  # positions of the next batches we take

    # --- restore
    loop = {}
    if resume_step is not None:
        model_state, shard, meta = ck.load_checkpoint(ckpt_dir, resume_step, device, load_optimizer=True, rank=rank)
        orig_model.load_state_dict(model_state, strict=True)
        optimizer.load_state_dict(shard["optimizer"])
        loader_state = shard["extra"]["loader"]
        if len(loader_state) != grad_accum:
            raise UserError(f"the checkpoint was saved with {len(loader_state)} accumulation steps per process, "
                            f"now {grad_accum}: resume with the same --total-batch-size and --device-batch-size")
        for ld, st in zip(train_loaders, loader_state):
            ld.load_state_dict(st)
        ck.set_rng_state(shard["rng"])
        loop = meta["loop"]
        del model_state, shard
    ck.begin_run(ckpt_dir, resume_step, master)
    start_step = resume_step or 0
    log = StepLog(device, total_batch_size, num_iterations, **loop)

    wandb_run = init_wandb(args.run, "nanochat", {**user_config, **derived}, master)
    token_bytes = get_token_bytes(device)
    peak_flops = get_peak_flops(device)
    x, y = next(train_loaders[0])

    def will_save(step):
        return step == num_iterations or (args.save_every > 0 and step % args.save_every == 0 and step > 0)

    def save(step):
        meta = dict(model_config=model_config, user_config=user_config, derived=derived, step=step,
                    dataloader=loader_state, world_size=world_size, val_bpb=last_val_bpb,
                    loop=log.state())
        ck.save_checkpoint(ckpt_dir, step, orig_model.state_dict(), optimizer.state_dict(), meta,
                           rank=rank, extra={"loader": loader_state})
        print0(f"saved {ckpt_dir} step {step}")

    step = start_step
    val_batches = None
    record = None  # the metrics line of the last logged step, written after its evaluations
    last_val_bpb = None
    min_val_bpb = float("inf")
    last_core = None
    while True:
        last = step == num_iterations
        fresh = step == start_step and resume_step is not None  # this boundary was handled before the stop
        # --- evaluations at step boundaries (before training step `step + 1`)
        if not fresh and (last or (args.eval_every > 0 and step % args.eval_every == 0)):
            if val_batches is None:
                val_batches = load_val_batches(PretrainLoader, tokenizer, B, T, eval_steps)
            val_bpb = run_bpb_eval(model, val_batches, eval_steps, token_bytes,
                                   device, autocast)
            last_val_bpb = val_bpb
            min_val_bpb = min(min_val_bpb, val_bpb)
            print0(f"step {step:05d}/{num_iterations:05d} | val bpb {val_bpb:.4f}")
            record = record or {"step": step}
            record["val_bpb"] = val_bpb
        if not fresh and args.core_metric_every > 0 and (last or (step > 0 and step % args.core_metric_every == 0)):
            from nanochat.core_eval import evaluate_core
            orig_model.eval()
            with autocast():
                res = evaluate_core(orig_model, tokenizer, device, max_per_task=args.core_metric_max_per_task)
            orig_model.train()
            last_core = res["core"]
            print0(f"step {step:05d}/{num_iterations:05d} | CORE {res['core']:.4f} "
                   f"({res['num_available']}/{res['num_tasks']} tasks)")
            record = record or {"step": step}
            record["core"] = res["core"]
        if not fresh and args.sample_every > 0 and master and (last or (step > 0 and step % args.sample_every == 0)):
            print_samples(orig_model, tokenizer, device, autocast)
        if record is not None:
            if master:
                ck.append_metrics(ckpt_dir, record)
                wandb_run.log(record, step=record["step"])
            record = None
        if not fresh and will_save(step):
            save(step)
        if last:
            break
        log.begin_step()  # evaluations do not count as step time

        # --- one optimizer step
        lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        momentum = muon_momentum(step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group.get("kind") == "muon":
                group["momentum"] = momentum
        loss_sum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            with autocast():
                loss = model(x, y)
            loss_sum += loss.detach()
            (loss / grad_accum).backward()
            nxt = (micro + 1) % grad_accum
            if micro == grad_accum - 1 and will_save(step + 1):
                loader_state = [ld.state_dict() for ld in train_loaders]  # before taking step+2's first batch
            x, y = next(train_loaders[nxt])  # fetched while the device still works on the backward
        optimizer.step()
        model.zero_grad(set_to_none=True)
        train_loss = loss_sum / grad_accum
        if world_size > 1:
            dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
        log.end_step(train_loss)
        step += 1

        # --- logging: the only place that waits for the device
        if log.due(step, args.log_every):
            record = log.line(step, lrm, start_step, flops_per_token, peak_flops, world_size)

    for ld in train_loaders:
        ld.close()
    peak_mem = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device_type == "cuda" else None
    summary = {
        "model tag": model_tag, "depth": args.depth, "parameters": num_params,
        "FLOPs per token": f"{flops_per_token:.3e}", "steps": num_iterations,
        "tokens": num_iterations * total_batch_size, "total batch size": total_batch_size,
        "tokens per parameter": round(num_iterations * total_batch_size / scaling_params, 2),
        "training time (min)": round(log.total_time / 60, 2), "final val bpb": last_val_bpb,
        "min val bpb": None if min_val_bpb == float("inf") else min_val_bpb, "CORE": last_core,
        "peak memory (MiB)": peak_mem, "processes": world_size,
    }
    print0("summary: " + " | ".join(f"{k} {v}" for k, v in summary.items() if v is not None))
    if master:
        log_report(summary, user_config)
    wandb_run.finish()
    return 0


def run_bpb_eval(model, val_batches, steps, token_bytes, device, autocast):
    from nanochat.loss_eval import evaluate_bpb
    model.eval()
    with autocast():
        bpb = evaluate_bpb(model, ((x.to(device), y.to(device)) for x, y in val_batches), steps, token_bytes)
    model.train()
    return bpb


def load_val_batches(loader_cls, tokenizer, B, T, steps):
    """The validation batches, read once and kept on the CPU: every evaluation sees the same
    tokens, and we do not re-tokenize them each time."""
    loader = loader_cls(tokenizer, B, T, split="val", device="cpu", loop=False, prefetch=1)
    try:
        return [b for _, b in zip(range(steps), loader)]
    finally:
        loader.close()


def print_samples(model, tokenizer, device, autocast):
    model.eval()
    bos = tokenizer.get_bos_token_id()
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer.encode(prompt, prepend=bos)
        with autocast():
            out = list(model.generate(tokens, max_tokens=16, temperature=0.0))  # greedy: new ids only
        text = tokenizer.decode(out)
        print0(f"  {prompt!r} -> {text!r}")
    model.train()


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

    def line(self, step, lrm, first_step, flops_per_token=None, peak_flops=None, world_size=1, text="", **extra):
        """Print the log line of `step` and return its metrics record (extra keys included)."""
        synchronize(self.device)
        now = time.time()
        dt = (now - self.t0) / self.steps
        self.total_time += now - self.t0
        self.t0, self.steps = now, 0
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
        return dict(step=step, loss=loss, smooth_loss=smooth, lr=lrm, lrm=lrm, dt=dt, tok_per_sec=tok_per_sec,
                    mfu=mfu, total_time=self.total_time, tokens=step * self.total_batch_size, **extra)

    def state(self):
        return dict(smooth_loss=float(self.smooth), total_time=self.total_time)


def format_time(s):
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def log_report(summary, user_config):
    """Append a section to the report card (nanochat/report.py, when present)."""
    try:
        from nanochat.report import get_report
    except ImportError:
        return
    get_report().log(section="Base model training", data=[user_config, summary])


if __name__ == "__main__":
    raise SystemExit(main())
