"""Checkpoints: save, load, find, verify; a crash never leaves a torn step. (Models built from
them: nanochat/models.py; metrics.jsonl beside them: nanochat/metrics.py.)

Folder: $NANOCHAT_BASE_DIR/checkpoints/<base|mid|sft|rl>/<model_tag>/
    model_<step:06d>.pt            model weights (fp32, CPU tensors, no torch.compile prefixes)
    optim_<step:06d>_rank<r>.pt    each rank's optimizer shard + its RNG states (+ extra state)
    meta_<step:06d>.json           model_config, user_config, step, loop state, ...

Every file is written to a temporary name, fsynced and renamed. The meta file is written last,
after every rank has renamed its shard, so a step "exists" exactly when its meta file does: a
save killed half-way leaves the previous step as the latest loadable one.

Loading never runs code from a file: every .pt file is read with torch.load(weights_only=True)
(tensors, numbers, strings, lists, dicts, tuples only), so the RNG states are stored as such
(numpy's as plain ints and a tensor). The meta file records the sha256 of every other file of
its step and its size; loading checks both, so flipped or missing bytes are a clear error naming
the file and the last step that still verifies, never a silent wrong load. A step without
checksums loads only when asked to (allow_unverified, --allow-unverified,
NANOCHAT_ALLOW_UNVERIFIED=1). Only regular files are read, never more bytes than recorded.

Every meta records the checkpoint format (FORMAT_VERSION) and is checked against a schema
(check_meta: types, sane ranges, bounded nesting) before anything uses it: a bad meta is a
one-line UserError naming it, never a traceback or an absurd allocation (nanochat/checkpoint_meta.py;
the atomic writes and bounded reads: nanochat/files.py).
"""
import glob
import os
import random
import re

import numpy as np
import torch
import torch.distributed as dist

from nanochat.checkpoint_meta import FORMAT_VERSION, check_meta, read_meta
from nanochat.common import UserError, get_base_dir, print0
from nanochat.files import atomic_save, fsync_dir, json_writer, open_regular, sha256_of, torch_writer
from nanochat.gpt import VE_GATE_CHANNELS

SOURCES = ("base", "mid", "sft", "rl")
COMPILE_PREFIX = "_orig_mod."


# ---------------------------------------------------------------------------
# Paths

def checkpoints_root() -> str:
    return os.path.join(get_base_dir(), "checkpoints")


def checkpoint_dir(source: str, model_tag: str) -> str:
    """$NANOCHAT_BASE_DIR/checkpoints/<source>/<model_tag> (not created here)."""
    return os.path.join(checkpoints_root(), source, model_tag)


def _model_path(d, step):
    return os.path.join(d, f"model_{step:06d}.pt")


def _meta_path(d, step):
    return os.path.join(d, f"meta_{step:06d}.json")


def _optim_path(d, step, rank):
    return os.path.join(d, f"optim_{step:06d}_rank{rank}.pt")


# ---------------------------------------------------------------------------
# State helpers

def clean_state_dict(state: dict) -> dict:
    """Strip torch.compile's `_orig_mod.` prefixes and move tensors to the CPU in fp32 (floating
    tensors only), so that a GPU (bf16 or compiled) run's checkpoint loads anywhere."""
    out = {}
    for k, v in state.items():
        k = k.replace(COMPILE_PREFIX, "")
        if torch.is_tensor(v):
            v = v.detach().to("cpu")
            if v.is_floating_point() and v.dtype != torch.float32:
                v = v.float()
        out[k] = v
    return out


