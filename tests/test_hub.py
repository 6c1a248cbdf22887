"""tasks/hub.py against a real HTTP server on 127.0.0.1 serving real parquet files: the download
path, its retries, and its failures. Never the internet; downloads go to a temp data root."""
import io
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.common import UserError
from tasks import hub

PREFIX = "/datasets/org/name/resolve/refs%2Fconvert%2Fparquet/default/train"


def parquet_bytes(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


class Hub(ThreadingHTTPServer):
    """files: path -> bytes. fail: path -> number of 500 answers still to give.
    truncate: path -> number of torn answers (full Content-Length, half the body) still to give."""
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.fail, self.truncate, self.log = {}, {}, {}, []
        self.lock = threading.Lock()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        with srv.lock:
            srv.log.append(self.path)
            body = srv.files.get(self.path)
            failing = srv.fail.get(self.path, 0) > 0
            torn = srv.truncate.get(self.path, 0) > 0
            if failing:
                srv.fail[self.path] -= 1
            elif torn:
                srv.truncate[self.path] -= 1
        if body is None:
            self.send_error(404)
            return
        if failing:
            self.send_error(503)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if torn:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(monkeypatch, tmp_path):
    srv = Hub()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("NANOCHAT_HF_URL", srv.url)
    monkeypatch.setenv("NANOCHAT_DATA", str(tmp_path))
    monkeypatch.delenv("NANOCHAT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield srv
    srv.shutdown()
    srv.server_close()


ROWS_A = [{"question": f"q{i}", "answer": i} for i in range(5)]
ROWS_B = [{"question": f"q{i}", "answer": i} for i in range(5, 8)]


def test_url_scheme_is_the_hub_parquet_export():
    # the path layout of the hub's parquet export, under any base URL (only loopback in tests)
    url = hub.split_url("allenai/ai2_arc", "ARC-Easy", "test", 0, base_url="http://127.0.0.1:9")
    assert url == ("http://127.0.0.1:9/datasets/allenai/ai2_arc/resolve/refs%2Fconvert%2Fparquet/"
                   "ARC-Easy/test/0000.parquet")


def test_download_two_files_then_read_locally(server, tmp_path):
    server.files[f"{PREFIX}/0000.parquet"] = parquet_bytes(ROWS_A)
    server.files[f"{PREFIX}/0001.parquet"] = parquet_bytes(ROWS_B)
    rows = hub.load_split("org/name", "default", "train", backoff=0.01)
    assert rows == ROWS_A + ROWS_B
    folder = tmp_path / "tasks" / "org" / "name" / "default" / "train"
    assert sorted(os.listdir(folder)) == ["0000.parquet", "0001.parquet"]
    # the probe stops at the first 404; nothing else is left beside the split folder
    assert server.log == [f"{PREFIX}/0000.parquet", f"{PREFIX}/0001.parquet", f"{PREFIX}/0002.parquet"]
    assert os.listdir(folder.parent) == ["train"]
    # second load: local files, no request
    n = len(server.log)
    assert hub.load_split("org/name", "default", "train") == ROWS_A + ROWS_B
    assert len(server.log) == n


def test_missing_split_is_a_clear_error(server, tmp_path):
    with pytest.raises(UserError, match="404"):
        hub.load_split("org/name", "default", "train", backoff=0.01)
    assert not (tmp_path / "tasks" / "org" / "name" / "default" / "train").exists()
    assert os.listdir(tmp_path / "tasks" / "org" / "name" / "default") == []


def test_retries_after_server_errors(server):
    path = f"{PREFIX}/0000.parquet"
    server.files[path] = parquet_bytes(ROWS_A)
    server.fail[path] = 2
    assert hub.load_split("org/name", "default", "train", retries=4, backoff=0.01) == ROWS_A
    assert server.log.count(path) == 3


def test_gives_up_after_the_retries(server, tmp_path):
    path = f"{PREFIX}/0000.parquet"
    server.files[path] = parquet_bytes(ROWS_A)
    server.fail[path] = 100
    with pytest.raises(UserError, match="could not download .*0000.parquet") as err:
        hub.load_split("org/name", "default", "train", retries=3, backoff=0.01)
    assert "NANOCHAT_DATA" in str(err.value)
    assert server.log.count(path) == 3
    assert os.listdir(tmp_path / "tasks" / "org" / "name" / "default") == []  # no torn split folder


def test_truncated_response_is_retried(server):
    path = f"{PREFIX}/0000.parquet"
    server.files[path] = parquet_bytes(ROWS_A)
    server.truncate[path] = 1
    assert hub.load_split("org/name", "default", "train", retries=3, backoff=0.01) == ROWS_A
    assert server.log.count(path) == 2


def test_always_truncated_fails_and_leaves_nothing(server, tmp_path):
    path = f"{PREFIX}/0000.parquet"
    server.files[path] = parquet_bytes(ROWS_A)
    server.truncate[path] = 100
    with pytest.raises(UserError, match="could not download"):
        hub.load_split("org/name", "default", "train", retries=2, backoff=0.01)
    assert os.listdir(tmp_path / "tasks" / "org" / "name" / "default") == []


def test_a_file_that_is_not_parquet_is_rejected(server):
    server.files[f"{PREFIX}/0000.parquet"] = b"<html>this is a login page, not parquet</html>"
    with pytest.raises(UserError, match="could not download"):
        hub.load_split("org/name", "default", "train", retries=2, backoff=0.01)


def test_failure_in_a_later_file_leaves_no_partial_split(server, tmp_path):
    server.files[f"{PREFIX}/0000.parquet"] = parquet_bytes(ROWS_A)
    server.files[f"{PREFIX}/0001.parquet"] = parquet_bytes(ROWS_B)
    server.fail[f"{PREFIX}/0001.parquet"] = 100
    with pytest.raises(UserError):
        hub.load_split("org/name", "default", "train", retries=2, backoff=0.01)
    # 0000 was fine, but a split with only some of its files must not look complete later
    assert os.listdir(tmp_path / "tasks" / "org" / "name" / "default") == []


def test_offline_and_absent_names_the_path(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_DATA", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        hub.load_split("org/name", "default", "train")
    msg = str(err.value)
    assert os.path.join(str(tmp_path), "tasks", "org", "name", "default", "train") in msg
    assert "NANOCHAT_DATA" in msg and "NANOCHAT_OFFLINE" in msg


def test_unreachable_hub_is_a_clear_error(monkeypatch, tmp_path):
    # a port nobody listens on: connection refused, retried, then a UserError (no traceback)
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setenv("NANOCHAT_HF_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NANOCHAT_DATA", str(tmp_path))
    monkeypatch.delenv("NANOCHAT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserError, match="could not download"):
        hub.load_split("org/name", "default", "train", retries=2, backoff=0.01, timeout=2)


def test_smoltalk_downloads_and_folds_system_messages(server):
    from tasks.smoltalk import SmolTalk
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}], "source": "x"},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "welcome"}], "source": "y"},
    ]
    server.files["/datasets/HuggingFaceTB/smol-smoltalk/resolve/refs%2Fconvert%2Fparquet/default/test/0000.parquet"] = \
        parquet_bytes(rows)
    task = SmolTalk(split="test")
    assert len(task) == 2 and task.eval_type == "generative"
    assert task[0]["messages"] == [{"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": "Hello!"}]
    assert task[1]["messages"] == rows[1]["messages"]


def test_mmlu_auxiliary_train_unwraps_its_rows(server):
    from tasks.mmlu import MMLU
    rows = [{"train": {"question": "1+1?", "subject": "", "choices": ["1", "2", "3", "4"], "answer": 1}}]
    server.files["/datasets/cais/mmlu/resolve/refs%2Fconvert%2Fparquet/auxiliary_train/train/0000.parquet"] = \
        parquet_bytes(rows)
    task = MMLU(subset="auxiliary_train", split="train")
    ex = task[0]
    assert ex["letters"] == ["A", "B", "C", "D"] and ex["messages"][-1]["content"] == "B"
    assert "1+1?" in ex["messages"][0]["content"]
