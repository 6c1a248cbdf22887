"""The CORE eval bundle is fetched (zip → validated → unpacked → renamed into place) when it is
absent, from a real HTTP server on 127.0.0.1 (never the internet)."""
import io
import json
import os
import zipfile

import pytest

from helpers import FileServer
from nanochat.common import UserError
from nanochat.core_eval import ensure_eval_bundle, load_bundle


def bundle_zip(with_core_yaml=True, evil=False):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        if with_core_yaml:
            z.writestr("eval_bundle/core.yaml", "icl_tasks:\n- label: tiny_mc\n  dataset_uri: language_understanding/tiny.jsonl\n"
                                                "  num_fewshot: [0]\n  icl_task_type: multiple_choice\n"
                                                "  continuation_delimiter: ' '\n")
        z.writestr("eval_bundle/eval_meta_data.csv", "Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n"
                                                     "tiny_mc,language understanding,multiple choice,0,2,25,,tiny\n")
        z.writestr("eval_bundle/eval_data/language_understanding/tiny.jsonl",
                   "\n".join(json.dumps({"query": f"q{i}", "choices": ["a", "b", "c", "d"], "gold": 0}) for i in range(2)))
        if evil:
            z.writestr("../escape.txt", "no")
    return buf.getvalue()


@pytest.fixture(autouse=True)
def downloads_on(monkeypatch):
    # other test modules switch downloads off process-wide (e.g. HF_HUB_OFFLINE for transformers)
    monkeypatch.delenv("NANOCHAT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture
def server():
    s = FileServer({"eval_bundle.zip": bundle_zip(), "broken.zip": bundle_zip(with_core_yaml=False),
                "evil.zip": bundle_zip(evil=True), "notzip.zip": b"hello" * 100})
    yield s
    s.close()


def test_download_unpack_and_reuse(server, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", f"{server.url}/eval_bundle.zip")
    server.modes["eval_bundle.zip"] = ["503", "truncate", "ok"]
    tasks = load_bundle()  # no config given: fetches the bundle first
    assert [t["label"] for t in tasks] == ["tiny_mc"]
    assert os.path.isfile(tmp_path / "eval_bundle" / "eval_data" / "language_understanding" / "tiny.jsonl")
    assert server.hits["eval_bundle.zip"] == 3
    assert sorted(os.listdir(tmp_path)) == ["eval_bundle"]  # no temporary files left behind
    ensure_eval_bundle(str(tmp_path), backoff=0.01)  # present: no new request
    assert server.hits["eval_bundle.zip"] == 3


@pytest.mark.parametrize("name, message", [("missing.zip", "HTTP 404"), ("notzip.zip", "not a zip"),
                                           ("broken.zip", "no core.yaml"), ("evil.zip", "unsafe path")])
def test_bad_downloads_are_clear_errors(server, tmp_path, name, message):
    with pytest.raises(UserError, match=message):
        ensure_eval_bundle(str(tmp_path), url=f"{server.url}/{name}", retries=1, backoff=0.01)
    assert not os.path.exists(tmp_path / "eval_bundle")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".eval_bundle")]


def test_offline_names_path_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    with pytest.raises(UserError, match="nanochat data download --eval-bundle") as e:
        ensure_eval_bundle(str(tmp_path))
    assert str(tmp_path / "eval_bundle") in str(e.value)


def test_shared_bundle_is_used_as_is(data_dir):
    assert ensure_eval_bundle(data_dir) == os.path.join(data_dir, "eval_bundle")
