"""The report card: every stage appends a section, `nanochat report generate` assembles report.md.

Files live in $NANOCHAT_BASE_DIR/report/: header.md (written by `report reset`), one
<section-slug>.md + <section-slug>.json per stage (the .json keeps the numbers for the summary
table), and the assembled report.md with its pictures (PNG files, also embedded in report.md as
data URIs so the copy in the current directory is one self-contained file).
"""
import base64
import datetime
import glob
import io
import json
import os
import platform
import re
import shutil
import subprocess
import time

import psutil
import torch

from nanochat.metrics import read_metrics
from nanochat.common import atomic_write_text, compute_dtype_choice, get_base_dir, get_dist_info

# The order sections appear in report.md; unknown sections go after these, by time written.
SECTION_ORDER = [
    "Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model evaluation",
    "Chat evaluation base", "Midtraining", "Chat evaluation mid", "Chat SFT", "Chat evaluation sft",
    "Chat RL", "Chat evaluation rl", "Scaling laws", "Miniseries",
]
SUMMARY_ROWS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"]
# where a cell of the summary table comes from (default: the stage's chat evaluation)
SUMMARY_SECTIONS = {("CORE", "base"): "Base model evaluation"}
STAGES = ["base", "mid", "sft", "rl"]

# Rough on-demand cloud prices in USD per GPU-hour, for the cost estimate in the header.
GPU_HOURLY_USD = [("h200", 3.8), ("h100", 3.0), ("a100", 1.8), ("l40s", 1.0), ("a10", 0.8), ("l4", 0.6),
                  ("4090", 0.5), ("3090", 0.3), ("t4", 0.35), ("v100", 1.0)]

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def bloat() -> dict:
    """Size of the project's own code, and its dependency count."""
    files, lines, chars = 0, 0, 0
    for pattern in ["nanochat/**/*.py", "nanochat/*.html", "tasks/**/*.py", "runs/*.sh", "bench/*.py"]:
        for path in glob.glob(os.path.join(REPO_DIR, pattern), recursive=True):
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            files += 1
            lines += text.count("\n")
            chars += len(text)
    deps = 0
    try:
        import tomllib  # Python 3.11+; without it the count is left at 0
        with open(os.path.join(REPO_DIR, "pyproject.toml"), "rb") as f:
            deps = len(tomllib.load(f)["project"]["dependencies"])
    except Exception:
        pass
    return {"files": files, "lines": lines, "characters": chars, "dependencies": deps}


def _dtype_line() -> str:
    dtype, why = compute_dtype_choice("cuda" if torch.cuda.is_available() else "cpu")
    return f"{str(dtype).replace('torch.', '')} ({why})"


def environment() -> dict:
    env = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "git commit": (_git("rev-parse", "--short", "HEAD") or "unknown"),
        "git dirty": bool(_git("status", "--porcelain")),
        "platform": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "CPU cores": os.cpu_count(),
        "RAM (GiB)": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "CUDA": torch.version.cuda or "none",
        "compute dtype": _dtype_line(),
    }
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        name = torch.cuda.get_device_name(0)
        mem = torch.cuda.get_device_properties(0).total_memory / 2**30
        env["GPUs"] = f"{n} x {name} ({mem:.0f} GiB each)"
        price = next((p for k, p in GPU_HOURLY_USD if k in name.lower()), None)
        env["estimated cost per hour (USD)"] = round(price * n, 2) if price else "unknown GPU price"
    else:
        env["GPUs"] = "none"
        env["estimated cost per hour (USD)"] = 0
    return env


