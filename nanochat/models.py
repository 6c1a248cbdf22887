"""Models from checkpoints: built on the meta device, loaded, verified against their config and
put in train or eval mode (build_model, load_model), and the model of `chat`, `serve` and
`export hf` (load_chat_model: -i SOURCE, or the first of sft, mid, base)."""
import os

import torch

from nanochat.checkpoint import (_corrupt, _meta_path, _model_path, checkpoints_root, list_model_tags,
                                 load_checkpoint, resolve_checkpoint)
from nanochat.common import UserError, compute_init
from nanochat.gpt import GPT, GPTConfig
from nanochat.quant import prepare_for_inference, weights_choice
from nanochat.tokenizer import get_tokenizer


def build_model(ckpt_dir, step, device, phase="eval", dtype=None, weights=None, allow_unverified=False):
    """(model, tokenizer, meta) from a saved step: the model is built on the meta device,
    materialized on `device`, loaded (fp32 master weights) and put in train or eval mode.
    dtype: the weights' dtype after loading, for inference (None = fp32, as stored). A model that
    only runs forward needs no fp32 master copy, and with weights in the compute dtype no matmul
    casts a weight per call (autocast would, every decode step). weights (eval phase only): an
    inference weight format, fp32|bf16|int8 (nanochat/quant.py), instead of dtype. The model's
    n_params is its parameter count as trained (an int8 model keeps most weights in buffers)."""
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', not {phase!r}")
    device = torch.device(device)
    model_state, _, meta = load_checkpoint(ckpt_dir, step, device, require=("model_config",),
                                           allow_unverified=allow_unverified)
    meta_path = _meta_path(ckpt_dir, step)
    try:
        config = GPTConfig(**meta["model_config"])
        with torch.device("meta"):
            model = GPT(config)
    except Exception as e:  # unknown keys, wrong types, impossible shapes
        raise _corrupt(ckpt_dir, step, meta_path, f"its model_config does not describe a model: {e}") from None
    # shapes first, on the meta device: a model_config far bigger than the weights saved is
    # refused before any memory is allocated for it
    for k, v in model.state_dict().items():
        if k in model_state and tuple(model_state[k].shape) != tuple(v.shape):
            raise _corrupt(ckpt_dir, step, _model_path(ckpt_dir, step),
                           f"its weights do not fit the model_config in {os.path.basename(meta_path)}: {k} is "
                           f"{tuple(model_state[k].shape)} in the file, {tuple(v.shape)} in the model_config")
    model.to_empty(device=device)
    model.n_params = sum(p.numel() for p in model.parameters())
    model.init_weights()  # fills buffers that are not in the state dict (e.g. rotary tables)
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:2] or [str(e)[:200]]
        raise _corrupt(ckpt_dir, step, _model_path(ckpt_dir, step),
                       f"its weights do not fit the model_config in {os.path.basename(meta_path)}: {first[0]}") from None
    if phase == "train":
        model.train()
        if dtype is not None:
            model.to(dtype)
    elif weights is not None:
        prepare_for_inference(model, weights, device.type)  # freeze, then the weight format
    else:
        model.freeze(dtype)  # eval mode, no autograd bookkeeping, CPU inference layout
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model in {ckpt_dir} "
                        f"was trained with vocab_size {config.vocab_size}: wrong tokenizer in "
                        f"$NANOCHAT_BASE_DIR/tokenizer?")
    return model, tokenizer, meta


def load_model(source, device, phase="eval", model_tag=None, step=None, dtype=None, weights=None,
               allow_unverified=False):
    """Load a base/mid/sft/rl model: (model, tokenizer, meta). Defaults: the largest model tag
    and its latest complete step; fp32 weights unless `dtype` or `weights` (see build_model)."""
    ckpt_dir, _, step = resolve_checkpoint(source, model_tag, step)
    return build_model(ckpt_dir, step, device, phase, dtype, weights, allow_unverified)


# ---------------------------------------------------------------------------
# The model of `chat`, `serve` and `export hf`: -i SOURCE, or the first of sft, mid, base

DEFAULT_CHAT_SOURCES = ("sft", "mid", "base")


def pick_source(source):
    """-i SOURCE as given, else the first of sft, mid, base that has a checkpoint."""
    if source:
        return source
    for s in DEFAULT_CHAT_SOURCES:
        if list_model_tags(os.path.join(checkpoints_root(), s)):
            return s
    raise UserError(f"no sft, mid or base checkpoint under {checkpoints_root()} "
                    f"(train one with `nanochat train base`, or name one with -i)")


def load_chat_model(args):
    """(model, tokenizer, meta, source) for the flags of add_model_flags, on --device-type, with the
    weights in --weights (its default resolved for this device)."""
    source = pick_source(args.source)
    _, _, _, _, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model(source, device, phase="eval", model_tag=args.model_tag, step=args.step,
                                        weights=weights_choice(args.weights, device.type)[0],
                                        allow_unverified=args.allow_unverified)
    return model, tokenizer, meta, source
