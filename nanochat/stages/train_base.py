"""`nanochat train base`: pretrain a GPT from scratch. One dial, --depth, sets the rest.

    nanochat train base --depth 20                                  # one GPU or CPU
    torchrun --nproc_per_node=8 -m nanochat train base --depth 20   # one node
    nanochat train base --depth 2 --max-seq-len 128 --device-batch-size 4 \\
        --total-batch-size 512 --num-iterations 20 --eval-tokens 4096   # tiny, CPU, seconds

Derived from --depth (each can be overridden by its own flag; docs/training.md has the rules):
width = depth * aspect ratio rounded up to the head size, heads, the horizon (tokens =
--target-param-data-ratio * scaling parameters), the total batch size (from the horizon, against a
d12 reference at 2^19 tokens), the learning rates (x sqrt(batch / 2^19)) and the weight decay.
Every run prints its FLOPs and the hours it would take on 8xH100 at --assumed-mfu; --dry-run stops
there (no data or GPU needed):

    nanochat train base --depth 24 --target-param-data-ratio 8 --fp8 --dry-run   # the speedrun, on paper

Checkpoints, metrics.jsonl and the resume state go to $NANOCHAT_BASE_DIR/checkpoints/base/<tag>.
"""
import argparse
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat import checkpoint as ck
from nanochat import fp8
from nanochat.attention import warm_window_masks
from nanochat.autobatch import estimated_batch, fits_measured, optimizer_state_bytes, probe_order
from nanochat.common import (UserError, add_common_flags, autocast_ctx, autodetect_device_type, compute_cleanup,
                             compute_dtype_choice, compute_init, gc_step, get_peak_flops, print0)
from nanochat.core_eval import evaluate_core
from nanochat.dataloader import PretrainLoader  # see docs/data.md
from nanochat.dataset import list_shards, validate_shards
from nanochat.engine import greedy_samples
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.run import ResumeState, Run, check_horizon, saved_architecture
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.flags import add_compile_flag, add_schedule_flags, check_loop_args, check_schedule_args
from nanochat.hparams import (REF_DEPTH, base_muon_momentum, batch_lr_scale, derive_total_batch_size, lr_multiplier,
                              model_dims, scaled_weight_decay, scaling_params, set_lrs, weight_decay_at)
from nanochat.training import StepLog, clear_grads, is_due, largest_fitting

# The yardstick of the on-paper time: one H100 SXM's dense bf16 tensor-core peak (the data sheet's
# 1,979 TFLOP/s is with 2:4 sparsity), 8 of them (one node), at --assumed-mfu. MFU is counted
# against the bf16 peak with --fp8 too (as the step log does), so an FP8 run's assumed MFU is a
# bf16-equivalent one: FP8 matmuls peak at 2x (1,979 TFLOP/s dense) but the attention, norms and
# optimizer do not speed up.
H100_BF16_PEAK_FLOPS = 989e12
PAPER_GPUS = 8


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
    g.add_argument("--target-param-data-ratio", type=float, default=12,
                   help="training tokens per scaling parameter (transformer matrices + output head) (default 12)")
    g = p.add_argument_group("optimization")
    g.add_argument("--embedding-lr", type=float, default=0.3,
                   help="AdamW lr of the token and value embeddings at 2^19 tokens/step (default 0.3)")
    g.add_argument("--unembedding-lr", type=float, default=0.008, help="AdamW lr of the output head at 2^19 tokens/step (default 0.008)")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr of the transformer matrices at 2^19 tokens/step (default 0.02)")
    g.add_argument("--scalar-lr", type=float, default=0.5, help="AdamW lr of the per-layer scalars at 2^19 tokens/step (default 0.5)")
    g.add_argument("--weight-decay", type=float, default=0.28,
                   help="Muon weight decay of the d12 reference run; scaled by sqrt(batch/2^19) x (d12 tokens / tokens), "
                        "then cosine-decayed to 0 over the run (default 0.28)")
    g.add_argument("--lr-batch-scaling", choices=("sqrt", "none"), default="sqrt",
                   help="sqrt: every lr x sqrt(total batch / 2^19) (upstream's rule, default); none: the lrs as given "
                        "(runs/runcpu.sh: at a 4,096-token batch the rule divides them by 11; docs/training.md)")
    g.add_argument("--muon-eq-plus", action="store_true",
                   help="MuonEq row equilibration and Muon+ renormalization in Muon (upstream HEAD has them; docs/optim.md)")
    add_schedule_flags(g, warmdown_ratio=0.65, final_lr_frac=0.05, warmup_steps=40)
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
    add_compile_flag(g)
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass: less memory, ~30%% more compute")
    g.add_argument("--fp8", action="store_true",
                   help="the transformer's linear layers in FP8 (tensorwise scaling); needs a GPU of compute "
                        "capability >= 8.9 (H100-class) and compile to pay off (docs/training.md, FP8)")
    g.add_argument("--assumed-mfu", type=float, default=0.5,
                   help="MFU (of the H100 bf16 dense peak, 989 TFLOP/s) for the on-paper time on 8xH100 (default 0.5)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the derived configuration and the on-paper time, and exit (no data, model or GPU needed)")
    return p


