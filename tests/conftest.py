"""Shared fixtures. Every test session gets its own NANOCHAT_BASE_DIR (a temp folder) and reads
the real offline data from NANOCHAT_DATA (default: ../shared/data beside the repository)."""
import os
import shutil
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")

os.environ.setdefault("NANOCHAT_DATA", _SHARED)
_BASE = tempfile.mkdtemp(prefix="nanochat-test-")
os.environ["NANOCHAT_BASE_DIR"] = _BASE
os.environ.setdefault("OMP_NUM_THREADS", "2")
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
    from nanochat.tokenizer import Tokenizer, capped_texts, get_tokenizer, tokenizer_dir
    from nanochat.dataset import iter_texts
    out = tokenizer_dir()
    if not os.path.exists(os.path.join(out, "merges.tiktoken")):
        tok = Tokenizer.train(capped_texts(iter_texts("train", data_dir=data_dir), 2_000_000, 10_000), TEST_VOCAB_SIZE)
        tok.save(out)
    return get_tokenizer()
