"""
Sandboxed execution of model-written Python (HumanEval).

execute_code(code) runs the program in a separate Python process and returns an
ExecutionResult. The layers, outermost first (what each does and does not stop is written up in
docs/tools.md):

- a child process of the same interpreter in isolated mode (-I: no PYTHON* variables, no user
  site, no current directory on sys.path), in its own session/process group, in a fresh temporary
  directory that is removed afterwards, with a scrubbed environment (PATH, LANG, HOME=TMPDIR=that
  directory, nothing else);
- a wall-clock timeout enforced by the parent, which then SIGKILLs the whole process group (and,
  when running as root, every process of the sandbox's private uid, see below);
- resource limits set in the child before the program runs: address space (memory), CPU
  seconds, size of written files, open files, processes, no core dumps;
- when the parent runs as root: the child drops to a fresh, random, unprivileged uid/gid that
  owns nothing on the machine, so file permissions stop it from deleting or writing the
  caller's files, RLIMIT_NPROC (which root ignores) caps its processes, it cannot signal other
  users' processes, and on cleanup everything running under that uid is killed;
- stdout/stderr read incrementally by the parent and capped at max_output_bytes (the child is
  killed when it goes over), so a flood of output never fills the caller's memory;
- inside the child, as a second line of defence (Python-level, bypassable by determined code):
  process creation, killing, deleting/renaming/chmod-ing files, changing directory and a few
  modules (ctypes, subprocess internals, resource, psutil, ...) are disabled, and open() refuses
  to write outside the working directory.

No `signal.alarm`, no preexec_fn: this is called from server and evaluation threads, so the
parent only uses thread-safe subprocess features; the limits are applied by the child itself.
"""

import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_MEMORY_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_OUTPUT_BYTES = 128 * 1024      # per stream
DEFAULT_MAX_FILE_BYTES = 16 * 1024 * 1024  # largest file the program may write
DEFAULT_MAX_PROCESSES = 32                 # RLIMIT_NPROC; effective under the private uid only

# Modules the program may want that are imported before the child drops privileges (the
# interpreter's standard library may be unreadable to the sandbox uid, e.g. under /root): all
# the imports HumanEval's prompts, solutions and tests use, plus common relatives.
PRELOAD_MODULES = (
    "typing", "math", "cmath", "random", "copy", "string", "collections", "collections.abc",
    "re", "hashlib", "itertools", "functools", "operator", "heapq", "bisect", "statistics",
    "fractions", "decimal", "numbers", "json", "datetime", "time", "array", "dataclasses",
    "enum", "textwrap", "unicodedata", "struct", "base64", "io", "pathlib", "tempfile",
)

# Run by the child interpreter (python -I -B -c CHILD CONFIG_JSON), in the working directory.
_CHILD = r'''
import sys, os, json, resource
cfg = json.loads(sys.argv[1])

def _limit(which, n):
    resource.setrlimit(which, (n, n))

_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_CPU, cfg["cpu_s"])
_limit(resource.RLIMIT_FSIZE, cfg["max_file_bytes"])
_limit(resource.RLIMIT_NOFILE, 64)
_limit(resource.RLIMIT_NPROC, cfg["max_processes"])
for _m in cfg["preload"]:
    try:
        __import__(_m)
    except Exception:
        pass
import builtins, io, shutil, subprocess, posix
with open("program.py", encoding="utf-8") as _f:
    _source = _f.read()
_root = os.path.realpath(os.getcwd())
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])  # any failure here stops the run: never continue as root by accident
_limit(resource.RLIMIT_AS, cfg["max_memory_bytes"])

if cfg["python_guards"]:
    for _name in ("system", "popen", "fork", "forkpty", "vfork", "register_at_fork",
                  "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
                  "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp",
                  "spawnlpe", "posix_spawn", "posix_spawnp",
                  "kill", "killpg", "setsid", "setpgid", "setpgrp", "setuid", "seteuid",
                  "setreuid", "setresuid", "setgid", "setegid", "setregid", "setresgid",
                  "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace",
                  "truncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown",
                  "chflags", "lchflags", "chroot", "chdir", "fchdir", "link", "symlink",
                  "mkfifo", "mknod"):
        for _mod in (os, posix):
            if hasattr(_mod, _name):
                setattr(_mod, _name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = subprocess.run = subprocess.call = None
    subprocess.check_call = subprocess.check_output = None
    subprocess.getoutput = subprocess.getstatusoutput = None
    for _m in ("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "resource",
               "psutil", "pty", "signal", "_signal", "socket", "_socket", "tkinter", "ipdb", "joblib"):
        sys.modules[_m] = None
    builtins.exit = builtins.quit = builtins.help = None

    _real_open = io.open

    def _guarded_open(file, mode="r", *args, **kwargs):
        # writing is allowed inside the working directory only; reading is not restricted
        if not isinstance(file, int) and any(c in mode for c in "wax+"):
            path = os.path.realpath(os.fsdecode(os.fspath(file)))
            if os.path.commonpath([path, _root]) != _root:
                raise PermissionError(f"sandbox: writing outside the working directory: {file!r}")
        return _real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = _guarded_open

del cfg, _limit, _f
_globals = {"__name__": "__main__", "__builtins__": builtins}
exec(compile(_source, "program.py", "exec"), _globals)
'''


