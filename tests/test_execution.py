"""The HumanEval sandbox: real child processes doing real damage attempts; the caller, its files
and the machine must come out unharmed, and nothing the program started may outlive the call."""
import os
import threading
import time

import pyarrow.parquet as pq
import pytest

from nanochat.execution import ExecutionResult, _processes_of_uid, execute_code

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="the private-uid layer exists only when the caller is root")

pytestmark = pytest.mark.timeout(60)


def _alive(pid):
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            state = [line for line in f if line.startswith("State:")][0]
    except (OSError, IndexError):
        return False
    return state.split()[1] not in ("Z", "X")


def _processes_in_group(pgid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid and _alive(int(entry)):
                    out.append(int(entry))
            except OSError:
                pass
    return out


def test_normal_program():
    r = execute_code("import math\nprint('hello', math.factorial(5))\n", timeout=10)
    assert isinstance(r, ExecutionResult)
    assert r.success and r.returncode == 0 and r.error is None
    assert r.stdout == "hello 120\n"
    assert not (r.timed_out or r.memory_exceeded or r.output_truncated)


def test_exception_is_reported():
    r = execute_code("def f():\n    raise ValueError('boom')\nf()\n", timeout=10)
    assert not r.success
    assert r.error == "ValueError: boom"
    assert 'File "program.py", line 2' in r.stderr
    assert not r.timed_out


def test_syntax_error_and_exit_status():
    r = execute_code("def f(:\n", timeout=10)
    assert not r.success and r.error.startswith("SyntaxError")
    r = execute_code("import sys\nprint('x')\nsys.exit(3)\n", timeout=10)
    assert not r.success and r.returncode == 3 and r.error == "exit status 3" and r.stdout == "x\n"


def test_failed_assert():
    r = execute_code("assert 1 + 1 == 3\n", timeout=10)
    assert not r.success and r.error == "AssertionError"


def test_infinite_loop_times_out_and_child_dies():
    code = "import os\nprint(os.getpid(), os.getuid(), flush=True)\nwhile True:\n    pass\n"
    t0 = time.monotonic()
    r = execute_code(code, timeout=1.0)
    assert r.timed_out and not r.success and r.error == "timed out after 1s"
    assert time.monotonic() - t0 < 30  # a guard against hangs, not a benchmark
    pid, uid = map(int, r.stdout.split())
    assert not _alive(pid)
    if IS_ROOT:
        assert _processes_of_uid(uid) == []


def test_sleeping_program_times_out():
    r = execute_code("import time\ntime.sleep(60)\n", timeout=1.0)
    assert r.timed_out and not r.success


def test_fork_and_subprocess_are_disabled():
    code = """
import os, subprocess
for name, fn in [("fork", lambda: os.fork()), ("system", lambda: os.system("true")),
                 ("Popen", lambda: subprocess.Popen(["true"])), ("run", lambda: subprocess.run(["true"]))]:
    try:
        fn()
        print(name, "ran")
    except Exception as e:
        print(name, "blocked", type(e).__name__)
for mod in ("ctypes", "_posixsubprocess", "multiprocessing", "socket", "resource"):
    try:
        __import__(mod)
        print(mod, "imported")
    except ImportError:
        print(mod, "blocked")
"""
    r = execute_code(code, timeout=10)
    assert r.success, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 9 and all("blocked" in line for line in lines), lines


def test_fork_bomb_blocked_by_guards():
    code = "import os\nwhile True:\n    os.fork()\n"
    r = execute_code(code, timeout=2.0)
    assert not r.success and not r.timed_out
    assert "TypeError" in r.error  # os.fork is None inside the sandbox


@needs_root
def test_fork_bomb_contained_by_os_limits():
    """With the Python guards off, a real fork bomb hits RLIMIT_NPROC under the private uid and
    everything it spawned is killed when the call returns."""
    code = """
import os, time, sys
print(os.getuid(), os.getpgrp(), flush=True)
ok = failed = 0
start = time.time()
while time.time() - start < 0.5:
    try:
        if os.fork() == 0:
            while True:          # every child keeps forking too
                try:
                    os.fork()
                except OSError:
                    time.sleep(0.01)
        ok += 1
    except OSError:
        failed += 1
        time.sleep(0.001)
print(ok, failed, flush=True)
time.sleep(60)
"""
    t0 = time.monotonic()
    r = execute_code(code, timeout=2.0, max_processes=16, python_guards=False)
    assert r.timed_out
    assert time.monotonic() - t0 < 30
    first, second = r.stdout.splitlines()[:2]
    uid, pgid = map(int, first.split())
    ok, failed = map(int, second.split())
    assert ok < 16 and failed > 0  # the process limit stopped it
    assert _processes_of_uid(uid) == []
    assert _processes_in_group(pgid) == []


@needs_root
def test_escaped_processes_are_killed():
    """A grandchild that leaves the process group (setsid) and outlives the program is still
    killed: cleanup sweeps every process of the private uid."""
    code = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(100)
    os._exit(0)
time.sleep(0.2)
print(os.getuid(), flush=True)
"""
    r = execute_code(code, timeout=10, python_guards=False)
    assert r.success, r.stderr
    assert _processes_of_uid(int(r.stdout)) == []


@needs_root
def test_private_uid_does_not_follow_the_callers_random_seed():
    """Evaluation code seeds `random`; two runs (or two ranks) must still get different uids."""
    import random
    uids = []
    for _ in range(2):
        random.seed(1234)
        r = execute_code("import os\nprint(os.getuid())\n", timeout=10)
        assert r.success, r.stderr
        uids.append(int(r.stdout))
    assert uids[0] != uids[1] and min(uids) >= 2**31


def test_program_that_closes_its_output_still_runs_to_the_end():
    code = "import os, sys, time\nos.close(1)\nos.close(2)\ntime.sleep(0.3)\nos._exit(7)\n"
    r = execute_code(code, timeout=10)
    assert r.returncode == 7 and not r.timed_out and r.error == "exit status 7"


def test_huge_allocation_is_a_memory_error():
    r = execute_code("x = bytearray(4 * 1024**3)\n", timeout=10, max_memory_bytes=256 * 1024**2)
    assert not r.success and r.memory_exceeded and r.error == "MemoryError"
    r = execute_code("x = []\nwhile True:\n    x.append(' ' * 10**6)\n", timeout=10, max_memory_bytes=256 * 1024**2)
    assert not r.success and r.memory_exceeded and not r.timed_out
    # and a modest allocation under the limit is fine
    r = execute_code("x = bytearray(50 * 1024**2)\nprint(len(x))\n", timeout=10, max_memory_bytes=256 * 1024**2)
    assert r.success and r.stdout == f"{50 * 1024**2}\n"


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_flood_is_truncated(stream):
    code = f"import sys\nwhile True:\n    sys.{stream}.write('x' * 1000)\n"
    r = execute_code(code, timeout=20, max_output_bytes=10_000)
    assert r.output_truncated and not r.success
    assert not r.timed_out  # stopped by the cap, well before the timeout
    assert len(getattr(r, stream)) == 10_000
    assert r.error == "output exceeded 10000 bytes"


def test_output_within_cap_is_complete():
    r = execute_code("for i in range(1000):\n    print(i)\n", timeout=10, max_output_bytes=100_000)
    assert r.success and r.stdout.splitlines() == [str(i) for i in range(1000)]


ATTACKS = {
    "os.remove": "import os\nos.remove(VICTIM)\n",
    "os.unlink": "import os\nos.unlink(VICTIM)\n",
    "shutil.rmtree": "import shutil, os\nshutil.rmtree(os.path.dirname(VICTIM))\n",
    "open-w": "open(VICTIM, 'w').write('pwned')\n",
    "open-a": "open(VICTIM, 'a').write('pwned')\n",
    "pathlib": "import pathlib\npathlib.Path(VICTIM).write_text('pwned')\n",
    "os.rename": "import os\nos.rename(VICTIM, VICTIM + '.moved')\n",
    "os.truncate": "import os\nos.truncate(VICTIM, 0)\n",
    "os.chmod": "import os\nos.chmod(VICTIM, 0)\n",
    # os.open is not guarded in Python; the OS refuses it under the private uid
    "os.open": "import os\nfd = os.open(VICTIM, os.O_WRONLY | os.O_TRUNC)\nos.write(fd, b'pwned')\n",
}


@pytest.mark.parametrize("guards", [True, pytest.param(False, marks=needs_root)])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_files_outside_the_sandbox_are_safe(tmp_path, attack, guards):
    if attack == "os.open" and not IS_ROOT:
        pytest.skip("without the private uid, os.open on the caller's own files is not blocked (documented)")
    victim = tmp_path / "precious" / "data.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    mode = victim.stat().st_mode
    code = f"VICTIM = {str(victim)!r}\n" + ATTACKS[attack]
    r = execute_code(code, timeout=10, python_guards=guards)
    assert not r.success
    assert victim.read_text() == "precious"
    assert victim.stat().st_mode == mode
    assert not os.path.exists(str(victim) + ".moved")


def test_working_directory_is_private_and_removed():
    code = """
import os
open('scratch.txt', 'w').write('ok')
print(os.getcwd())
print(open('scratch.txt').read())
"""
    r = execute_code(code, timeout=10)
    assert r.success, r.stderr
    workdir, content = r.stdout.splitlines()
    assert content == "ok"
    assert os.path.basename(workdir).startswith("nanochat_exec_")
    assert not os.path.exists(workdir)


def test_file_size_limit():
    code = "f = open('big.bin', 'wb')\nfor _ in range(100):\n    f.write(b'x' * 100_000)\n    f.flush()\n"
    r = execute_code(code, timeout=10, max_file_bytes=1_000_000)
    assert not r.success
    assert "SIGXFSZ" in r.error or "File too large" in r.error


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    r = execute_code("import os\nfor k, v in sorted(os.environ.items()):\n    print(k, v)\n", timeout=10)
    assert r.success, r.stderr
    assert "hunter2" not in r.stdout and "NANOCHAT_TEST_SECRET" not in r.stdout
    names = {line.split(" ", 1)[0] for line in r.stdout.splitlines()}
    assert "PATH" in names and "NANOCHAT_BASE_DIR" not in names


@needs_root
def test_runs_unprivileged():
    r = execute_code("import os\nprint(os.getuid(), os.geteuid(), os.getgid(), os.getgroups())\n", timeout=10)
    assert r.success, r.stderr
    uid, euid, gid, groups = r.stdout.split(maxsplit=3)
    assert int(uid) != 0 and euid == uid and int(gid) != 0 and groups.strip() == "[]"


def test_concurrent_calls_from_threads():
    results = {}

    def work(i):
        results[i] = execute_code(f"print({i} * {i})\n", timeout=20)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        assert results[i].success and results[i].stdout == f"{i * i}\n"


def _humaneval(data_dir):
    path = os.path.join(data_dir, "tasks", "openai", "openai_humaneval", "openai_humaneval", "test", "0000.parquet")
    return pq.read_table(path).to_pylist()


def _program(problem, body):
    return (problem["prompt"] + body + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def test_humaneval_canonical_solutions(data_dir):
    """Real HumanEval problems, including the ones importing hashlib, math and typing: the
    canonical solutions pass and a wrong body fails."""
    problems = _humaneval(data_dir)
    assert len(problems) == 164
    picked = problems[:4] + [p for p in problems if "import" in p["prompt"] + p["canonical_solution"]][-4:]
    for p in picked:
        r = execute_code(_program(p, p["canonical_solution"]), timeout=10)
        assert r.success, (p["task_id"], r.stderr)
        r = execute_code(_program(p, "    return None\n"), timeout=10)
        assert not r.success, p["task_id"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_humaneval_all_canonical_solutions_pass(data_dir):
    """All 164 canonical solutions pass in the sandbox (the preloaded modules cover their imports)."""
    failures = []
    for p in _humaneval(data_dir):
        r = execute_code(_program(p, p["canonical_solution"]), timeout=10)
        if not r.success:
            failures.append((p["task_id"], r.error))
    assert failures == []