class Report:
    def __init__(self, directory: str):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)

    def log(self, section: str, data) -> str:
        """Append (overwrite) a stage's section. `data` is a list of dicts (rendered as bullets) and
        strings (rendered as-is), or one dict. Numbers are also saved to <slug>.json."""
        if isinstance(data, dict):
            data = [data]
        lines = [f"## {section}", f"timestamp: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}", ""]
        numbers = {}
        for item in data:
            if isinstance(item, dict):
                for k, v in item.items():
                    lines.append(f"- {k}: {_fmt(v)}")
                    if isinstance(v, (int, float, str, bool)) or v is None:
                        numbers[k] = v
            else:
                lines.append(str(item))
            lines.append("")
        slug = slugify(section)
        atomic_write_text(os.path.join(self.dir, f"{slug}.md"), "\n".join(lines) + "\n")
        atomic_write_text(os.path.join(self.dir, f"{slug}.json"),
                          json.dumps({"section": section, "time": time.time(), "data": numbers}, indent=1))
        return os.path.join(self.dir, f"{slug}.md")

    def reset(self) -> str:
        for path in glob.glob(os.path.join(self.dir, "*")):
            if os.path.isfile(path):
                os.remove(path)
        env = environment()
        size = bloat()
        lines = ["# nanochat report card", "", f"Generated from a run started {env['date']}.", "",
                 "## Environment", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in env.items()]
        lines += ["", "## Bloat", ""] + [f"- {k}: {_fmt(v)}" for k, v in size.items()] + [""]
        atomic_write_text(os.path.join(self.dir, "header.md"), "\n".join(lines) + "\n")
        atomic_write_text(os.path.join(self.dir, "header.json"), json.dumps({"start_time": time.time(), **env}))
        return os.path.join(self.dir, "header.md")

    def sections(self) -> list[dict]:
        out = []
        for path in glob.glob(os.path.join(self.dir, "*.json")):
            if os.path.basename(path) == "header.json":
                continue
            with open(path) as f:
                meta = json.load(f)
            meta["slug"] = os.path.basename(path)[:-5]
            out.append(meta)
        rank = {name: i for i, name in enumerate(SECTION_ORDER)}
        return sorted(out, key=lambda m: (rank.get(m["section"], len(SECTION_ORDER)), m["time"]))

    def summary_table(self, sections) -> str:
        by_name = {s["section"]: s["data"] for s in sections}
        rows = []
        for metric in SUMMARY_ROWS:
            cells = []
            for stage in STAGES:
                section = SUMMARY_SECTIONS.get((metric, stage), f"Chat evaluation {stage}")
                value = by_name.get(section, {}).get(metric)
                cells.append("-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value)))
            rows.append(f"| {metric} | " + " | ".join(cells) + " |")
        head = "| Metric | " + " | ".join(s.upper() for s in STAGES) + " |\n|---|" + "---|" * len(STAGES)
        return head + "\n" + "\n".join(rows)

    def generate(self, copy_to: str | None = ".") -> str:
        header_path = os.path.join(self.dir, "header.md")
        parts = []
        start = None
        if os.path.exists(header_path):
            with open(header_path) as f:
                parts.append(f.read())
            with open(os.path.join(self.dir, "header.json")) as f:
                start = json.load(f).get("start_time")
        else:
            parts.append("# nanochat report card\n\n(no header: run `nanochat report reset` at the start of a run)\n")
        sections = self.sections()
        for s in sections:
            with open(os.path.join(self.dir, s["slug"] + ".md")) as f:
                parts.append(f.read())
        parts.append("## Summary\n\n" + self.summary_table(sections) + "\n")
        if start is not None and sections:
            total = max(s["time"] for s in sections) - start
            hours, minutes = int(total // 3600), int(total % 3600 // 60)
            parts.append(f"Total wall clock time: {hours}h{minutes:02d}m ({total:,.0f}s)\n")
        pictures = plot_metrics(self.dir)
        if pictures:
            parts.append("## Training curves\n")
            for title, path in pictures:
                with open(path, "rb") as f:
                    b64 = base64.b64encode(f.read()).decode()
                parts.append(f"### {title}\n\n![{title}](data:image/png;base64,{b64})\n")
        text = "\n".join(parts)
        out = os.path.join(self.dir, "report.md")
        atomic_write_text(out, text)
        if copy_to:
            shutil.copyfile(out, os.path.join(copy_to, "report.md"))
        return out


def latest_metrics_files(base_dir: str | None = None) -> dict:
    """{stage: path of the most recently written metrics.jsonl under checkpoints/<stage>/*/}."""
    base_dir = base_dir or get_base_dir()
    found = {}
    for stage in STAGES:
        paths = glob.glob(os.path.join(base_dir, "checkpoints", stage, "*", "metrics.jsonl"))
        if paths:
            found[stage] = max(paths, key=os.path.getmtime)
    return found


def plot_metrics(out_dir: str, base_dir: str | None = None) -> list[tuple[str, str]]:
    """Draw training loss and validation curves per stage from metrics.jsonl. Returns [(title, png)]."""
    files = latest_metrics_files(base_dir)
    if not files:
        return []
    import matplotlib  # here, not at the top: pyplot takes seconds to import and only `report generate` draws
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pictures = []
    for key, title, ylabel in [("loss", "Training loss", "loss"), ("val_bpb", "Validation bits per byte", "bpb"),
                               ("val_loss", "Validation loss", "loss"), ("reward", "RL mean reward", "reward")]:
        series = {}
        for stage, path in files.items():
            pts = [(r["step"], r[key]) for r in read_metrics(os.path.dirname(path))
                   if r.get(key) is not None and "step" in r]
            if pts:
                series[stage] = pts
        if not series:
            continue
        fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2), squeeze=False)
        for ax, (stage, pts) in zip(axes[0], series.items()):
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
            ax.set_title(stage.upper())
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        fig.suptitle(title)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{key}.png")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        pictures.append((title, path))
    return pictures


def png_markdown(title: str, path: str) -> str:
    """A picture as a markdown image with a data URI, so report.md stays one self-contained file."""
    with open(path, "rb") as f:
        return f"### {title}\n\n![{title}](data:image/png;base64,{base64.b64encode(f.read()).decode()})\n"


def report_exists() -> bool:
    """Has a report been started (`nanochat report reset`)? Sweeps add their section only then."""
    return os.path.exists(os.path.join(get_base_dir(), "report", "header.md"))


class DummyReport:
    def log(self, *args, **kwargs):
        pass

    def reset(self, *args, **kwargs):
        pass


def get_report():
    """The report of $NANOCHAT_BASE_DIR/report (a no-op on ranks other than 0)."""
    if get_dist_info()[1] != 0:
        return DummyReport()
    return Report(os.path.join(get_base_dir(), "report"))
