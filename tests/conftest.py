"""Shared fixtures. Every test session gets its own NANOCHAT_BASE_DIR (a temp folder) and reads
the real offline data from NANOCHAT_DATA (default: ../shared/data beside the repository)."""
import os
import shutil
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")

# absolute: a relative value means "from where pytest was started", and some tests run scripts
# and commands from other folders
os.environ["NANOCHAT_DATA"] = os.path.abspath(os.environ.get("NANOCHAT_DATA") or _SHARED)
# Tests never reach the internet: every loader that would download something missing fails
# instead. Tests of the download code turn this off and serve their files from 127.0.0.1.
os.environ["NANOCHAT_OFFLINE"] = "1"
_BASE = tempfile.mkdtemp(prefix="nanochat-test-")
os.environ["NANOCHAT_BASE_DIR"] = _BASE
os.environ.setdefault("OMP_NUM_THREADS", "2")
# fp32 unless a test asks for bf16: exact-equality tests must not depend on whether this CPU
# has fast bf16 (the automatic choice is tested with its probe stubbed out)
os.environ.setdefault("NANOCHAT_DTYPE", "float32")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEST_VOCAB_SIZE = 1024  # small, so tiny test models are fast; trained from a real shard


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_BASE, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir():
    """The offline data root (../shared/data). Missing data is a failure, not a skip."""
    path = os.environ["NANOCHAT_DATA"]
    assert os.path.isdir(os.path.join(path, "pretrain")), f"offline data not found at {path} (set NANOCHAT_DATA)"
    return path


@pytest.fixture(scope="session")
def base_dir():
    return _BASE


@pytest.fixture(scope="session")
def tokenizer(data_dir):
    """A real BPE tokenizer (vocab 1,024) trained on ~2M characters of the first real shard, saved
    to $NANOCHAT_BASE_DIR/tokenizer so get_tokenizer() / get_token_bytes() find it."""
    from nanochat.dataset import iter_texts
    from nanochat.tokenizer import Tokenizer, capped_texts, get_tokenizer, tokenizer_dir
    out = tokenizer_dir()
    if not os.path.exists(os.path.join(out, "merges.tiktoken")):
        tok = Tokenizer.train(capped_texts(iter_texts("train", data_dir=data_dir), 2_000_000, 10_000), TEST_VOCAB_SIZE)
        tok.save(out)
    return get_tokenizer()


@pytest.fixture(scope="session")
def base_checkpoint(tokenizer):
    """A tiny base model really trained by `nanochat train base` (depth 2, width 128, seq len 64,
    8 steps of 512 tokens, fp32 on CPU) with the session tokenizer, saved under
    $NANOCHAT_BASE_DIR/checkpoints/base/<tag>. Returns a SimpleNamespace with `source` ("base"),
    `tag`, `step` (the last step), `dir` (the checkpoint folder) and `model_config` (dict).
    Load it with `nanochat.checkpoint.load_model("base", "cpu", model_tag=ckpt.tag)`; it is the
    only (so the largest) base model, so `load_model("base", "cpu")` finds it too. Treat it as
    read-only: train later stages into their own folders (mid/, sft/, ...)."""
    import json
    import types

    from nanochat import checkpoint as ck
    from nanochat.stages import train_base
    tag = "d2"
    d = ck.checkpoint_dir("base", tag)
    if not ck.complete_steps(d):
        train_base.main(["--depth", "2", "--max-seq-len", "64", "--device-batch-size", "8",
                         "--total-batch-size", "512", "--num-iterations", "8", "--eval-every", "-1",
                         "--eval-tokens", "512", "--core-metric-every", "-1", "--sample-every", "-1",
                         "--model-tag", tag, "--device-type", "cpu"])
    step = ck.find_last_step(d)
    with open(os.path.join(d, f"meta_{step:06d}.json")) as f:
        meta = json.load(f)
    return types.SimpleNamespace(source="base", tag=tag, step=step, dir=d, model_config=meta["model_config"])
