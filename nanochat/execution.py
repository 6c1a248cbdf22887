"""
Sandboxed execution of model-written Python (HumanEval).

execute_code(code) runs a program in the sandbox and returns an ExecutionResult.
check_solution(program, test, entry_point) grades a HumanEval completion: the completion runs in
the sandbox, the task's test runs in a second, separate checker process, and the verdict is the
checker's alone (see "Grading" below). What each layer does and does not stop is written up in
docs/tools.md. The layers, outermost first:

- a child process of the same interpreter in isolated mode (-I: no PYTHON* variables, no user
  site, no current directory on sys.path), in its own session/process group, in a fresh private
  working directory (HOME and TMPDIR point there) that is removed afterwards, whatever the program
  did to it (any depth, any permissions), with a scrubbed environment;
- no network: the child runs in a network namespace of its own (`unshare --net`; as a normal user
  `unshare --user --map-current-user --net`) whenever the machine allows it; it has no interface
  but a loopback that is down, so not even 127.0.0.1 is reachable;
- Landlock where the kernel has it: the child confines itself before anything else (then execs
  a fresh image), so the kernel refuses reads of /proc and any change to the file system outside
  the working directory, whatever Python function asks (links such as /dev/fd resolved);
- a wall-clock timeout enforced by the parent, which then SIGKILLs the whole process group (and,
  when running as root, every process of the sandbox's private uid, see below);
- resource limits set in the child before the program runs: address space (memory), CPU
  seconds, size of written files, open files, processes, no core dumps;
- when the parent runs as root: the child drops to a fresh, random, unprivileged uid/gid that
  owns nothing on the machine, so file permissions stop it from deleting or writing the
  caller's files, RLIMIT_NPROC (which root ignores) caps its processes, it cannot signal other
  users' processes, and on cleanup everything running under that uid is killed and every file it
  left in the world-writable temp folders (/tmp, /var/tmp, /dev/shm) is deleted;
- stdout/stderr read incrementally by the parent and capped at max_output_bytes (the child is
  killed when it goes over), so a flood of output never fills the caller's memory;
- inside the child, an audit hook (sys.addaudithook: checked by the interpreter itself on every
  audited operation, and it cannot be removed from Python code) refuses process creation and
  signals, sockets, ctypes, writes and creations outside the working directory, opening /proc,
  chdir/chmod/links, tracing, the gc's object walks, code-object and marshal construction, and
  imports beyond the standard library (minus ctypes, socket, subprocess, ... ); the handful of
  process functions it does not see (setsid, setuid, mknod, ...) are removed from os/posix, and
  _imp.create_builtin with them (a fresh posix would have them back).

Grading (check_solution): the completion's code runs in the sandbox and serves calls of its
entry point over two pipes; the test's check(candidate) runs in the checker, a separate process
that never runs model code: `candidate` there sends the arguments over the pipe and gets back
plain data (None, bool, int, float, complex, str, bytes, and lists, tuples, sets, frozensets and
dicts of them) decoded by the checker itself, so a returned object cannot compare equal to
anything by overriding __eq__, and nothing the completion prints, registers with atexit, or
does on exit reaches the verdict: it is the checker's exit status plus a line holding a random
per-run nonce that only the parent and the checker know.

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
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_MEMORY_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_OUTPUT_BYTES = 128 * 1024      # per stream
DEFAULT_MAX_FILE_BYTES = 16 * 1024 * 1024  # largest file the program may write
DEFAULT_MAX_PROCESSES = 32                 # RLIMIT_NPROC; effective under the private uid only
DEFAULT_MAX_CREATED = 64                   # files + directories the program may create (audit hook)
MAX_REPLY_BYTES = 8 * 1024 * 1024          # one candidate return value, encoded
TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # world-writable: swept for the private uid's leftovers

# Modules the program may want that are imported before the child drops privileges (the
# interpreter's standard library may be unreadable to the sandbox uid, e.g. under /root): all
# the imports HumanEval's prompts, solutions and tests use, plus common relatives.
PRELOAD_MODULES = (
    "typing", "math", "cmath", "random", "copy", "string", "collections", "collections.abc",
    "re", "hashlib", "itertools", "functools", "operator", "heapq", "bisect", "statistics",
    "fractions", "decimal", "numbers", "json", "datetime", "time", "array", "dataclasses",
    "enum", "textwrap", "unicodedata", "struct", "base64", "io", "pathlib", "tempfile",
)

# The programs the sandbox and the checker run (a file of their own, executed, never imported)
CHILD_PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")

# Imports the program may never make (the audit hook also refuses anything outside the standard
# library): process creation, the network, raw memory, C-level file writers, sub-interpreters
# (they would not have the hook), test modules that poke memory.
DENY_IMPORTS = (
    "ctypes", "_ctypes", "socket", "_socket", "ssl", "_ssl", "subprocess", "_posixsubprocess",
    "multiprocessing", "_multiprocessing", "posix", "nt", "resource", "pty", "fcntl", "termios", "signal",
    "_signal", "mmap", "sqlite3", "_sqlite3", "dbm", "_dbm", "_gdbm", "readline", "curses", "_curses",
    "_curses_panel", "syslog", "tkinter", "_tkinter", "_xxsubinterpreters", "_xxinterpchannels",
    "_interpreters", "_interpchannels", "_interpqueues", "_testcapi", "_testinternalcapi", "_testbuffer",
    "_testimportmultiple", "_testmultiphase", "_testsinglephase", "_ctypes_test", "_xxtestfuzz",
    "faulthandler", "_lsprof", "cProfile", "profile", "pdb", "bdb", "trace", "webbrowser", "ensurepip", "venv",
)


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


@dataclass
class CheckResult:
    passed: bool             # the checker ran check(candidate) to its end (see check_solution)
    error: str | None        # one line: the failed assertion, the candidate's exception, the timeout ...
    timed_out: bool
    stdout: str              # the completion's output (for debugging; never part of the verdict)
    stderr: str


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


_NETNS = {}
_NETNS_LOCK = threading.Lock()


def _no_network_prefix():
    """The command prefix that runs the child in a network namespace of its own, or [] where
    this machine does not allow one (no `unshare`, no user namespaces, a seccomp'd container):
    probed once per process. Root needs no user namespace; a normal user maps itself to itself."""
    with _NETNS_LOCK:
        if "prefix" not in _NETNS:
            exe = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
            prefix = []
            if exe:
                cmd = [exe, "--net", "--"] if os.geteuid() == 0 else \
                    [exe, "--user", "--map-current-user", "--net", "--"]
                try:
                    ok = subprocess.run(cmd + ["true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        timeout=10).returncode == 0
                except (OSError, subprocess.SubprocessError):
                    ok = False
                prefix = cmd if ok else []
            _NETNS["prefix"] = prefix
        return list(_NETNS["prefix"])


def network_isolated() -> bool:
    """True when sandboxed programs run without any network (see _no_network_prefix)."""
    return bool(_no_network_prefix())


def landlock_abi() -> int:
    """The Landlock ABI the sandbox confines its children with (0: none on this machine).
    Probed once per process by confining a throwaway child and checking that /proc is closed
    to it."""
    with _NETNS_LOCK:
        if "landlock" not in _NETNS:
            abi = 0
            folder = tempfile.mkdtemp(prefix="nanochat_probe_")
            try:
                p = subprocess.run([sys.executable, "-I", "-B", CHILD_PROGRAM, "probe"], cwd=folder,
                                   env=_child_env(folder), capture_output=True, text=True, timeout=30)
                if p.returncode == 0 and p.stdout.strip().isdigit():
                    abi = int(p.stdout.strip())
            except (OSError, subprocess.SubprocessError):
                pass
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            _NETNS["landlock"] = abi
        return _NETNS["landlock"]


# ---------------------------------------------------------------------------
# Cleanup that nothing the program did can break

def _open_dir(dir_fd, name):
    """An fd of directory `name` (relative to dir_fd), never following a symlink; made
    readable, writable and searchable first if the program had taken that away."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except PermissionError:
        os.chmod(name, 0o700, dir_fd=dir_fd)  # known to be a directory (lstat), not a symlink
        return os.open(name, flags, dir_fd=dir_fd)


def _empty_dir(fd):
    """Delete everything inside the directory `fd`, of any depth, without recursion and without
    ever building a long path: the entries of each subdirectory are moved up into `fd` (renames
    relative to directory fds), then the emptied subdirectory is removed, until nothing is left."""
    moved = 0
    while True:
        with os.scandir(fd) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        if not entries:
            return
        for name, is_dir in entries:
            if not is_dir:
                os.unlink(name, dir_fd=fd)
                continue
            if not os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode & stat.S_IWUSR:
                os.chmod(name, 0o700, dir_fd=fd)
            sub = _open_dir(fd, name)
            try:
                os.fchmod(sub, 0o700)  # so that its entries can be moved out
                with os.scandir(sub) as it:
                    children = [e.name for e in it]
                for child in children:
                    while True:
                        moved += 1
                        new = f".nanochat-rm-{moved}"
                        try:
                            os.stat(new, dir_fd=fd, follow_symlinks=False)
                        except FileNotFoundError:
                            break
                    os.rename(child, new, src_dir_fd=sub, dst_dir_fd=fd)
            finally:
                os.close(sub)
            os.rmdir(name, dir_fd=fd)


def remove_tree(path) -> bool:
    """Delete `path` (a file or a directory tree) whatever a program did to it: any depth, any
    path length, permissions it removed, symlinks (removed, never followed). Never raises;
    returns True when the path is gone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path)
            return True
        parent = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            name = os.path.basename(os.path.abspath(path))
            fd = _open_dir(parent, name)
            try:
                _empty_dir(fd)
            finally:
                os.close(fd)
            os.rmdir(name, dir_fd=parent)
        finally:
            os.close(parent)
        return True
    except OSError:
        return not os.path.lexists(path)


def _sweep_uid_files(uid):
    """Delete what the private uid left in the world-writable temp folders (the only places
    outside its working directory it can create anything): entries it owns, looking inside
    other world-writable (sticky) folders too."""
    todo = list(dict.fromkeys(TEMP_DIRS + (tempfile.gettempdir(),)))
    while todo:
        folder = todo.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_uid == uid:
                remove_tree(e.path)
            elif stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH:
                todo.append(e.path)


def _cleanup(workdir, uid):
    if not remove_tree(workdir):
        print(f"warning: the sandbox could not remove {workdir}", file=sys.stderr, flush=True)
    if uid is not None:
        _sweep_uid_files(uid)


# ---------------------------------------------------------------------------
# Running processes under a deadline

def _last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _child_env(workdir):
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": workdir, "TMPDIR": workdir, "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _start_sandbox(code, workdir, uid, timeout, max_memory_bytes, max_file_bytes, max_processes,
                   python_guards, serve=None, pass_fds=()):
    """Write program.py into workdir and start the sandboxed child on it."""
    with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
        f.write(code)
    config = {
        "uid": uid, "max_memory_bytes": int(max_memory_bytes),
        "cpu_s": int(math.ceil(timeout)) + 1,  # backstop for the wall-clock timeout
        "max_file_bytes": int(max_file_bytes), "max_processes": int(max_processes),
        "preload": list(PRELOAD_MODULES), "python_guards": bool(python_guards),
        "max_created": DEFAULT_MAX_CREATED, "deny_imports": list(DENY_IMPORTS), "serve": serve,
        "landlock": landlock_abi() > 0,
    }
    return subprocess.Popen(_no_network_prefix() + [sys.executable, "-I", "-B", CHILD_PROGRAM, "confine", json.dumps(config)],
                            cwd=workdir, env=_child_env(workdir), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds,
                            start_new_session=True, close_fds=True)


def _supervise(procs, uids, main, start, timeout, max_output_bytes):
    """Read the stdout/stderr of every process (capped at max_output_bytes each) until `main`
    has exited and its output is drained, the deadline passes, or an output overflows; then
    kill them all. Returns (outputs {(proc index, stream): bytes}, timed_out, truncated)."""
    buffers = {}
    timed_out = truncated = exited_swept = False
    with selectors.DefaultSelector() as sel:
        for i, p in enumerate(procs):
            for name in ("stdout", "stderr"):
                buffers[(i, name)] = bytearray()
                sel.register(getattr(p, name), selectors.EVENT_READ, (i, name))
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
            if not exited_swept and main.poll() is not None:
                # the main process is done; anything left running (and holding our pipes open)
                # goes now, so the remaining output drains to EOF at once
                for p, uid in zip(procs, uids):
                    _kill_everything(p, uid)
                exited_swept = True
    if not (timed_out or truncated or exited_swept):
        # every pipe closed but the main process may still be running: give it the rest of its time
        try:
            main.wait(timeout=max(0.0, start + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    for p, uid in zip(procs, uids):
        _kill_everything(p, uid)
        p.wait()
    return buffers, timed_out, truncated


def _close(procs, uids):
    for p, uid in zip(procs, uids):
        if p.poll() is None:
            _kill_everything(p, uid)
            p.wait()
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream is not None:
                stream.close()


def _chown_workdir(workdir, uid):
    if uid is None:
        return None
    try:
        os.chown(workdir, uid, uid)
        return uid
    except OSError:
        # e.g. a user namespace that maps only a few uids: run without the private uid
        return None


def execute_code(code, timeout=DEFAULT_TIMEOUT_S, max_memory_bytes=DEFAULT_MAX_MEMORY_BYTES,
                 max_output_bytes=DEFAULT_MAX_OUTPUT_BYTES, max_file_bytes=DEFAULT_MAX_FILE_BYTES,
                 max_processes=DEFAULT_MAX_PROCESSES, python_guards=True):
    """
    Run `code` (a Python program) in the sandbox and return an ExecutionResult.
    python_guards=False leaves out the in-process audit hook, so that tests can show the OS-level
    layers hold on their own; keep it True for real use. `success` means exit status 0, which
    the program controls: to grade code, use check_solution.
    """
    uid = _private_uid()
    workdir = tempfile.mkdtemp(prefix="nanochat_exec_")
    procs = []
    try:
        uid = _chown_workdir(workdir, uid)
        start = time.monotonic()
        procs.append(_start_sandbox(code, workdir, uid, timeout, max_memory_bytes, max_file_bytes,
                                    max_processes, python_guards))
        proc = procs[0]
        buffers, timed_out, truncated = _supervise(procs, [uid], proc, start, timeout, max_output_bytes)
        returncode = proc.returncode
        stdout = buffers[(0, "stdout")].decode("utf-8", errors="replace")
        stderr = buffers[(0, "stderr")].decode("utf-8", errors="replace")
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
        _close(procs, [uid] * len(procs))
        _cleanup(workdir, uid)


def check_solution(program, test, entry_point, helpers="", timeout=DEFAULT_TIMEOUT_S,
                   max_memory_bytes=DEFAULT_MAX_MEMORY_BYTES, max_output_bytes=DEFAULT_MAX_OUTPUT_BYTES,
                   max_file_bytes=DEFAULT_MAX_FILE_BYTES, max_processes=DEFAULT_MAX_PROCESSES,
                   python_guards=True):
    """Grade `program` (the completion: it must define `entry_point`) with `test` (HumanEval's:
    it defines check(candidate)). `helpers` is trusted code the test may use (HumanEval: the
    prompt, whose helper functions some tests call). The program runs in the sandbox; the test
    runs in a checker process of its own that calls the entry point through a pipe and gets
    plain data back (module docstring). passed = the checker's check() returned and it printed
    the run's random nonce; nothing the program does can produce that. Never raises for
    anything the program does."""
    uid = _private_uid()
    workdir = tempfile.mkdtemp(prefix="nanochat_exec_")
    nonce = secrets.token_hex(16)
    procs, uids = [], []
    req_r, req_w = os.pipe()  # checker -> sandbox: calls
    rep_r, rep_w = os.pipe()  # sandbox -> checker: return values
    try:
        uid = _chown_workdir(workdir, uid)
        start = time.monotonic()
        procs.append(_start_sandbox(program, workdir, uid, timeout, max_memory_bytes, max_file_bytes,
                                    max_processes, python_guards, serve=[req_r, rep_w, entry_point],
                                    pass_fds=(req_r, rep_w)))
        uids.append(uid)
        checker = subprocess.Popen([sys.executable, "-I", "-B", CHILD_PROGRAM, "checker"], cwd="/", env=_child_env("/"),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   pass_fds=(req_w, rep_r), start_new_session=True, close_fds=True)
        procs.append(checker)
        uids.append(None)
        # pass_fds keeps the numbers: the checker writes calls to req_w and reads replies from rep_r
        config = {"nonce": nonce, "helpers": helpers, "test": test, "entry_point": entry_point,
                  "request_fd": req_w, "reply_fd": rep_r,
                  "max_memory_bytes": int(max_memory_bytes), "max_reply_bytes": MAX_REPLY_BYTES}
        for fd in (req_r, req_w, rep_r, rep_w):  # only the two children hold the pipes now
            os.close(fd)
        req_r = req_w = rep_r = rep_w = None
        try:
            checker.stdin.write(json.dumps(config).encode())
            checker.stdin.close()
        except OSError:
            pass  # the checker died at once: its exit status says so below
        buffers, timed_out, truncated = _supervise(procs, uids, checker, start, timeout, max_output_bytes)
        out = {k: v.decode("utf-8", errors="replace") for k, v in buffers.items()}
        checker_lines = out[(1, "stdout")].splitlines()
        passed = (not timed_out and not truncated and checker.returncode == 0
                  and bool(checker_lines) and checker_lines[-1] == f"{nonce} passed")
        if passed:
            error = None
        elif timed_out:
            error = f"timed out after {timeout:g}s"
        elif truncated:
            error = f"output exceeded {max_output_bytes} bytes"
        else:
            error = _last_line(out[(1, "stderr")]) or _last_line(out[(0, "stderr")]) or \
                f"the checker exited with status {checker.returncode}"
        return CheckResult(passed=passed, error=error, timed_out=timed_out, stdout=out[(0, "stdout")],
                           stderr=out[(0, "stderr")])
    finally:
        for fd in (req_r, req_w, rep_r, rep_w):
            if fd is not None:
                os.close(fd)
        _close(procs, uids)
        _cleanup(workdir, uid)
