"""`nanochat chat` as a user runs it: a subprocess on a saved checkpoint (-p once, interactive
multi-turn with clear/quit, EOF, bad flags). The replies are checked against the engine's greedy
output for the same conversation, computed here in-process."""
import dataclasses
import os
import subprocess
import sys

import pytest

from helpers import make_model
from nanochat.checkpoint import checkpoint_dir, save_checkpoint
from nanochat.models import load_model
from nanochat.engine import Engine


@pytest.fixture(scope="module")
def sft_checkpoint(tokenizer):
    model = make_model(tokenizer.get_vocab_size(), seed=5, sequence_len=256)
    d = checkpoint_dir("sft", "d2chat")
    save_checkpoint(d, 7, model.state_dict(), None, {"model_config": dataclasses.asdict(model.config)})
    return d


def chat(args, stdin="", env=None):
    return subprocess.run([sys.executable, "-m", "nanochat", "chat", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, env=env or os.environ.copy())


def expected_reply(messages, max_tokens):
    model, tokenizer, _ = load_model("sft", "cpu", model_tag="d2chat")
    prompt = tokenizer.render_for_completion({"messages": messages})
    results, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=max_tokens, temperature=0)
    return tokenizer.decode(results[0][len(prompt):])


def test_prompt_once(sft_checkpoint):
    r = chat(["-p", "What is 12*13?", "-t", "0", "--max-tokens", "20", "--model-tag", "d2chat"])
    assert r.returncode == 0, r.stderr
    want = expected_reply([{"role": "user", "content": "What is 12*13?"}], 20)
    assert want.strip()
    assert r.stdout == want + "\n"


def test_interactive_history_clear_quit(sft_checkpoint):
    stdin = "hello\nhow are you?\nclear\nhow are you?\nquit\nnever read\n"
    r = chat(["-i", "sft", "-t", "0", "--max-tokens", "12"], stdin)
    assert r.returncode == 0, r.stderr
    first = expected_reply([{"role": "user", "content": "hello"}], 12)
    second = expected_reply([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                             {"role": "user", "content": "how are you?"}], 12)
    fresh = expected_reply([{"role": "user", "content": "how are you?"}], 12)
    out = r.stdout
    assert "(conversation cleared)" in out
    before, after = out.split("(conversation cleared)")
    assert f"nanochat: {first}\n" in before
    assert f"nanochat: {second}\n" in before  # the second turn saw the first one
    assert f"nanochat: {fresh}\n" in after    # after clear, no history
    assert out.count("nanochat: ") == 3       # three replies, nothing after quit


def test_eof_exits_cleanly(sft_checkpoint):
    r = chat(["-t", "0", "--max-tokens", "4"], "hello\n")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr


def test_bad_input(sft_checkpoint, tmp_path):
    r = chat(["-t", "5", "-p", "x"])
    assert r.returncode == 1 and "temperature" in r.stderr and "Traceback" not in r.stderr
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path))
    r = chat(["-p", "x"], env=env)
    assert r.returncode == 1 and "checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_tiny_temperature_is_greedy_not_a_traceback(sft_checkpoint):
    """-t 1e-300 is in range; it used to underflow to NaN probabilities and crash in
    torch.multinomial. It means greedy, and is answered like -t 0."""
    r = chat(["-p", "What is 12*13?", "-t", "1e-300", "--max-tokens", "12", "--model-tag", "d2chat"])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stdout == expected_reply([{"role": "user", "content": "What is 12*13?"}], 12) + "\n"