@dataclass
class ExecutionResult:
    success: bool            # exited with status 0, in time, output within the cap
    stdout: str
    stderr: str
    error: str | None = None  # one line: the exception, "timed out after 2.0s", ...
    timed_out: bool = False
    memory_exceeded: bool = False
    output_truncated: bool = False
    returncode: int | None = None


def _processes_of_uid(uid):
    """Live (non-zombie) pids whose real uid is `uid`, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("State", "").strip().startswith(("Z", "X")):
            continue
        uids = fields.get("Uid", "").split()
        if uids and int(uids[0]) == uid:
            pids.append(int(entry))
    return pids


def _kill_everything(proc, uid):
    """SIGKILL the child's process group and, under a private uid, every process of that uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the child's pid
    except (ProcessLookupError, PermissionError):
        pass
    if uid is None:
        return
    for attempt in range(20):
        pids = _processes_of_uid(uid)
        if not pids:
            return
        if attempt == 0 and shutil.which("kill"):
            # kill(-1) as that uid reaches all of its processes in one atomic sweep, so a fork
            # bomb that escaped the process group (setsid) cannot outrun it
            subprocess.run(["kill", "-9", "-1"], user=uid, group=uid, extra_groups=[],
                           env={"PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, cwd="/")
            continue
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _private_uid():
    """A uid no process is using, for this one run; None when the caller is not root.

    Drawn with `secrets` (not `random`, which callers seed: two evaluation processes with the
    same seed would otherwise share a uid and kill each other's programs) from 2**31..2**32-2,
    a range Linux accepts but systemd reserves as unused, so no user, service or container owns
    it. Checked against /proc, because cleanup kills every process running under it.
    """
    if os.geteuid() != 0:
        return None
    for _ in range(10):
        uid = 2**31 + secrets.randbelow(2**31 - 2)
        if not _processes_of_uid(uid):
            return uid
    return None


def _last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def execute_code(code, timeout=DEFAULT_TIMEOUT_S, max_memory_bytes=DEFAULT_MAX_MEMORY_BYTES,
                 max_output_bytes=DEFAULT_MAX_OUTPUT_BYTES, max_file_bytes=DEFAULT_MAX_FILE_BYTES,
                 max_processes=DEFAULT_MAX_PROCESSES, python_guards=True):
    """
    Run `code` (a Python program) in the sandbox and return an ExecutionResult.
    python_guards=False leaves out the in-process Python-level guards, so that tests can show
    the OS-level layers hold on their own; keep it True for real use.
    """
    uid = _private_uid()
    workdir = tempfile.mkdtemp(prefix="nanochat_exec_")
    proc = None
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if uid is not None:
            try:
                os.chown(workdir, uid, uid)
            except OSError:
                # e.g. a user namespace that maps only a few uids: run without the private uid
                uid = None
        config = {
            "uid": uid, "max_memory_bytes": int(max_memory_bytes),
            "cpu_s": int(math.ceil(timeout)) + 1,  # backstop for the wall-clock timeout
            "max_file_bytes": int(max_file_bytes), "max_processes": int(max_processes),
            "preload": list(PRELOAD_MODULES), "python_guards": bool(python_guards),
        }
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "HOME": workdir, "TMPDIR": workdir, "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", _CHILD, json.dumps(config)],
                                cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, close_fds=True)
        buffers = {"stdout": bytearray(), "stderr": bytearray()}
        timed_out = truncated = exited_swept = False
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
            sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
            while sel.get_map():
                remaining = start + timeout - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                for key, _ in sel.select(min(remaining, 0.1)):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    buf = buffers[key.data]
                    room = max_output_bytes - len(buf)
                    buf += chunk[:room]
                    if len(chunk) > room:
                        truncated = True
                if truncated:
                    break
                if not exited_swept and proc.poll() is not None:
                    # the program is done; anything it left running (and holding our pipes
                    # open) goes now, so the remaining output drains to EOF at once
                    _kill_everything(proc, uid)
                    exited_swept = True
        if not (timed_out or truncated or exited_swept):
            # both pipes closed but the program may still be running: give it the rest of its time
            try:
                proc.wait(timeout=max(0.0, start + timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
        if not exited_swept:
            _kill_everything(proc, uid)
        returncode = proc.wait()
        stdout = buffers["stdout"].decode("utf-8", errors="replace")
        stderr = buffers["stderr"].decode("utf-8", errors="replace")
        last = _last_line(stderr)
        memory_exceeded = last.startswith("MemoryError") or "Cannot allocate memory" in last
        if timed_out:
            error = f"timed out after {timeout:g}s"
        elif truncated:
            error = f"output exceeded {max_output_bytes} bytes"
        elif returncode < 0:
            error = f"killed by {signal.Signals(-returncode).name}"
            if -returncode == signal.SIGXCPU:
                error += " (CPU time limit)"
            elif -returncode == signal.SIGXFSZ:
                error += " (file size limit)"
        elif returncode != 0:
            error = last or f"exit status {returncode}"
        else:
            error = None
        success = returncode == 0 and not timed_out and not truncated
        return ExecutionResult(success=success, stdout=stdout, stderr=stderr, error=error,
                               timed_out=timed_out, memory_exceeded=memory_exceeded,
                               output_truncated=truncated, returncode=returncode)
    finally:
        if proc is not None:
            if proc.poll() is None:
                _kill_everything(proc, uid)
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        shutil.rmtree(workdir, ignore_errors=True)
