"""The numbers of training, apart from its plumbing: the --depth rules of `train base` (width,
the reference run, the batch and weight-decay rules; docs/training.md, "One dial"), the
learning-rate and momentum schedules, and the learning rates inherited along base -> mid -> sft
-> rl. Pure functions."""
import math

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