def get_rng_state() -> dict:
    """Every random number generator a training step may touch, for exact resume. Only types
    torch.load(weights_only=True) reads back: tensors, ints, floats, strings, tuples, dicts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss_next)
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    random.setstate(state["python"])
    n = state["numpy"]
    if isinstance(n, dict):
        n = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)  # a tuple with an ndarray: a checkpoint from before this format
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda_states = state["torch_cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------------------
# Save

def save_checkpoint(ckpt_dir, step, model_state, optim_state, meta, rank=0, extra=None):
    """Save one step. Call it on EVERY rank (under torchrun): rank 0 writes the model and the
    meta file, every rank writes its optimizer shard with its RNG states (and `extra`, e.g. a
    per-rank dataloader state). The meta file comes last, after a barrier, so the step only
    becomes visible once all of its files are complete."""
    distributed = dist.is_available() and dist.is_initialized()
    os.makedirs(ckpt_dir, exist_ok=True)
    if rank == 0 and os.path.exists(_meta_path(ckpt_dir, step)):
        # re-saving a step (e.g. after a resume): un-publish it first, so that a crash while its
        # files are being replaced can never pair an old meta with new weights
        os.remove(_meta_path(ckpt_dir, step))
        fsync_dir(ckpt_dir)
    if distributed:
        dist.barrier()  # nobody replaces a shard of this step before it is un-published
    sums = {}  # file name -> (sha256, size)
    if rank == 0 and model_state is not None:
        path = _model_path(ckpt_dir, step)
        sums[os.path.basename(path)] = atomic_save(clean_state_dict(model_state), path, torch_writer)
    shard = {"optimizer": optim_state, "rng": get_rng_state(), "extra": extra}
    path = _optim_path(ckpt_dir, step, rank)
    sums[os.path.basename(path)] = atomic_save(shard, path, torch_writer)
    if distributed:
        # every shard is on disk before the step is published; rank 0 learns their checksums
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sums)
        sums = {k: v for part in gathered for k, v in part.items()}
    if rank == 0:
        meta = dict(meta)
        meta["format"] = FORMAT_VERSION
        meta["step"] = step
        meta.setdefault("world_size", dist.get_world_size() if distributed else 1)
        # float sums depend on the number of threads: a resume uses the same count (exact resume)
        meta.setdefault("threads", torch.get_num_threads())
        meta["sha256"] = {name: digest for name, (digest, _) in sorted(sums.items())}
        meta["sizes"] = {name: size for name, (_, size) in sorted(sums.items())}
        atomic_save(meta, _meta_path(ckpt_dir, step), json_writer)
    if distributed:
        dist.barrier()


def annotate_meta(ckpt_dir, step, **fields):
    """Add `fields` (e.g. the evaluation of a step saved just before it) to a saved step's meta,
    rewritten atomically (rank 0 only: the caller checks). The checksums it holds are of the
    step's other files, which do not change."""
    path = _meta_path(ckpt_dir, step)
    meta = read_meta(path)
    meta.update(fields)
    atomic_save(meta, path, json_writer)


# ---------------------------------------------------------------------------
# Find

def complete_steps(ckpt_dir) -> list[int]:
    """Sorted steps whose meta and model files both exist (the meta is written last)."""
    steps = []
    for path in glob.glob(os.path.join(ckpt_dir, "meta_*.json")):
        m = re.fullmatch(r"meta_(\d+)\.json", os.path.basename(path))
        if m and os.path.exists(_model_path(ckpt_dir, int(m.group(1)))):
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_last_step(ckpt_dir) -> int:
    steps = complete_steps(ckpt_dir)
    if not steps:
        raise UserError(f"no complete checkpoint in {ckpt_dir}")
    return steps[-1]


def list_model_tags(stage_dir) -> list[str]:
    """Tags (sub-folders) of a stage folder that hold at least one complete step."""
    if not os.path.isdir(stage_dir):
        return []
    return sorted(t for t in os.listdir(stage_dir)
                  if os.path.isdir(os.path.join(stage_dir, t)) and complete_steps(os.path.join(stage_dir, t)))


