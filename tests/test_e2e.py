"""End to end: the README's first command, runs/runcpu.sh, at its smallest settings (RUNCPU_TINY=1:
vocab 1,024, depth 2, a few steps per stage), in a fresh base dir of its own. Then the artifacts
it must leave (tokenizer, four checkpoints, eval files, report card with its summary table and
pictures), a one-shot `nanochat chat -p`, and `nanochat serve` answering one OpenAI request.
Everything is the real thing: real shell script, real subprocesses, real HTTP on 127.0.0.1."""
import base64
import glob
import json
import math
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["base", "mid", "sft", "rl"]
CHAT_ROWS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    """Run runs/runcpu.sh once (about a minute on a free 2-core CPU). Its base dir is a folder of its
    own, so the session's other checkpoints (the `base_checkpoint` fixture's d2) cannot mix in."""
    root = tmp_path_factory.mktemp("e2e")
    base = root / "base"
    work = root / "cwd"   # report generate copies report.md into the current directory
    work.mkdir()
    # `nanochat` on PATH must be this interpreter's nanochat, whatever venv the suite runs in
    shim = root / "bin"
    shim.mkdir()
    (shim / "nanochat").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m nanochat "$@"\n')
    (shim / "nanochat").chmod(0o755)
    env = dict(os.environ)
    env.update(NANOCHAT_BASE_DIR=str(base), NANOCHAT_DATA=data_dir, RUNCPU_TINY="1", SKIP_SETUP="1",
               OMP_NUM_THREADS="1",  # tiny models gain nothing from threads on a shared CPU
               PATH=f"{shim}{os.pathsep}{env.get('PATH', '')}")
    t0 = time.time()
    p = subprocess.run(["bash", os.path.join(REPO, "runs", "runcpu.sh")], cwd=work, env=env,
                       capture_output=True, text=True, timeout=1100)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"runs/runcpu.sh failed (exit {p.returncode}):\n{out[-6000:]}"
    return {"base": str(base), "cwd": str(work), "env": env, "out": out, "seconds": time.time() - t0}


def _summary_table(text):
    """{metric: {column: cell}} from the report card's '## Summary' table."""
    section = text.split("## Summary", 1)[1]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    table = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        table[cells[0]] = dict(zip(head[1:], cells[1:]))
    return head, table


def _is_number(cell):
    try:
        return math.isfinite(float(cell))
    except ValueError:
        return False


def test_script_runs_every_stage_in_order(run):
    stages = re.findall(r"^=== \[[0-9:]+ \+\d+s\] (.*)$", run["out"], flags=re.M)
    assert [s.split(":")[0] for s in stages[:-1]] == [
        "report reset", "tokenizer", "pretraining", "base model evaluation", "mid-training",
        "chat evaluation of the mid-trained model", "SFT", "chat evaluation of the SFT model",
        "RL on GSM8K", "chat evaluation of the RL model", "report card"]
    assert stages[-1].startswith("done in")
    assert "nanochat chat -i sft" in run["out"] and "nanochat serve" in run["out"]
    assert "Traceback" not in run["out"]


def test_artifacts(run):
    base = run["base"]
    for name in ["merges.tiktoken", "tokenizer.json", "token_bytes.pt"]:
        assert os.path.getsize(os.path.join(base, "tokenizer", name)) > 0, name
    for stage in STAGES:
        d = os.path.join(base, "checkpoints", stage, "d2")
        metas = sorted(glob.glob(os.path.join(d, "meta_*.json")))
        assert metas, f"no {stage} checkpoint in {d}"
        step = int(os.path.basename(metas[-1])[5:11])
        assert step > 0
        assert os.path.getsize(os.path.join(d, f"model_{step:06d}.pt")) > 100_000
        with open(metas[-1]) as f:
            meta = json.load(f)
        assert meta["model_config"]["n_layer"] == 2 and meta["model_config"]["vocab_size"] == 1024
        assert os.path.getsize(os.path.join(d, "metrics.jsonl")) > 0
    # the chain: each stage started from the one before it
    for stage, source in [("mid", "base"), ("sft", "mid"), ("rl", "sft")]:
        meta_path = sorted(glob.glob(os.path.join(base, "checkpoints", stage, "d2", "meta_*.json")))[-1]
        with open(meta_path) as f:
            assert json.load(f)["source"]["stage"] == source, f"{stage} did not start from {source}"
    # evaluation outputs
    csvs = glob.glob(os.path.join(base, "eval", "core_base_d2_step*.csv"))
    assert len(csvs) == 1
    with open(csvs[0]) as f:
        rows = f.read().splitlines()
    assert rows[0] == "task,type,num_items,accuracy,centered,baseline"
    assert len(rows) > 20 and any(r.startswith("CORE") for r in rows)
    for source in ["mid", "sft", "rl"]:
        with open(os.path.join(base, "eval", f"chat_{source}.json")) as f:
            res = json.load(f)
        assert set(res["tasks"]) == set(CHAT_ROWS[:-1])
        assert all(t["num_problems"] == 2 for t in res["tasks"].values())


