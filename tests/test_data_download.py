"""`nanochat data download` against a real HTTP server on 127.0.0.1 serving real parquet shards:
healthy, flaky (5xx first), truncating, stalling, and 404 servers. Never the internet."""
import os
import time

import pyarrow.parquet as pq
import pytest

from helpers import FileServer
from nanochat import cli
from nanochat.common import UserError
from nanochat.dataset import HUB_DATASETS, is_valid_shard, list_shards, shard_name, write_shard
from nanochat.stages import data_download

VAL = HUB_DATASETS["fineweb-edu"][1]  # the validation shard index of the dataset the tests ask for


@pytest.fixture(scope="module")
def shard_bytes(data_dir, tmp_path_factory):
    """Three small real shards (a row group of real documents each), as the server's files."""
    src = list_shards(data_dir)
    tmp = tmp_path_factory.mktemp("srv")
    files = {}
    for i, idx in enumerate([0, 1, 2, VAL]):
        texts = pq.ParquetFile(src[i % len(src)]).read_row_group(0, columns=["text"]).column("text").to_pylist()[:200]
        path = tmp / shard_name(idx)
        write_shard(str(path), texts)
        files[shard_name(idx)] = path.read_bytes()
    return files


@pytest.fixture(autouse=True)
def downloads_on(monkeypatch):
    """These tests download from their own 127.0.0.1 server: lift the suite-wide offline switch."""
    monkeypatch.delenv("NANOCHAT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture
def server(shard_bytes):
    s = FileServer(shard_bytes)
    yield s
    s.close()


def run(server, out, *extra):
    argv = ["-n", "3", "-w", "2", "--dataset", "fineweb-edu", "--base-url", server.url, "--out", str(out),
            "--backoff", "0.01", "--retries", "3", "--timeout", "5", *extra]
    return data_download.main(argv)


def names(out):
    return sorted(f for f in os.listdir(out))


def test_download_all_then_skip(server, tmp_path, shard_bytes):
    out = tmp_path / "pretrain"
    assert run(server, out) == 0
    want = [shard_name(i) for i in (0, 1, 2, VAL)]
    assert names(out) == want  # no temporary files left
    assert [os.path.basename(p) for p in list_shards(folder=str(out))][-1] == shard_name(VAL)  # val last
    for n in want:
        assert (out / n).read_bytes() == shard_bytes[n]
    hits = dict(server.hits)
    assert run(server, out) == 0  # all present and valid: nothing fetched
    assert server.hits == hits


def test_invalid_existing_shard_is_replaced(server, tmp_path, shard_bytes):
    out = tmp_path / "pretrain"
    out.mkdir()
    (out / shard_name(1)).write_bytes(shard_bytes[shard_name(1)][:1000])  # torn file from an old crash
    assert run(server, out) == 0
    assert server.hits[shard_name(1)] == 1
    assert is_valid_shard(str(out / shard_name(1)))


def test_flaky_server_retried_with_backoff(server, tmp_path):
    server.modes[shard_name(1)] = ["503", "503", "ok"]
    server.modes[shard_name(2)] = ["truncate", "ok"]
    out = tmp_path / "pretrain"
    assert run(server, out) == 0
    assert server.hits[shard_name(1)] == 3 and server.hits[shard_name(2)] == 2
    assert names(out) == [shard_name(i) for i in (0, 1, 2, VAL)]


def test_stalled_request_times_out_and_retries(server, tmp_path):
    server.modes[shard_name(0)] = ["stall", "ok"]
    out = tmp_path / "pretrain"
    t0 = time.time()
    assert run(server, out, "--timeout", "0.5") == 0
    assert server.hits[shard_name(0)] == 2
    assert time.time() - t0 < 10


def test_failures_named_and_nonzero_exit(server, tmp_path, capsys):
    server.modes[shard_name(1)] = ["truncate"]  # always truncates
    server.modes[shard_name(2)] = ["404"]
    out = tmp_path / "pretrain"
    assert run(server, out) == 1
    err = capsys.readouterr().err
    assert shard_name(1) in err and shard_name(2) in err and shard_name(0) not in err.split("failed after")[-1]
    assert server.hits[shard_name(1)] == 4  # first try + 3 retries
    assert server.hits[shard_name(2)] == 1  # a 404 is not retried
    assert names(out) == [shard_name(0), shard_name(VAL)]  # the good ones kept, no partial files
    # through the CLI: same non-zero exit
    server.hits.clear()
    rc = cli.main(["data", "download", "-n", "3", "--dataset", "fineweb-edu", "--base-url", server.url,
                   "--out", str(out), "--backoff", "0.01", "--retries", "1"])
    assert rc == 1
    assert set(server.hits) == {shard_name(1), shard_name(2)}  # the present ones were skipped


def test_base_url_from_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HUB_URL", server.url)
    monkeypatch.setenv("NANOCHAT_DATA", str(tmp_path / "data"))
    assert data_download.main(["-n", "1", "--dataset", "fineweb-edu", "--backoff", "0.01"]) == 0
    assert names(tmp_path / "data" / "pretrain") == [shard_name(0), shard_name(VAL)]


def test_unwritable_target_is_user_error(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    os.chmod(out, 0o555)
    try:
        with pytest.raises(UserError, match="read-only"):
            data_download.main(["-n", "1", "--out", str(out), "--base-url", "http://127.0.0.1:9"])
    finally:
        os.chmod(out, 0o755)


def test_offline_refuses_to_download(server, tmp_path, monkeypatch):
    """NANOCHAT_OFFLINE=1 stops `data download` itself, before any request: a clear error
    naming the folder where the shards are missing."""
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    out = tmp_path / "pretrain"
    with pytest.raises(UserError, match="downloads are off") as e:
        run(server, out)
    assert str(out) in str(e.value)
    assert server.hits == {}