def find_largest_model(stage_dir) -> str:
    """The tag with the biggest depth (tags named d<N>, or n_layer in its meta), ties and
    unknown depths broken by the newest checkpoint."""
    tags = list_model_tags(stage_dir)
    if not tags:
        raise UserError(f"no checkpoints in {stage_dir}")

    def key(tag):
        d = os.path.join(stage_dir, tag)
        last = complete_steps(d)[-1]
        m = re.fullmatch(r"d(\d+)", tag)
        depth = int(m.group(1)) if m else None
        if depth is None:
            try:
                depth = check_meta(read_meta(_meta_path(d, last))).get("model_config", {}).get("n_layer")
            except (OSError, ValueError):
                depth = None
        return (depth if depth is not None else -1, os.path.getmtime(_meta_path(d, last)))
    return max(tags, key=key)


# ---------------------------------------------------------------------------
# Load

def _allowed_unverified(allow_unverified):
    return bool(allow_unverified) or os.environ.get("NANOCHAT_ALLOW_UNVERIFIED") == "1"


def _file_verifies(ckpt_dir, name, meta) -> bool:
    """Whether file `name` of a step is a regular file of the recorded size and sha256."""
    want, size = (meta.get("sha256") or {}).get(name), (meta.get("sizes") or {}).get(name)
    if want is None:
        return False
    try:
        f, actual = open_regular(os.path.join(ckpt_dir, name))
    except (OSError, ValueError):
        return False
    with f:
        return (size is None or actual == size) and sha256_of(f, actual) == want


def last_good_step(ckpt_dir, before=None):
    """The newest complete step (before `before`) whose meta fits the schema and whose files all
    verify, or None."""
    for s in reversed(complete_steps(ckpt_dir)):
        if before is not None and s >= before:
            continue
        try:
            meta = check_meta(read_meta(_meta_path(ckpt_dir, s)))
        except (OSError, ValueError):
            continue
        if meta.get("format", 0) > FORMAT_VERSION:
            continue
        names = set(meta.get("sha256") or {}) | {os.path.basename(_model_path(ckpt_dir, s))}
        if all(_file_verifies(ckpt_dir, name, meta) for name in names):
            return s
    return None


def _corrupt(ckpt_dir, step, path, why):
    good = last_good_step(ckpt_dir, before=step)
    hint = (f"the last good step is {good} (--step {good} to load it, --resume-from-step {good} to train "
            f"on from it)" if good is not None else "no earlier step verifies")
    return UserError(f"{path} is unusable ({why}); {hint}")


_NOTED_OLD = set()


def load_meta(ckpt_dir, step, require=(), allow_unverified=False) -> dict:
    """The meta dict of a step, checked: a regular file of JSON that fits the schema
    (check_meta), of a format this version reads, with the `require`d keys, and with checksums
    unless allow_unverified (or NANOCHAT_ALLOW_UNVERIFIED=1). UserError naming the file (and
    the last good step) otherwise."""
    path = _meta_path(ckpt_dir, step)
    try:
        meta = check_meta(read_meta(path))
    except (OSError, ValueError) as e:
        raise _corrupt(ckpt_dir, step, path, f"not a valid meta file: {e}") from None
    fmt = meta.get("format", 0)
    if fmt > FORMAT_VERSION:
        raise UserError(f"{path} is checkpoint format {fmt}, newer than this nanochat reads (format "
                        f"{FORMAT_VERSION}): it was saved by a newer version; upgrade nanochat to load it")
    if fmt < FORMAT_VERSION and path not in _NOTED_OLD:
        _NOTED_OLD.add(path)
        print0(f"note: {path} is checkpoint format {fmt} (saved by an older nanochat, before formats were "
               f"recorded); reading it as such: its file sizes are not recorded, only their checksums")
    missing = [k for k in require if k not in meta]
    if missing:
        raise _corrupt(ckpt_dir, step, path, f"missing {', '.join(missing)}")
    if not meta.get("sha256") and not _allowed_unverified(allow_unverified):
        raise UserError(f"{path} records no checksums, so the files of step {step} cannot be verified "
                        f"(changed or damaged bytes would load silently); every nanochat checkpoint has "
                        f"them. To load it anyway: --allow-unverified (or NANOCHAT_ALLOW_UNVERIFIED=1)")
    return meta


