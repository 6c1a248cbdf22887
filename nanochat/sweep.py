"""Sweeps of real `train base` runs for `nanochat scaling run|series` (docs/scaling.md).

The sweep is one driver process. Each run is a subprocess, `python -m nanochat train base ...`
(or `torchrun --standalone --nproc_per_node=N -m nanochat train base ...`), with its own base dir
OUT/runs/<name>/ (checkpoints, metrics.jsonl, its report section) whose tokenizer/ is a link to
OUT/tokenizer: the user's checkpoints and report card are never touched, and every run of a sweep
sees the same tokenizer. After a run its row goes into the CSV (the whole file rewritten
atomically: a kill never tears or loses a row), then its weights are deleted unless kept;
metrics.jsonl, the last meta file and the log stay.

Resuming is running the same command again: a run with a row is skipped (a failed one too,
unless --retry-failed), a run that finished but has no row yet is read back, a run with an
intermediate checkpoint (train base flag --save-every) continues with --resume, and any other
run starts over (train base clears its folder).
"""
import argparse
import ast
import ctypes
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import torch
from filelock import FileLock, Timeout

from nanochat import checkpoint as ck
from nanochat.common import UserError, get_base_dir
from nanochat.gpt import GPT, GPTConfig
from nanochat.metrics import read_metrics
from nanochat.scaling import EXTRA_COLUMNS, read_csv, write_csv

# set by torchrun; a child must not inherit them (it would join the sweep's process group)
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                 "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
                 "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")