def fp8_layers(converted, kept):
    return (f"tensorwise: {len(converted)} linear layers ({fp8.summarize(converted)}); "
            f"kept in the compute dtype: {fp8.summarize(kept) or 'none'}")


# ---------------------------------------------------------------------------
# The plan: everything derived from the flags, before any data or device is touched

DEFAULT_VOCAB_SIZE = GPTConfig.vocab_size  # what `nanochat tokenizer train` makes by default (32,768)
AUTO_BATCH_CANDIDATES = (256, 128, 64, 32, 16, 8, 4, 2, 1)


def requested_device_batch(args):
    """--device-batch-size as an int, or None for 'auto'."""
    if args.device_batch_size == "auto":
        return None
    try:
        b = int(args.device_batch_size)
    except ValueError:
        raise UserError(f"--device-batch-size must be a positive integer or 'auto', not '{args.device_batch_size}'")
    if b < 1:
        raise UserError(f"--device-batch-size must be >= 1, not {b}")
    return b


def check_base_args(args, device_type):
    """The cheap flag checks, before any process group or data is touched."""
    if args.depth < 1:
        raise UserError(f"--depth must be >= 1, not {args.depth}")
    if args.aspect_ratio < 1 or args.head_dim < 1:
        raise UserError("--aspect-ratio and --head-dim must be >= 1")
    if args.max_seq_len < 2:
        raise UserError(f"--max-seq-len must be >= 2, not {args.max_seq_len}")
    if requested_device_batch(args) is None and device_type != "cuda" and not args.dry_run:
        raise UserError("--device-batch-size auto needs CUDA (it probes GPU memory); give a number")
    check_schedule_args(args)
    check_loop_args(args)
    if args.target_param_data_ratio <= 0:
        raise UserError(f"--target-param-data-ratio must be > 0, not {args.target_param_data_ratio}")
    if not 0 < args.assumed_mfu <= 1:
        raise UserError(f"--assumed-mfu must be in (0, 1], not {args.assumed_mfu}")
    base_shape(args, device_type)


def base_shape(args, device_type):
    """(width, heads, kv heads, window pattern) of --depth and the shape flags: width = depth x
    aspect ratio rounded up to the head size, heads of --head-dim, windows SSSL on CUDA, else L."""
    model_dim, n_head = model_dims(args.depth, args.aspect_ratio, args.head_dim)
    n_kv_head = args.n_kv_head if args.n_kv_head is not None else n_head
    if n_kv_head < 1 or n_head % n_kv_head:
        raise UserError(f"--n-kv-head ({n_kv_head}) must divide the number of heads ({n_head})")
    window_pattern = (args.window_pattern or ("SSSL" if device_type == "cuda" else "L")).upper()
    if not window_pattern or set(window_pattern) - {"S", "L"}:
        raise UserError(f"--window-pattern must be made of S and L, not '{args.window_pattern}'")
    return model_dim, n_head, n_kv_head, window_pattern


def base_model_config(args, vocab_size, device_type):
    """The GPTConfig fields of a fresh `train base` run (base_shape, --max-seq-len, --short-window)."""
    model_dim, n_head, n_kv_head, window_pattern = base_shape(args, device_type)
    config = dict(sequence_len=args.max_seq_len, vocab_size=vocab_size, n_layer=args.depth, n_head=n_head,
                  n_kv_head=n_kv_head, n_embd=model_dim, window_pattern=window_pattern)
    if args.short_window is not None:
        config["short_window"] = args.short_window
    return config