def _load_pt(ckpt_dir, step, path, meta, device, allow_unverified=False):
    """torch.load(weights_only=True) of one file of a step: a regular file, of the size and the
    sha256 the meta recorded (no checksum: only when allow_unverified), read once, never past
    its recorded size."""
    name = os.path.basename(path)
    meta_name = os.path.basename(_meta_path(ckpt_dir, step))
    want, size = (meta.get("sha256") or {}).get(name), (meta.get("sizes") or {}).get(name)
    if want is None and not _allowed_unverified(allow_unverified):
        raise UserError(f"{meta_name} records no checksum for {path}, so it cannot be verified; to load "
                        f"it anyway: --allow-unverified (or NANOCHAT_ALLOW_UNVERIFIED=1)")
    try:
        f, actual = open_regular(path)
    except (OSError, ValueError) as e:
        raise _corrupt(ckpt_dir, step, path, f"cannot be opened as a checkpoint file: {e}") from None
    with f:
        if size is not None and actual != size:
            raise _corrupt(ckpt_dir, step, path, f"it holds {actual:,} bytes, {meta_name} recorded {size:,}: "
                                                 f"the file was changed or damaged")
        if want is not None:
            if sha256_of(f, actual) != want:
                raise _corrupt(ckpt_dir, step, path, f"its sha256 differs from the one {meta_name} recorded "
                                                     f"when it was saved: the file was changed or damaged")
            f.seek(0)
        try:
            # numpy's RNG state of checkpoints from before the JSON-able format holds ndarrays: allow
            # exactly the numpy types that rebuild one (no callable that could run other code)
            with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
                return torch.load(f, map_location=device, weights_only=True)
        except Exception as e:  # truncated, zero bytes, random bytes, not a torch file, or a crafted pickle
            raise _corrupt(ckpt_dir, step, path, f"cannot be read as a checkpoint: {type(e).__name__}: "
                                                 f"{str(e).splitlines()[0] if str(e) else ''}") from None