def test_base_training_lowered_the_loss(run):
    rows = [json.loads(ln) for ln in open(os.path.join(run["base"], "checkpoints", "base", "d2", "metrics.jsonl"))]
    bpb = [r["val_bpb"] for r in rows if r.get("val_bpb") is not None]
    assert len(bpb) >= 2 and bpb[-1] < bpb[0] - 0.1, f"val bpb did not fall: {bpb}"


def test_report_card(run):
    path = os.path.join(run["base"], "report", "report.md")
    with open(path) as f:
        text = f.read()
    with open(os.path.join(run["cwd"], "report.md")) as f:
        assert f.read() == text  # the copy in the current directory
    for section in ["## Environment", "## Tokenizer training", "## Base model training", "## Base model evaluation",
                    "## Midtraining", "## Chat SFT", "## Chat RL", "## Chat evaluation sft", "## Chat evaluation rl"]:
        assert section in text, section
    head, table = _summary_table(text)
    assert head == ["Metric", "BASE", "MID", "SFT", "RL"]
    assert _is_number(table["CORE"]["BASE"])
    for row in CHAT_ROWS:
        for col in ["MID", "SFT", "RL"]:
            assert _is_number(table[row][col]), (row, col, table[row][col])
        assert table[row]["BASE"] == "-"  # no chat eval of the base model in this run
    assert re.search(r"Total wall clock time: \d+h\d+m", text)
    pictures = re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    assert pictures, "no embedded picture"
    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)


EXPECTED_REPLY = """
from nanochat.models import load_model
from nanochat.engine import Engine
model, tokenizer, _ = load_model("sft", "cpu")
prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "What is 12*13?"}]})
results, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=32, temperature=0.6, top_k=50, seed=42)
print(tokenizer.decode(results[0][len(prompt):]))
"""


def test_chat_prompt(run):
    """`nanochat chat -p` on the pipeline's SFT model (the default source) prints exactly the reply
    the Engine samples for that prompt with chat's defaults (temperature 0.6, top-k 50, seed 42)."""
    p = subprocess.run([sys.executable, "-m", "nanochat", "chat", "-p", "What is 12*13?", "--max-tokens", "32"],
                       cwd=run["cwd"], env=run["env"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    want = subprocess.run([sys.executable, "-c", EXPECTED_REPLY], cwd=run["cwd"], env=run["env"],
                          capture_output=True, text=True, timeout=300)
    assert want.returncode == 0, want.stderr[-3000:]
    assert want.stdout.strip() and p.stdout == want.stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_openai_request(run):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nanochat", "serve", "-i", "rl", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=run["cwd"], env=run["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        health = None
        while time.time() < deadline:
            assert proc.poll() is None, f"serve exited early:\n{proc.stdout.read()[-3000:]}"
            try:
                health = requests.get(url + "/health", timeout=2)
                if health.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        assert health is not None and health.status_code == 200, "serve never became healthy"
        assert health.json()["status"] == "ok"
        r = requests.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "nanochat-rl", "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "What is 12*13?"}]})
        assert r.status_code == 200, r.text
        body = r.json()
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
        assert 1 <= body["usage"]["completion_tokens"] <= 16
        assert body["usage"]["prompt_tokens"] > 5
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