STEP_RE = re.compile(r"^step (\d+)/(\d+)")
UPSTREAM_EVAL_TOKENS = 100 * 2 ** 19  # upstream's final evaluation: ~52M val tokens
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of one H100 SXM (as train base's on-paper time)
H100_HOURLY_USD = 3.0  # on-demand price per GPU-hour, roughly (the report card's figure)


# ---------------------------------------------------------------------------
# What `scaling run` and `scaling series` share: flags, the plan, OUT and its lock

def add_sweep_flags(p: argparse.ArgumentParser, what):
    p.add_argument("--out", default=None, help=f"folder of the CSV, pictures and run logs (default: $NANOCHAT_BASE_DIR/scaling/{what})")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes per run: > 1 runs each under torchrun (default 1, or torchrun's when the sweep is started by it)")
    p.add_argument("--eval-tokens", type=int, default=None, help=f"val tokens of the final bpb (default {UPSTREAM_EVAL_TOKENS:,})")
    p.add_argument("--no-core", action="store_true", help="skip CORE at the end of each run")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="train a private tokenizer of this size for the sweep (default: copy $NANOCHAT_BASE_DIR/tokenizer)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's final weights (default: deleted after its row)")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs recorded as failed")
    p.add_argument("--assumed-mfu", type=float, default=0.5, help="MFU for the plan's time on 8xH100 (default 0.5)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (runs, FLOPs, time and cost on 8xH100) and exit")


def split_argv(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    return (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])


def number_list(text, kind, flag):
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be a comma-separated list of numbers, not {text!r}")
    if not values or any(v <= 0 for v in values):
        raise UserError(f"{flag} must list positive numbers, not {text!r}")
    if len(set(values)) != len(values):
        raise UserError(f"{flag} lists a value twice: {text!r}")
    return values


def print_plan(prog, runs, assumed_mfu):
    total = sum(r["flops"] for r in runs)
    hours = total / (8 * H100_BF16_PEAK * assumed_mfu) / 3600
    print(f"{prog}: {len(runs)} runs, {total:.3g} FLOPs in all = {hours:.2f} h on 8xH100 at {assumed_mfu:.0%} MFU "
          f"(~${hours * 8 * H100_HOURLY_USD:,.0f} at ${H100_HOURLY_USD:g}/GPU-hour), plus start-up and evaluation")


def open_sweep(args, what):
    """Common set-up: the driver check, OUT, its lock and tokenizer. Returns (out, nproc, lock) or
    None on a torchrun rank that does not drive."""
    driver, local = torchrun_driver()
    if not driver:
        return None
    nproc = args.nproc_per_node or local
    if nproc < 1:
        raise UserError(f"--nproc-per-node must be >= 1, not {nproc}")
    out = os.path.abspath(args.out or os.path.join(get_base_dir(), "scaling", what))
    os.makedirs(out, exist_ok=True)
    lock = FileLock(os.path.join(out, ".sweep.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"another sweep is running in {out}")
    if not args.dry_run:
        prepare_tokenizer(out, os.path.join(get_base_dir(), "tokenizer"), args.vocab_size)
    return out, nproc, lock


def format_time(s):
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def torchrun_driver():
    """Under torchrun, rank 0 drives the sweep (its children use the node's processes) and the
    other ranks have nothing to do: (is this process the driver, processes on this node)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return True, 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local != world:
        raise UserError("a sweep runs on one node: start it on one node (nanochat scaling run --nproc-per-node N)")
    return int(os.environ.get("RANK", "0")) == 0, local


def child_env():
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["NANOCHAT_DATA"] = os.environ.get("NANOCHAT_DATA") or os.path.join(
        os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat"), "data")
    env["PYTHONUNBUFFERED"] = "1"  # its step lines reach our progress line as they are printed
    return env


def train_command(nproc):
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "nanochat", "train", "base"]
    return [sys.executable, "-m", "nanochat", "train", "base"]


def _die_with_parent():
    """A child that outlives a killed sweep would write into the run the next sweep restarts."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def prepare_tokenizer(out, user_tokenizer, vocab_size=None, max_chars=5_000_000):
    """OUT/tokenizer: a copy of the user's (made once), or with vocab_size a private tokenizer of
    that size trained on max_chars characters of the pretraining shards."""
    dest = os.path.join(out, "tokenizer")
    if os.path.exists(os.path.join(dest, "token_bytes.pt")):
        return dest
    if vocab_size:
        cmd = [sys.executable, "-m", "nanochat", "tokenizer", "train", "--vocab-size", str(vocab_size),
               "--max-chars", str(max_chars), "--out", dest]
        r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True)
        if r.returncode:
            raise UserError(f"training the sweep's tokenizer failed: {(r.stderr or r.stdout).strip().splitlines()[-1]}")
        return dest
    if not os.path.exists(os.path.join(user_tokenizer, "token_bytes.pt")):
        raise UserError(f"no tokenizer in {user_tokenizer}: run `nanochat tokenizer train` first (or give --vocab-size)")
    shutil.copytree(user_tokenizer, dest + ".tmp", dirs_exist_ok=True)
    os.replace(dest + ".tmp", dest)
    return dest


def dry_run(flags, out):
    """train base's derived configuration for `flags` (its --dry-run prints it last), with the
    sweep's tokenizer when OUT has one (else the user's, or the default vocabulary)."""
    env = child_env()
    if os.path.exists(os.path.join(out, "tokenizer", "token_bytes.pt")):
        env["NANOCHAT_BASE_DIR"] = out
    r = subprocess.run(train_command(1) + flags + ["--dry-run"], env=env, capture_output=True, text=True)
    if r.returncode:
        raise UserError(f"train base {' '.join(flags)} --dry-run: {(r.stderr or r.stdout).strip().splitlines()[-1]}")
    return ast.literal_eval(r.stdout.strip().splitlines()[-1])


class Progress:
    """One line for the whole sweep: run i of n, share of the FLOPs done, ETA from the rate of
    FLOPs this session (a TTY gets it rewritten in place, a log a line per run and minute)."""

    def __init__(self, prog, total_flops, done_flops, n):
        self.prog, self.total, self.done, self.n = prog, total_flops, done_flops, n
        self.start_done, self.t0, self.last_print = done_flops, time.time(), 0.0
        self.tty = sys.stdout.isatty()

    def show(self, i, label, partial=0.0, force=False):
        done = self.done + partial
        elapsed = time.time() - self.t0
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0
        eta = format_time((self.total - done) / rate) if rate > 0 else "?"
        line = (f"{self.prog}: run {i}/{self.n} {label} | {100 * done / max(self.total, 1):.1f}% of {self.total:.3g} FLOPs "
                f"| elapsed {format_time(elapsed)} | ETA {eta}")
        if self.tty:
            print("\r" + line.ljust(110), end="", flush=True)
        elif force or time.time() - self.last_print > 60:
            print(line, flush=True)
            self.last_print = time.time()


def run_results(ckpt_dir):
    """What a finished run wrote: (meta of its last step, metrics records). None if unfinished."""
    steps = ck.complete_steps(ckpt_dir)
    if not steps:
        return None
    meta = ck.load_meta(ckpt_dir, steps[-1], require=("model_config", "derived"))
    if steps[-1] != meta["derived"]["num_iterations"]:
        return None
    return meta, read_metrics(ckpt_dir)


def param_counts(model_config):
    """GPT.num_params_by_category() of a run's model, built on the meta device (no memory)."""
    with torch.device("meta"):
        return GPT(GPTConfig(**model_config)).num_params_by_category()


def last_value(records, key):
    vals = [r[key] for r in records if r.get(key) is not None]
    return vals[-1] if vals else None


def cpu_seconds():
    """CPU time of the finished children (theirs included): what a run cost, whatever the load."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def remove_weights(ckpt_dir):
    for name in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
        if name.startswith(("model_", "optim_")) and name.endswith(".pt"):
            os.remove(os.path.join(ckpt_dir, name))


def launch(run, out, nproc, progress, i, label):
    """Run one `train base` subprocess to the end, its output into OUT/runs/<name>/train.log.
    Returns (exit code, last line of output)."""
    base = os.path.join(out, "runs", run["name"])
    ckpt_dir = os.path.join(base, "checkpoints", "base", run["name"])
    os.makedirs(base, exist_ok=True)
    link = os.path.join(base, "tokenizer")
    if not os.path.lexists(link):
        os.symlink(os.path.join("..", "..", "tokenizer"), link)
    flags = list(run["flags"]) + ["--model-tag", run["name"]]
    if ck.complete_steps(ckpt_dir):
        flags.append("--resume")  # an intermediate checkpoint of an earlier attempt (--save-every)
    env = dict(child_env(), NANOCHAT_BASE_DIR=os.path.abspath(base))
    last = ""
    with open(os.path.join(base, "train.log"), "a", buffering=1) as log:  # line by line: a killed sweep loses none
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(train_command(nproc) + flags)}\n")
        log.flush()
        child = subprocess.Popen(train_command(nproc) + flags, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, bufsize=1, preexec_fn=_die_with_parent if os.name == "posix" else None)
        try:
            for line in child.stdout:
                log.write(line)
                if line.strip():
                    last = line.strip()
                m = STEP_RE.match(line)
                if m and int(m.group(2)) > 0:
                    progress.show(i, label, run["flops"] * int(m.group(1)) / int(m.group(2)))
            rc = child.wait()
        except BaseException:
            child.terminate()
            child.wait()
            raise
    return rc, last


def sweep(runs, out, csv_path, columns, make_row, nproc=1, keep_checkpoints=False, retry_failed=False,
          prog="nanochat scaling"):
    """Run what `runs` ([{name, flags, flops, label, row}], in order) lacks in the CSV. make_row(run,
    meta, records) -> the CSV cells of a finished run. Returns the CSV's rows."""
    columns = columns + EXTRA_COLUMNS
    rows = read_csv(csv_path, columns[:-len(EXTRA_COLUMNS)]) if os.path.exists(csv_path) and os.path.getsize(csv_path) else []
    for r in rows:
        r.pop("_line", None)
    if retry_failed:  # their rows go when the CSV is next written, replaced by the new attempts'
        rows = [r for r in rows if r.get("status") != "failed"]
    done = {r.get("run") for r in rows}
    for r in rows:  # a kill between a row and the clean-up leaves weights behind
        if not keep_checkpoints and r.get("run"):
            remove_weights(os.path.join(out, "runs", r["run"], "checkpoints", "base", r["run"]))
    todo = [r for r in runs if r["name"] not in done]
    total = sum(r["flops"] for r in runs)
    progress = Progress(prog, total, total - sum(r["flops"] for r in todo), len(runs))
    if not todo:
        print(f"{prog}: all {len(runs)} runs are in {csv_path}")
    for run in todo:
        i = runs.index(run) + 1
        progress.show(i, run["label"], force=True)
        ckpt_dir = os.path.join(out, "runs", run["name"], "checkpoints", "base", run["name"])
        t0, cpu0 = time.time(), cpu_seconds()
        finished = run_results(ckpt_dir)
        rc, last = (0, "") if finished else launch(run, out, nproc, progress, i, run["label"])
        finished = finished or (run_results(ckpt_dir) if rc == 0 else None)
        if finished:
            row = dict(run["row"], **make_row(run, *finished), status="ok", run=run["name"],
                       wall_time_sec=round(time.time() - t0, 1), cpu_time_sec=round(cpu_seconds() - cpu0, 1))
        else:
            why = last if rc else "finished without its final checkpoint"
            row = dict(run["row"], status="failed", run=run["name"], wall_time_sec=round(time.time() - t0, 1),
                       cpu_time_sec=round(cpu_seconds() - cpu0, 1), error=why[:300])
            print(("\n" if progress.tty else "") + f"{prog}: run {run['name']} failed (exit {rc}): {why[:200]} "
                  f"(log: {os.path.join(out, 'runs', run['name'], 'train.log')})", flush=True)
        rows.append(row)
        write_csv(csv_path, columns, rows)
        if not keep_checkpoints:
            remove_weights(ckpt_dir)
        progress.done += run["flops"]
        progress.show(i, run["label"] + (" done" if finished else " FAILED"), force=True)
    if progress.tty:
        print()
    ok = sum(1 for r in rows if r.get("status", "ok") == "ok")
    print(f"{prog}: {ok} of {len(runs)} runs finished, {len(rows) - ok} failed; CSV {csv_path}")
    return rows