def _numpy_array_globals():
    import numpy.core.multiarray as multiarray
    rebuild = multiarray._reconstruct
    out = [rebuild, (rebuild, "numpy.core.multiarray._reconstruct"),  # the name numpy 1.x pickles use
           (rebuild, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype]
    out += [type(np.dtype(t)) for t in ("uint32", "int64", "float64")]  # numpy >= 1.25 dtype classes
    return out


_NUMPY_ARRAY_GLOBALS = _numpy_array_globals()


def load_checkpoint(ckpt_dir, step, device="cpu", load_optimizer=False, rank=0, require=(), allow_unverified=False):
    """Return (model_state, shard, meta). `shard` is None unless load_optimizer; it is a dict
    with "optimizer" (this rank's optimizer state), "rng" and "extra" as saved. Every file is
    verified against the meta's checksums and read without running code; anything unusable
    (corrupt, truncated, missing `require`d meta keys) is a UserError naming the file."""
    if step not in complete_steps(ckpt_dir):
        raise UserError(f"no complete checkpoint for step {step} in {ckpt_dir} "
                        f"(complete steps: {complete_steps(ckpt_dir) or 'none'})")
    meta = load_meta(ckpt_dir, step, require, allow_unverified)
    path = _model_path(ckpt_dir, step)
    model_state = _load_pt(ckpt_dir, step, path, meta, device, allow_unverified)
    if not isinstance(model_state, dict):
        raise _corrupt(ckpt_dir, step, path, "not a state dict")
    model_state = {k.replace(COMPILE_PREFIX, ""): v for k, v in model_state.items()}
    outdated = outdated_architecture(model_state)
    if outdated:
        raise UserError(f"{path} holds a model of an older nanochat architecture ({outdated}); this version "
                        f"cannot run it correctly. Train it again with this version, or use the nanochat "
                        f"version that saved it.")
    shard = None
    if load_optimizer:
        path = _optim_path(ckpt_dir, step, rank)
        if not os.path.exists(path):
            raise UserError(f"{path} is missing: the checkpoint was saved with {meta.get('world_size', '?')} "
                            f"process(es); resume with the same number")
        shard = _load_pt(ckpt_dir, step, path, meta, device, allow_unverified)
        if not isinstance(shard, dict) or not {"optimizer", "rng", "extra"} <= set(shard):
            raise _corrupt(ckpt_dir, step, path, "not an optimizer shard")
    return model_state, shard, meta


def outdated_architecture(state):
    """Why a saved GPT state dict comes from an older architecture than this code's, or None.
    Checkpoints from before the smear, backout and 12-channel value-embedding gate (which also
    changed the gate's range and scaled q and k by 1.2) would load wrongly or not at all."""
    if "wte.weight" not in state:
        return None  # not a GPT state dict
    missing = [k for k in ("smear_gate.weight", "smear_lambda", "backout_lambda") if k not in state]
    if missing:
        return f"it has no {', '.join(missing)}: it was saved before the smear and backout were added"
    want = min(VE_GATE_CHANNELS, state["wte.weight"].shape[1])
    for k, w in state.items():
        if k.endswith("attn.ve_gate.weight") and w.shape[1] != want:
            return (f"its value-embedding gates read {w.shape[1]} channels ({k}), this model's read {want}: "
                    f"it was saved before the gate changed")
    return None


def _describe_existing() -> str:
    root = checkpoints_root()
    found = []
    for src in SOURCES:
        for tag in list_model_tags(os.path.join(root, src)):
            steps = complete_steps(os.path.join(root, src, tag))
            found.append(f"{src}/{tag} (steps {', '.join(str(s) for s in steps)})")
    return "; ".join(found) if found else "none"


def resolve_checkpoint(source, model_tag=None, step=None):
    """(ckpt_dir, model_tag, step) for a source, picking the largest tag and last step by
    default; UserError naming what exists when the request cannot be met."""
    if source not in SOURCES:
        raise UserError(f"checkpoint source must be one of {', '.join(SOURCES)}, not '{source}'")
    stage_dir = os.path.join(checkpoints_root(), source)
    tags = list_model_tags(stage_dir)
    if not tags:
        raise UserError(f"no {source} checkpoints in {stage_dir} (run `nanochat train {source}` first); "
                        f"existing checkpoints: {_describe_existing()}")
    if model_tag is None:
        model_tag = find_largest_model(stage_dir)
    elif model_tag not in tags:
        raise UserError(f"no {source} checkpoint with model tag '{model_tag}' in {stage_dir}; "
                        f"existing checkpoints: {_describe_existing()}")
    ckpt_dir = os.path.join(stage_dir, model_tag)
    steps = complete_steps(ckpt_dir)
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"no step {step} in {ckpt_dir}; complete steps: {', '.join(map(str, steps))}")
    return ckpt_dir, model_tag, step


def remove_temp_files(ckpt_dir) -> None:
    """Delete the `<name>.tmp.<pid>` files that saves killed half-way left behind (no file of a
    complete step ever has such a name). Only while no save is running, i.e. before a run."""
    if not os.path.isdir(ckpt_dir):
        return
    for name in os.listdir(ckpt_dir):
        if re.fullmatch(r".+\.tmp\.\d+", name):
            try:
                os.remove(os.path.join(ckpt_dir, name))
            except OSError:
                pass


def clear_tag(ckpt_dir):
    """A fresh (non-resumed) run replaces whatever an earlier run left under the same tag, so that
    its steps and metrics never mix with ours. Meta files go first (un-publishing the steps)."""
    if not os.path.isdir(ckpt_dir):
        return
    names = sorted(os.listdir(ckpt_dir), key=lambda n: not n.startswith("meta_"))
    old = [n for n in names if n.startswith(("meta_", "model_", "optim_")) or n == "metrics.jsonl"]
    if old:
        print0(f"fresh run: removing {len(old)} files of an earlier run in {ckpt_dir} (use --resume to continue it)")
    for n in old:
        os.remove(os.path.join(ckpt_dir, n))
    remove_temp_files(ckpt_dir)