def reference_model(model_config, args):
    """The d12 model of this run's vocabulary, context, aspect ratio and head size, on the meta
    device: the reference whose horizon (and 2^19-token batch) the batch and decay rules scale from."""
    dim, heads = model_dims(REF_DEPTH, args.aspect_ratio, args.head_dim)
    cfg = dict(model_config, n_layer=REF_DEPTH, n_embd=dim, n_head=heads, n_kv_head=heads)
    with torch.device("meta"):
        return GPT(GPTConfig(**cfg))


@dataclass
class BasePlan:
    """What `train base` will do: the values it derives from the flags (docs/training.md, "One
    dial"). derived() is what the checkpoints' meta and wandb record."""
    model_tag: str
    model_config: dict
    counts: dict                  # GPT.num_params_by_category()
    device_batch_size: int | None  # None: --device-batch-size auto, not probed yet
    total_batch_size: int
    grad_accum: int | None
    num_iterations: int
    train_tokens: float           # the horizon the batch and weight-decay rules see
    ref_tokens: float             # the d12 reference's horizon
    lr_scale: float
    lrs: dict
    weight_decay: float           # Muon's, at step 0 (cosine to 0 over the run)
    scaling_params: int
    flops_per_token: int
    eval_steps: int | None
    world_size: int
    assumed_mfu: float
    fp8: bool

    @property
    def total_tokens(self):
        return self.num_iterations * self.total_batch_size

    @property
    def total_flops(self):
        return self.flops_per_token * self.total_tokens

    @property
    def paper_hours(self):
        """Hours on 8 H100s at --assumed-mfu of the bf16 dense peak."""
        return self.total_flops / (PAPER_GPUS * H100_BF16_PEAK_FLOPS * self.assumed_mfu) / 3600

    def derived(self, dtype):
        return dict(model_tag=self.model_tag, device_batch_size=self.device_batch_size,
                    total_batch_size=self.total_batch_size, grad_accum=self.grad_accum,
                    num_iterations=self.num_iterations, total_tokens=self.total_tokens,
                    train_tokens=self.train_tokens, ref_tokens=self.ref_tokens, lr_scale=self.lr_scale,
                    lrs=self.lrs, weight_decay_scaled=self.weight_decay, num_params=self.counts["total"],
                    scaling_params=self.scaling_params, flops_per_token=self.flops_per_token,
                    total_flops=self.total_flops, assumed_mfu=self.assumed_mfu,
                    paper_hours_8xh100=self.paper_hours, world_size=self.world_size,
                    dtype=str(dtype).replace("torch.", ""), eval_steps=self.eval_steps, fp8=self.fp8)


