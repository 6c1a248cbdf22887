"""The shell scripts and the `nanochat` entry point as a newcomer runs them: a relative
NANOCHAT_DATA / NANOCHAT_BASE_DIR means the folder beside where the command was typed, whatever
directory the script or a stage works in later, and offline mode never downloads."""
import os
import shutil
import subprocess
import sys

import psutil
import pytest

from nanochat import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shim(tmp_path):
    """A fake `nanochat` on PATH that logs the data root, base dir and arguments of each call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "nanochat").write_text(f'#!/bin/sh\necho "$NANOCHAT_DATA|$NANOCHAT_BASE_DIR|$*" >> "{log}"\n')
    (bin_dir / "nanochat").chmod(0o755)
    return bin_dir, log


def test_runcpu_makes_relative_paths_absolute_once(tmp_path):
    """runs/runcpu.sh started in work/ with NANOCHAT_DATA=data (not there yet: the download stage
    will fill it) and NANOCHAT_BASE_DIR=out: every stage gets work/data and work/out. (It used to
    drop a data root it could not cd into and download into the base dir instead.)"""
    bin_dir, log = _shim(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, NANOCHAT_DATA="data", NANOCHAT_BASE_DIR="out", RUNCPU_TINY="1", SKIP_SETUP="1",
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    p = subprocess.run(["bash", os.path.join(REPO, "runs", "runcpu.sh")], cwd=work, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    calls = [line.split("|") for line in log.read_text().splitlines()]
    assert [c[2] for c in calls][:2] == ["report reset", "data download -n 2"]
    assert {(c[0], c[1]) for c in calls} == {(str(work / "data"), str(work / "out"))}


@pytest.mark.parametrize("load, given", [("0.10", None), ("3.50", None), ("0.10", "3")])
def test_runcpu_threads_follow_the_load(tmp_path, load, given):
    """Idle machine (1-minute load < 0.5): one thread per physical core; busy: half the logical
    CPUs (at least 1); OMP_NUM_THREADS set by the user always wins."""
    bin_dir, log = _shim(tmp_path)
    (bin_dir / "nanochat").write_text(f'#!/bin/sh\necho "$OMP_NUM_THREADS" >> "{log}"\n')
    loadavg = tmp_path / "loadavg"
    loadavg.write_text(f"{load} 1.00 1.00 1/100 12345\n")
    env = dict(os.environ, NANOCHAT_DATA=str(tmp_path / "data"), NANOCHAT_BASE_DIR=str(tmp_path / "out"),
               RUNCPU_TINY="1", SKIP_SETUP="1", RUNCPU_LOADAVG=str(loadavg),
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env.pop("OMP_NUM_THREADS", None)
    if given:
        env["OMP_NUM_THREADS"] = given
    p = subprocess.run(["bash", os.path.join(REPO, "runs", "runcpu.sh")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    threads = set(log.read_text().split())
    half = max(1, len(os.sched_getaffinity(0)) // 2)
    cpus = len(os.sched_getaffinity(0))
    physical = min(psutil.cpu_count(logical=False), cpus) if shutil.which("lscpu") else half  # the script asks lscpu
    want = given or str(physical if load == "0.10" else half)
    assert threads == {want}
    assert f"{want} thread(s)" in p.stdout


def test_test_script_resolves_a_relative_data_root_before_changing_directory(tmp_path):
    """runs/test.sh from runs/ with NANOCHAT_DATA=../../shared/data: pytest (run from the
    repository root) sees the absolute path of that folder."""
    probe = tmp_path / "test_probe.py"
    probe.write_text("import os\n\ndef test_env():\n    print('DATA=' + os.environ['NANOCHAT_DATA'])\n")
    shared = os.path.join(os.path.dirname(REPO), "shared", "data")
    rel = os.path.relpath(shared, os.path.join(REPO, "runs"))
    env = dict(os.environ, NANOCHAT_DATA=rel, SKIP_SETUP="1",
               PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    p = subprocess.run(["bash", "test.sh", "-q", "-s", "-p", "no:cacheprovider", str(probe)],
                       cwd=os.path.join(REPO, "runs"), env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"DATA={os.path.realpath(shared)}\n" in p.stdout


def test_test_script_fails_when_no_test_ran(tmp_path):
    empty = tmp_path / "test_nothing.py"
    empty.write_text("")
    env = dict(os.environ, SKIP_SETUP="1", PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    p = subprocess.run(["bash", os.path.join(REPO, "runs", "test.sh"), "-q", "-p", "no:cacheprovider", str(empty)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "collected no tests" in p.stderr


def test_ci_runs_the_readme_command_verbatim():
    readme = open(os.path.join(REPO, "README.md")).read()
    command = "NANOCHAT_DATA=../shared/data bash runs/test.sh"
    assert command in readme
    assert command in open(os.path.join(REPO, ".ci", "run")).read()


def test_entry_point_makes_env_paths_absolute_and_offline_never_downloads(tmp_path, monkeypatch, capsys):
    """`nanochat` started in tmp/ with NANOCHAT_DATA=rel/data, offline: the variable is absolute
    from then on (subprocesses inherit it), and `data download` refuses with the missing folder
    named instead of trying the hub."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NANOCHAT_DATA", "rel/data")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", "base")
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    assert cli.main(["data", "download", "-n", "1", "--retries", "0", "--timeout", "1"]) == 1
    err = capsys.readouterr().err
    assert os.environ["NANOCHAT_DATA"] == str(tmp_path / "rel" / "data")
    assert os.environ["NANOCHAT_BASE_DIR"] == str(tmp_path / "base")
    assert str(tmp_path / "rel" / "data" / "pretrain") in err and "NANOCHAT_OFFLINE" in err
    assert not (tmp_path / "rel").exists()  # nothing created, nothing fetched
