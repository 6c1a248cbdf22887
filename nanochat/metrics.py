"""metrics.jsonl, next to a run's checkpoints: one JSON object per logged step, appended and
flushed at once; a torn last line (a killed run's) is cut off or skipped; a resumed run trims
the lines after its step (nanochat/run.py decides when)."""
import json
import os

from nanochat.common import read_jsonl
from nanochat.files import atomic_save


def metrics_path(ckpt_dir) -> str:
    return os.path.join(ckpt_dir, "metrics.jsonl")


def _drop_torn_tail(path) -> None:
    """A run killed while appending leaves a last line without its newline: cut it off, so the
    next record is not glued to it (and lost with it)."""
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            step = min(pos, 1 << 16)
            f.seek(pos - step)
            block = f.read(step)
            if pos == end and block.endswith(b"\n"):
                return  # intact
            nl = block.rfind(b"\n")
            if nl >= 0:
                f.truncate(pos - step + nl + 1)
                return
            pos -= step
        f.truncate(0)


def append_metrics(ckpt_dir, record: dict) -> None:
    """Append one JSON line (rank 0 only: the caller checks). Flushed at once so a crash loses
    at most the line being written."""
    os.makedirs(ckpt_dir, exist_ok=True)
    path = metrics_path(ckpt_dir)
    if os.path.exists(path):
        _drop_torn_tail(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_metrics(ckpt_dir) -> list[dict]:
    """The records of metrics.jsonl; a torn or garbled line (a killed run's last) is skipped."""
    path = metrics_path(ckpt_dir)
    return read_jsonl(path) if os.path.exists(path) else []


def trim_metrics(ckpt_dir, last_step: int) -> None:
    """On resume from `last_step`: drop the lines of steps after it (logged by the interrupted
    run after its last checkpoint), which the resumed run will log again, and any torn line."""
    path = metrics_path(ckpt_dir)
    if not os.path.exists(path):
        return
    kept = [r for r in read_metrics(ckpt_dir)
            if isinstance(r.get("step"), int) and not isinstance(r["step"], bool) and r["step"] <= last_step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    atomic_save(text.encode("utf-8"), path, lambda data, f: f.write(data))
