"""nanochat.common.compute_cleanup under a real 2-process torchrun (gloo, CPU): on a normal exit
no rank leaves before every rank has finished its work; while an exception propagates it does
not wait (the other ranks may never come)."""
import os
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent('''
    import os, sys, time
    from nanochat.common import compute_cleanup, compute_init
    out, mode = sys.argv[1], sys.argv[2]
    _, rank, _, _, _ = compute_init("cpu")
    mark = lambda name: open(os.path.join(out, f"{name}_rank{rank}"), "w").close()
    seen = lambda name: os.path.exists(os.path.join(out, name))

    def wait_for(name, timeout=60):
        deadline = time.time() + timeout
        while not seen(name) and time.time() < deadline:
            time.sleep(0.01)

    if mode == "ok":
        if rank == 0:
            wait_for("cleaning_rank1")  # rank 1 is in its cleanup while rank 0 still "writes results"
            mark("finished")
        else:
            mark("cleaning")
        compute_cleanup()
        if rank == 1 and not seen("finished_rank0"):
            mark("left_before_rank0_finished")
        mark("left")
    else:  # rank 1 fails; its cleanup must not wait for rank 0, which never arrives
        try:
            if rank == 1:
                raise RuntimeError("boom")
            wait_for("left_rank1")
            mark("rank0_done")
        finally:
            if rank == 1:
                compute_cleanup()
                mark("left")
        os._exit(0)  # rank 0: leave without a collective (its peer is gone)
''')


def _torchrun(tmp_path, mode):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path), mode], env=env, capture_output=True, text=True, timeout=120)


def test_normal_exit_waits_for_every_rank(tmp_path):
    r = _torchrun(tmp_path, "ok")
    assert r.returncode == 0, r.stderr[-2000:]
    names = set(os.listdir(tmp_path))
    assert {"left_rank0", "left_rank1"} <= names
    assert "finished_rank0" in names and "left_before_rank0_finished_rank1" not in names


def test_cleanup_during_an_exception_does_not_wait(tmp_path):
    r = _torchrun(tmp_path, "fail")
    assert r.returncode != 0 and "boom" in r.stderr
    assert "left_rank1" in set(os.listdir(tmp_path))  # rank 1 got through its cleanup without rank 0
