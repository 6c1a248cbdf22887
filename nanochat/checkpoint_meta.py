"""The checkpoint meta file's format and schema: FORMAT_VERSION, read_meta (a bounded read of a
regular file of JSON) and check_meta (types, sane ranges, bounded nesting), so that a bad meta is a
one-line error naming it, never a traceback or an absurd allocation (nanochat/checkpoint.py)."""
import json
import math
import re

from nanochat.files import open_regular

# The checkpoint format: the layout of a step's files and of its meta. Bumped when an older
# nanochat would misread a new checkpoint, or this one an older checkpoint (docs/training.md).
# 1: "format" and "sizes" recorded, checksums required. A meta without "format" is format 0
# (written before formats were recorded): the same layout without sizes, read as such.
FORMAT_VERSION = 1
MAX_META_BYTES = 16 << 20  # a meta is a few KB; more is not a meta
MAX_META_DEPTH = 32        # nesting of its JSON (ours is at most 4 deep)


def read_meta(path) -> dict:
    """The meta file's dict; ValueError (with the reason) when it is not one: not a regular
    file, over MAX_META_BYTES, not UTF-8 JSON, nested deeper than the parser (or MAX_META_DEPTH)."""
    f, size = open_regular(path)
    with f:
        if size > MAX_META_BYTES:
            raise ValueError(f"{size:,} bytes, more than a meta file holds ({MAX_META_BYTES:,})")
        raw = f.read(MAX_META_BYTES + 1)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("its JSON is nested too deeply") from None
    if not isinstance(meta, dict):
        raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    return meta


# The meta schema: what each key must hold when present (absent keys are for `require` to ask).
# Ranges are generous bounds that no real run comes near, so that a damaged or crafted meta
# cannot make a loader allocate terabytes (a 10**12 sequence_len would size the rotary table).
MODEL_CONFIG_LIMITS = {"sequence_len": (1, 1 << 17), "vocab_size": (1, 1 << 22), "n_layer": (1, 1024),
                       "n_head": (1, 1024), "n_kv_head": (1, 1024), "n_embd": (1, 1 << 16),
                       "short_window": (0, 1 << 17)}
LOOP_KEYS = ("smooth_loss", "total_time")  # training.StepLog.state(), given back to StepLog(**loop)
_FILE_NAME = re.compile(r"(model_\d{6}|optim_\d{6}_rank\d{1,6})\.pt")


def _show(v):
    text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else repr(v)
    return text if len(text) <= 40 else text[:30] + f"... ({len(text):,} characters)"


def _depth(obj):
    """Nesting depth of plain JSON data, without recursion."""
    deepest, todo = 0, [(obj, 1)]
    while todo:
        x, d = todo.pop()
        if isinstance(x, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_META_DEPTH:
                return d
            todo += [(v, d + 1) for v in (x.values() if isinstance(x, dict) else x)]
    return deepest


def check_meta(meta) -> dict:
    """meta, if it fits the schema; else ValueError naming the first key that does not (e.g.
    "model_config.sequence_len must be an integer in [1, 131072], not 1000000000000")."""
    def integer(v, lo, hi):
        return type(v) is int and lo <= v <= hi  # bool is no integer here

    def number(v):
        return type(v) in (int, float) and math.isfinite(v)

    def need(ok, where, what, v):
        if not ok:
            raise ValueError(f"{where} must be {what}, not {_show(v)}")

    def mapping(key):
        v = meta.get(key)
        need(v is None or isinstance(v, dict), key, "an object", v)
        return v or {}

    if not isinstance(meta, dict):
        raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    depth = _depth(meta)
    if depth > MAX_META_DEPTH:
        raise ValueError(f"its JSON is nested more than {MAX_META_DEPTH} deep")
    for key, lo, hi in (("format", 0, 1 << 20), ("step", 0, 10 ** 12), ("world_size", 1, 1 << 20),
                        ("threads", 1, 1 << 16)):
        if key in meta:
            need(integer(meta[key], lo, hi), key, f"an integer in [{lo}, {hi}]", meta[key])
    for key in ("sha256", "sizes"):
        for name, v in mapping(key).items():
            need(_FILE_NAME.fullmatch(name), f"{key} key", "a checkpoint file name (model_NNNNNN.pt, "
                 "optim_NNNNNN_rankR.pt)", name)
            if key == "sha256":
                need(isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v), f"sha256.{name}",
                     "64 hexadecimal digits", v)
            else:
                need(integer(v, 0, 1 << 50), f"sizes.{name}", "a byte count", v)
    config = mapping("model_config")
    for key, (lo, hi) in MODEL_CONFIG_LIMITS.items():
        if key in config:
            need(integer(config[key], lo, hi), f"model_config.{key}", f"an integer in [{lo}, {hi}]", config[key])
    if "window_pattern" in config:
        v = config["window_pattern"]
        need(isinstance(v, str) and 0 < len(v) <= 1024, "model_config.window_pattern", "a string of S and L", v)
    loop = mapping("loop")
    for key, v in loop.items():
        need(key in LOOP_KEYS, "loop key", " or ".join(LOOP_KEYS), key)
        need(number(v) and (key != "total_time" or v >= 0), f"loop.{key}", "a finite number", v)
    for key, v in mapping("lrs").items():
        need(number(v) and v >= 0, f"lrs.{key}", "a finite number >= 0", v)
    for key in ("user_config", "derived", "source", "record"):
        mapping(key)
    if "step" in mapping("record"):
        need(integer(meta["record"]["step"], 0, 10 ** 12), "record.step", "an integer", meta["record"]["step"])
    return meta