def plan_base(args, model_config, world_size, device_batch_size=None):
    """The plan of a `train base` run, derived in upstream's order (scripts/base_train.py; each
    rule in docs/training.md). Pure: the model exists only on the meta device. device_batch_size:
    the probed micro-batch when --device-batch-size is auto (None: left open)."""
    T = args.max_seq_len
    # 1. The model: parameters and FLOPs per token; the scaling parameters are the transformer
    #    matrices + lm_head (upstream's count, which gives its cleanest scaling laws)
    with torch.device("meta"):
        model = GPT(GPTConfig(**model_config))
    counts = model.num_params_by_category()
    n_scaling = scaling_params(counts)
    flops_per_token = model.estimate_flops()
    # 2. The horizon D: --target-param-data-ratio x scaling params (Chinchilla-style tokens per
    #    parameter; Hoffmann et al. 2022, arXiv:2203.15556), or what --target-flops buys; D_ref:
    #    the d12 reference's at the same ratio
    train_tokens = args.target_flops / flops_per_token if args.target_flops > 0 else \
        args.target_param_data_ratio * n_scaling
    ref_tokens = args.target_param_data_ratio * scaling_params(reference_model(model_config, args).num_params_by_category())
    # 3. The batch: 2^19 x (D / D_ref)^0.383 ("Power Lines", Bergsma et al. 2025, arXiv:2505.13738)
    #    as a whole number of micro-batches (device batch x seq len x processes)
    B = device_batch_size or requested_device_batch(args)
    tokens_per_fwdbwd = (B or 1) * T * world_size
    if B is None and args.total_batch_size > 0 and args.total_batch_size % (T * world_size):
        raise UserError(f"--total-batch-size {args.total_batch_size} is not a multiple of "
                        f"max-seq-len * processes = {T * world_size}")
    total_batch_size = args.total_batch_size if args.total_batch_size > 0 else \
        derive_total_batch_size(train_tokens, ref_tokens, tokens_per_fwdbwd)
    if total_batch_size % tokens_per_fwdbwd:
        raise UserError(f"--total-batch-size {total_batch_size} is not a multiple of device-batch-size * "
                        f"max-seq-len * processes = {B} * {T} * {world_size} = {tokens_per_fwdbwd}")
    # 4. The steps: --num-iterations, else the horizon (or the FLOPs budget) over the batch
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif args.target_flops > 0:
        num_iterations = max(1, round(args.target_flops / (flops_per_token * total_batch_size)))
    else:
        num_iterations = max(1, round(train_tokens / total_batch_size))
    # 5. Learning rates x sqrt(B / 2^19): the square-root rule for Adam (Malladi et al. 2022,
    #    arXiv:2205.10287), applied to Muon too, as upstream does
    lr_scale = batch_lr_scale(total_batch_size) if args.lr_batch_scaling == "sqrt" else 1.0
    lrs = {k: getattr(args, k) * lr_scale for k in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")}
    # 6. Muon's weight decay: lambda_ref x sqrt(B / 2^19) x D_ref / D keeps the AdamW timescale
    #    B / (lr lambda D) at the reference's (Wang & Aitchison 2024, arXiv:2405.13698)
    weight_decay = scaled_weight_decay(args.weight_decay, total_batch_size, train_tokens, ref_tokens)
    # 7. Evaluation: --eval-tokens, else 20 total batches
    eval_tokens = args.eval_tokens if args.eval_tokens > 0 else 20 * total_batch_size
    return BasePlan(model_tag=args.model_tag or f"d{args.depth}", model_config=model_config, counts=counts,
                    device_batch_size=B, total_batch_size=total_batch_size,
                    grad_accum=total_batch_size // tokens_per_fwdbwd if B else None,
                    num_iterations=num_iterations, train_tokens=train_tokens, ref_tokens=ref_tokens,
                    lr_scale=lr_scale, lrs=lrs, weight_decay=weight_decay, scaling_params=n_scaling,
                    flops_per_token=flops_per_token,
                    eval_steps=max(1, eval_tokens // tokens_per_fwdbwd) if B else None,
                    world_size=world_size, assumed_mfu=args.assumed_mfu, fp8=args.fp8)


def print_plan(plan, args, dtype_line, fp8_note):
    c, T = plan.model_config, args.max_seq_len
    print0(f"compute dtype: {dtype_line}; weights and optimizer state fp32")
    print0(f"fp8: {fp8_note}")
    print0(f"model: depth {c['n_layer']}, dim {c['n_embd']}, heads {c['n_head']} (kv {c['n_kv_head']}), "
           f"windows {c['window_pattern']}, seq len {T}, vocab {c['vocab_size']}")
    print0(f"parameters: {plan.counts['total']:,} ({', '.join(f'{k} {v:,}' for k, v in plan.counts.items())}); "
           f"scaling parameters (matrices + lm_head) {plan.scaling_params:,}; FLOPs/token {plan.flops_per_token:.3e}")
    B, world = plan.device_batch_size, plan.world_size
    micro = f"{B} seqs x {T} tokens x {world} procs x {plan.grad_accum} accum" if B else \
        f"device batch auto (probed at the start) x {T} tokens x {world} procs"
    print0(f"batch: {plan.total_batch_size:,} tokens/step = {micro}")
    print0(f"horizon: {plan.num_iterations:,} steps = {plan.total_tokens:,} tokens "
           f"({plan.total_tokens / plan.scaling_params:.2f} tokens/scaling param); "
           f"d{REF_DEPTH} reference {plan.ref_tokens:,.0f} tokens")
    scaling = f"x sqrt(batch / 2^19) = x {plan.lr_scale:.4g}" if args.lr_batch_scaling == "sqrt" else "not batch-scaled"
    print0(f"learning rates ({scaling}): " + ", ".join(f"{k} {v:.4g}" for k, v in plan.lrs.items())
           + f"; Muon weight decay {plan.weight_decay:.4g}, cosine to 0")
    print0(f"schedule: lr warmup {args.warmup_steps} steps, warmdown over the last {args.warmdown_ratio:g} to "
           f"{args.final_lr_frac:g}; Muon momentum 0.85 -> 0.97 (400 steps) -> 0.90 over the warmdown")
    fp8_peak = " (FP8 counted against the bf16 peak: a bf16-equivalent MFU)" if plan.fp8 else ""
    print0(f"on paper: {plan.total_flops:.3e} FLOPs = {plan.flops_per_token:.3e} FLOPs/token x "
           f"{plan.total_tokens:,} tokens -> {plan.paper_hours:.2f} h on {PAPER_GPUS}xH100 SXM at "
           f"{plan.assumed_mfu:.0%} MFU of {H100_BF16_PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16 dense{fp8_peak}")


# ---------------------------------------------------------------------------
# Memory helpers (CUDA)

def compile_for_training(model, args):
    """The model as the run trains it: compiled unless --no-compile (default on CUDA), after its
    window masks are built (an empty mask cache made the second call compile everything again)."""
    device = next(model.parameters()).device
    if not (args.compile if args.compile is not None else device.type == "cuda"):
        return model
    warm_window_masks(model.config.layer_windows(), args.max_seq_len, device)
    return torch.compile(model, dynamic=False)


def auto_device_batch(model, args, world_size, device):
    """--device-batch-size auto: the largest candidate micro-batch (dividing the total batch when
    one is given) whose training step fits on every process (nanochat/autobatch.py): estimated
    from the shapes with this process's share of the optimizer state, then the step that will
    train (compiled when the run compiles; the graph of the batch chosen is the one training
    runs) measured at the candidate above the estimate and down from there."""
    T, vocab_size = args.max_seq_len, model.config.vocab_size
    multiple = args.total_batch_size // (T * world_size) if args.total_batch_size > 0 else 256
    candidates = [b for b in AUTO_BATCH_CANDIDATES if multiple % b == 0]
    estimate = estimated_batch(model, T, torch.cuda.get_device_properties(device).total_memory, candidates, world_size)
    train_model = compile_for_training(model, args)

    def step(b):
        try:
            x = torch.randint(0, vocab_size, (b, T), device=device)
            with autocast_ctx(device):
                train_model(x, x).backward()
        finally:
            model.zero_grad(set_to_none=True)
    fits = fits_measured(step, optimizer_state_bytes(model, world_size), device)
    B = largest_fitting(probe_order(candidates, estimate), fits, device)
    torch.cuda.empty_cache()
    if B is None:
        raise UserError(f"--device-batch-size auto: not even 1 sequence of {T} tokens fits; "
                        f"lower --max-seq-len or use --activation-checkpointing")
    print0(f"--device-batch-size auto: {B} (estimated {estimate}, measured {fits.tried}; "
           f"agreed by all {world_size} process(es))")
    return B


# ---------------------------------------------------------------------------

def planning_vocab(args, device_type):
    """(tokenizer, vocab size). A dry run plans without a tokenizer for the default vocabulary;
    a real run needs the tokenizer and checks every shard's schema before anything starts."""
    if not args.dry_run:
        tokenizer = get_tokenizer()
        validate_shards(list_shards())
        return tokenizer, tokenizer.get_vocab_size()
    try:
        tokenizer = get_tokenizer()
        vocab_size = tokenizer.get_vocab_size()
    except UserError:
        tokenizer, vocab_size = None, DEFAULT_VOCAB_SIZE
        print0(f"dry run: no tokenizer yet, planning for the default vocabulary of {vocab_size:,} tokens")
    if args.window_pattern is None and device_type != "cuda":
        print0(f"dry run: windows L (the default on {device_type}); on CUDA the default is SSSL: "
               f"add --window-pattern SSSL for a GPU plan")
    return tokenizer, vocab_size


def main(argv=None):
    args = build_parser().parse_args(argv)
    device_type = args.device_type or autodetect_device_type()
    check_base_args(args, device_type)
    tokenizer, vocab_size = planning_vocab(args, device_type)
    is_dist, rank, local_rank, world_size, device = compute_init(device_type, seed=args.seed)
    try:
        return train(args, tokenizer, vocab_size, device, rank, world_size)
    finally:
        compute_cleanup()


def train(args, tokenizer, vocab_size, device, rank, world_size):
    """Plan, build, loop."""
    model_config = base_model_config(args, vocab_size, device.type)
    run = Run(ck.checkpoint_dir("base", args.model_tag or f"d{args.depth}"), args, world_size, rank)
    if run.resume_step is not None:
        model_config = saved_architecture(model_config, run.resumed_meta)
    plan = plan_base(args, model_config, world_size)
    model, plan, fp8_note = build(args, plan, device)
    check_horizon(run.resume_step, plan.num_iterations)
    dtype, dtype_why = compute_dtype_choice(device.type)
    print_plan(plan, args, f"{str(dtype).replace('torch.', '')} ({dtype_why})", fp8_note)
    meta = dict(model_config=plan.model_config, user_config=dict(vars(args), device_batch_size=requested_device_batch(args)),
                derived=plan.derived(dtype))
    if args.dry_run:
        print0(meta["derived"])
        return 0
    return loop(args, plan, run, model, tokenizer, meta)


def build(args, plan, device):
    """(model, plan, fp8 note): the model built (on the meta device only for a dry run),
    initialized, converted to FP8 if asked, and the plan's micro-batch filled in if it was auto."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**plan.model_config))
    if args.fp8:
        why_not = fp8.unsupported_reason(device)
        if why_not and not args.dry_run:
            raise UserError(f"--fp8: {why_not}; train without --fp8 (bf16)")
        if args.dry_run:  # which layers it would convert (on the meta model: shapes only)
            return model, plan, ("on, " if not why_not else f"requested, not on this machine ({why_not}); would be ") + \
                fp8_layers(*fp8.convert_to_fp8(model))
    if args.dry_run:
        return model, plan, "off"
    model.to_empty(device=device)
    torch.manual_seed(args.seed)
    model.init_weights()
    model.checkpoint_activations = args.activation_checkpointing  # each block in torch.utils.checkpoint
    fp8_note = "off"
    if args.fp8:  # before the batch probe, compile and the optimizer; the parameters stay the same
        fp8_note = "on, " + fp8_layers(*fp8.convert_to_fp8(model))
    if plan.device_batch_size is None:  # --device-batch-size auto
        plan = plan_base(args, plan.model_config, plan.world_size, auto_device_batch(model, args, plan.world_size, device))
    return model, plan, fp8_note


class Evaluations:
    """What `train base` evaluates at a step boundary: val bpb, CORE, greedy samples (each when
    due); the latest values for the summary."""

    def __init__(self, args, plan, model, tokenizer, master):
        self.args, self.plan, self.model, self.tokenizer, self.master = args, plan, model, tokenizer, master
        self.device = next(model.parameters()).device
        self.token_bytes = get_token_bytes(self.device)
        self.val_batches = None
        self.val_bpb, self.min_val_bpb, self.core = None, float("inf"), None

    def __call__(self, step, last, compiled):
        a, n, device, out = self.args, self.plan.num_iterations, self.device, {}
        if is_due(step, a.eval_every, last, at_start=True):
            if self.val_batches is None:
                self.val_batches = load_val_batches(self.tokenizer, self.plan.device_batch_size, a.max_seq_len,
                                                    self.plan.eval_steps)
            compiled.eval()
            with autocast_ctx(device):
                batches = ((x.to(device), y.to(device)) for x, y in self.val_batches)
                self.val_bpb = evaluate_bpb(compiled, batches, self.plan.eval_steps, self.token_bytes)
            compiled.train()
            self.min_val_bpb = min(self.min_val_bpb, self.val_bpb)
            print0(f"step {step:05d}/{n:05d} | val bpb {self.val_bpb:.4f}")
            out["val_bpb"] = self.val_bpb
        if is_due(step, a.core_metric_every, last, at_end=False):
            self.model.eval()
            with autocast_ctx(device):
                res = evaluate_core(self.model, self.tokenizer, device, max_per_task=a.core_metric_max_per_task)
            self.model.train()
            self.core = out["core"] = res["core"]
            print0(f"step {step:05d}/{n:05d} | CORE {res['core']:.4f} ({res['num_available']}/{res['num_tasks']} tasks)")
        if self.master and is_due(step, a.sample_every, last, at_end=False):
            self.model.eval()
            with autocast_ctx(device):
                for sample in greedy_samples(self.model, self.tokenizer):
                    print0(f"  {sample!r}")
            self.model.train()
        return out


def loop(args, plan, run, model, tokenizer, meta):
    device = next(model.parameters()).device
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    compiled = compile_for_training(model, args)
    optimizer = model.setup_optimizer(**plan.lrs, weight_decay=plan.weight_decay,
                                      compile=use_compile or None)  # --compile on CPU compiles the optimizer's updates too
    B, T, grad_accum, n = plan.device_batch_size, args.max_seq_len, plan.grad_accum, plan.num_iterations
    # The data is split into grad_accum * world_size "data ranks", one loader each; micro-step k
    # of process r reads data rank r * grad_accum + k: the same batches for 1 GPU with 8
    # accumulation steps as for 8 GPUs without (same run, up to float summation order).
    loaders = [PretrainLoader(tokenizer, B, T, split="train", device=device, rank=run.rank * grad_accum + k,
                              world_size=grad_accum * plan.world_size) for k in range(grad_accum)]
    log = StepLog(device, plan.total_batch_size, n)
    state = ResumeState(model, optimizer, loaders, log)
    run.begin(state, n, "nanochat", meta)
    for group in optimizer.param_groups:  # after a resume too: the saved groups replaced ours
        if group["kind"] == "muon":
            group["row_eq"] = group["renorm"] = args.muon_eq_plus
    evaluations = Evaluations(args, plan, model, tokenizer, run.master)
    peak_flops = get_peak_flops(device)
    state.mark_data()  # the data position a save records: before the first batch, fetched ahead
    x, y = next(loaders[0])
    step, record = run.start_step, None
    while not run.boundary(step, record, lambda s, last: evaluations(s, last, compiled)):
        log.begin_step()  # evaluations do not count as step time
        lrm = lr_multiplier(step, n, 0.0, args.warmdown_ratio, args.final_lr_frac, warmup_steps=args.warmup_steps)
        set_lrs(optimizer, lrm, base_muon_momentum(step, n, args.warmdown_ratio), weight_decay_at(step, plan.weight_decay, n))
        loss_sum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            with autocast_ctx(device):
                loss = compiled(x, y)
            loss_sum += loss.detach()
            (loss / grad_accum).backward()
            if micro == grad_accum - 1 and run.save_due(step + 1):
                state.mark_data()  # before taking step + 2's first batch
            x, y = next(loaders[(micro + 1) % grad_accum])  # fetched while the device works on the backward
        optimizer.step()
        clear_grads(compiled)
        train_loss = loss_sum / grad_accum
        if plan.world_size > 1:
            dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
        log.end_step(train_loss)
        step += 1
        gc_step(step - run.start_step)  # after the first step: the collector frozen and off (upstream)
        if log.due(step, args.log_every):  # the only place that waits for the device
            record = log.line(step, lrm, run.start_step, plan.flops_per_token, peak_flops, plan.world_size)
        else:
            record = None
    for ld in loaders:
        ld.close()
    run.finish("Base model training", {
        "model tag": plan.model_tag, "depth": args.depth, "parameters": plan.counts["total"],
        "FLOPs per token": f"{plan.flops_per_token:.3e}", "steps": n, "tokens": plan.total_tokens,
        "total batch size": plan.total_batch_size,
        "tokens per scaling parameter": round(plan.total_tokens / plan.scaling_params, 2),
        "training time (min)": round(log.total_time / 60, 2), "final val bpb": evaluations.val_bpb,
        "min val bpb": None if evaluations.min_val_bpb == float("inf") else evaluations.min_val_bpb,
        "CORE": evaluations.core, "processes": plan.world_size, "fp8": args.fp8,
        "peak memory (MiB)": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None,
    })
    return 0


def load_val_batches(tokenizer, B, T, steps):
    """The validation batches, read once and kept on the CPU: every evaluation sees the same
    tokens, and we do not re-tokenize them each time."""
    loader = PretrainLoader(tokenizer, B, T, split="val", device="cpu", loop=False, prefetch=1)
    try:
        return [b for _, b in zip(range(steps), loader)]
    finally:
        loader.close()


if __name__ == "__main__":
    raise SystemExit(main())
