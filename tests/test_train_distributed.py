"""A 2-process torchrun (gloo, CPU) `nanochat train base` equals a 1-process run with gradient
accumulation at the same total batch.

The data is split into grad_accum * world_size data ranks, which depends only on the total and
micro batch sizes: 1 process x 2 accumulation steps and 2 processes x 1 step read exactly the same
batches. So the only differences are the floating-point order of the gradient averaging
(reduce-scatter over gloo vs. accumulation in .grad), which stays at round-off level.
"""
import os
import subprocess
import sys

import pytest

from nanochat import checkpoint as ck
from nanochat import metrics

FLAGS = ["train", "base", "--depth", "2", "--max-seq-len", "64", "--device-batch-size", "4",
         "--total-batch-size", "512", "--num-iterations", "6", "--eval-every", "3", "--eval-tokens", "1024",
         "--core-metric-every", "-1", "--sample-every", "-1", "--device-type", "cpu", "--warmdown-ratio", "0.5"]


def run(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow
def test_two_processes_match_one_with_accumulation(tokenizer):
    out2 = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "nanochat"] + FLAGS + ["--model-tag", "dist2"])
    assert "2 procs x 1 accum" in out2
    out1 = run([sys.executable, "-m", "nanochat"] + FLAGS + ["--model-tag", "dist1"])
    assert "1 procs x 2 accum" in out1
    m1 = metrics.read_metrics(ck.checkpoint_dir("base", "dist1"))
    m2 = metrics.read_metrics(ck.checkpoint_dir("base", "dist2"))
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(7))
    losses1 = [r["loss"] for r in m1[1:]]
    losses2 = [r["loss"] for r in m2[1:]]
    assert losses1 == pytest.approx(losses2, rel=0, abs=2e-4)
    assert losses1[0] == pytest.approx(losses2[0], abs=1e-6)  # same weights, same data: step 1 is exact
    assert min(losses1[2:]) < losses1[0]  # deterministic data and init: it learns
    # each rank saved its optimizer shard; the model is the same up to round-off
    d2 = ck.checkpoint_dir("base", "dist2")
    assert os.path.exists(os.path.join(d2, "optim_000006_rank1.pt"))
    a = ck.load_checkpoint(ck.checkpoint_dir("base", "dist1"), 6)[0]
    b = ck.load_checkpoint(d2, 6)[0]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3
