import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.common import UserError
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, capped_texts, get_token_bytes

ROUND_TRIP = [
    "", "hello world", "Hello, World! 1234567890 3.14159",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇯🇵", "CJK 你好，世界。日本語のテキスト。한국어 문장",
    "def f(x):\n    return x ** 2  # square\n\n\tif x: pass\n",
    "   leading and trailing spaces   ", "\n\n\n\t\t  \r\n", "a" * 5000, "naïve café Ωμέγα",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.get_vocab_size() for i in ids)
    assert tokenizer.decode(ids) == text


def test_batch_encode_and_prepend_append(tokenizer):
    texts = ["one", "two three", ""]
    bos = tokenizer.get_bos_token_id()
    batch = tokenizer.encode(texts, prepend="<|bos|>", append=bos, num_threads=2)
    assert batch == [[bos] + tokenizer.encode(t) + [bos] for t in texts]
    assert tokenizer.encode("x", prepend=bos)[0] == bos


def test_special_tokens(tokenizer):
    n = tokenizer.get_vocab_size()
    ids = [tokenizer.encode_special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(n - len(SPECIAL_TOKENS), n))
    assert tokenizer.get_bos_token_id() == ids[0]
    for s, i in zip(SPECIAL_TOKENS, ids):
        assert tokenizer.id_to_token(i) == s
        assert tokenizer.decode([i]) == s
    with pytest.raises(ValueError):
        tokenizer.encode_special("<|nope|>")


def test_special_strings_in_text_stay_text(tokenizer):
    text = "ignore this <|assistant_end|> and <|bos|> please"
    ids = tokenizer.encode(text)
    specials = set(range(tokenizer.get_vocab_size() - len(SPECIAL_TOKENS), tokenizer.get_vocab_size()))
    assert not specials & set(ids)
    assert tokenizer.decode(ids) == text


def test_token_bytes(tokenizer):
    tb = get_token_bytes()
    assert tb.shape == (tokenizer.get_vocab_size(),)
    assert all(tb[tokenizer.encode_special(s)] == 0 for s in SPECIAL_TOKENS)
    for i in [0, 65, 255, 300, 700, tokenizer.get_vocab_size() - 10]:
        assert tb[i] == len(tokenizer.enc.decode_single_token_bytes(i))
    # summing token bytes gives the byte length of the text (the basis of bits per byte)
    text = "The quick brown fox — 速い"
    assert sum(tb[i].item() for i in tokenizer.encode(text)) == len(text.encode())


def _spans(tok, ids, mask):
    """The decoded text of the maximal mask==1 runs."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_render_simple_masks(tokenizer):
    conv = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                         {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    ids, mask = tokenizer.render_conversation(conv)
    assert len(ids) == len(mask)
    assert ids[0] == tokenizer.get_bos_token_id() and mask[0] == 0
    assert _spans(tokenizer, ids, mask) == ["Hello!<|assistant_end|>", "4<|assistant_end|>"]
    text = tokenizer.decode(ids)
    assert text == ("<|bos|><|user_start|>Hi there<|user_end|><|assistant_start|>Hello!<|assistant_end|>"
                    "<|user_start|>2+2?<|user_end|><|assistant_start|>4<|assistant_end|>")
    # assistant_start is never trained on
    a_start = tokenizer.encode_special("<|assistant_start|>")
    assert all(m == 0 for i, m in zip(ids, mask) if i == a_start)


def test_render_tool_parts(tokenizer):
    conv = {"messages": [
        {"role": "user", "content": "What is 12*13?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "12*13"},
            {"type": "python_output", "text": "156"},
            {"type": "text", "text": " The answer is 156."},
        ]}]}
    ids, mask = tokenizer.render_conversation(conv)
    assert tokenizer.decode(ids).endswith(
        "<|assistant_start|>Let me compute. <|python_start|>12*13<|python_end|><|output_start|>156<|output_end|>"
        " The answer is 156.<|assistant_end|>")
    assert _spans(tokenizer, ids, mask) == [
        "Let me compute. <|python_start|>12*13<|python_end|>", " The answer is 156.<|assistant_end|>"]


def test_render_system_merge(tokenizer):
    conv = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hey"}]}
    ids, mask = tokenizer.render_conversation(conv)
    assert tokenizer.decode(ids).startswith("<|bos|><|user_start|>Be brief.\n\nHi<|user_end|>")
    assert _spans(tokenizer, ids, mask) == ["Hey<|assistant_end|>"]


def test_render_truncation(tokenizer):
    conv = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok " * 200}]}
    full, full_mask = tokenizer.render_conversation(conv, max_tokens=100000)
    ids, mask = tokenizer.render_conversation(conv, max_tokens=50)
    assert len(ids) == len(mask) == 50
    assert ids == full[:50] and mask == full_mask[:50]


@pytest.mark.parametrize("messages", [
    [{"role": "assistant", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}],
    [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
    [{"role": "system", "content": "s"}],
    [],
])
def test_render_bad_roles(tokenizer, messages):
    with pytest.raises(ValueError):
        tokenizer.render_conversation({"messages": messages})


def test_render_for_completion(tokenizer):
    conv = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]}
    ids = tokenizer.render_for_completion(conv)
    assert tokenizer.decode(ids) == "<|bos|><|user_start|>Hi<|user_end|><|assistant_start|>"
    assert tokenizer.render_for_completion({"messages": conv["messages"][:1]}) == ids


def test_visualize(tokenizer):
    ids, mask = tokenizer.render_conversation({"messages": [{"role": "user", "content": "a"},
                                                            {"role": "assistant", "content": "b"}]})
    plain = tokenizer.visualize(ids, mask, color=False)
    assert "[b]" in plain and "[<|assistant_end|>]" in plain and "<|user_start|>" in plain
    assert "\033[92m" in tokenizer.visualize(ids, mask)


def test_train_exact_vocab_size(data_dir, tmp_path):
    from nanochat.dataset import iter_texts
    tok = Tokenizer.train(capped_texts(iter_texts("train", data_dir=data_dir), 300_000, 5000), 600)
    assert tok.get_vocab_size() == 600
    assert len(tok.mergeable_ranks) == 600 - len(SPECIAL_TOKENS)
    tok.save(str(tmp_path))
    again = Tokenizer.load(str(tmp_path))
    text = "It was the best of times, it was the worst of times."
    assert again.encode(text) == tok.encode(text)
    assert len(tok.encode(text)) < len(text.encode())  # merges actually compress


def test_train_vocab_too_small():
    with pytest.raises(UserError, match="too small"):
        Tokenizer.train(iter(["hello world"] * 10), 200)


def test_train_text_too_small_for_vocab():
    with pytest.raises(UserError, match="merges"):
        Tokenizer.train(iter(["ab ab ab"]), 5000)


def run_cli(*args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "nanochat", *args], capture_output=True, text=True, env=e, timeout=300)


def test_cli_help_and_unknown_verb():
    r = run_cli("--help")
    assert r.returncode == 0 and "tokenizer train" in r.stdout and "serve" in r.stdout
    r = run_cli("frobnicate")
    assert r.returncode == 2 and "unknown verb 'frobnicate'" in r.stderr
    r = run_cli("tokenizer", "fly")
    assert r.returncode == 2 and "unknown command" in r.stderr
    r = run_cli("tokenizer", "train", "--help")
    assert r.returncode == 0 and "--vocab-size" in r.stdout


def test_cli_tokenizer_train_and_eval(tmp_path):
    # a small shard folder made from real text, so the command runs quickly
    from nanochat.dataset import iter_texts
    shards = tmp_path / "shards"
    shards.mkdir()
    docs = list(capped_texts(iter_texts("train"), 400_000, 4000))
    for i, part in enumerate([docs[: len(docs) // 2], docs[len(docs) // 2:]]):
        pq.write_table(pa.table({"text": part}), shards / f"shard_{i:05d}.parquet")
    base = tmp_path / "base"
    r = run_cli("tokenizer", "train", "--vocab-size", "700", "--data-dir", str(shards),
                env={"NANOCHAT_BASE_DIR": str(base)})
    assert r.returncode == 0, r.stderr
    assert "vocab size 700" in r.stdout
    assert (base / "tokenizer" / "merges.tiktoken").exists() and (base / "tokenizer" / "token_bytes.pt").exists()
    r = run_cli("tokenizer", "eval", env={"NANOCHAT_BASE_DIR": str(base)})
    assert r.returncode == 0, r.stderr
    for name in ["val shard", "chat", "code", "math", "non-English"]:
        assert name in r.stdout


def test_cli_tokenizer_errors(tmp_path):
    base = {"NANOCHAT_BASE_DIR": str(tmp_path / "base")}
    r = run_cli("tokenizer", "train", "--vocab-size", "100", **{"env": base})
    assert r.returncode == 1 and "too small" in r.stderr and "Traceback" not in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("tokenizer", "train", "--data-dir", str(empty), env=base)
    assert r.returncode == 1 and "no pretraining shards" in r.stderr
    blank = tmp_path / "blank"
    blank.mkdir()
    pq.write_table(pa.table({"text": ["", ""]}), blank / "shard_00000.parquet")
    r = run_cli("tokenizer", "train", "--data-dir", str(blank), env=base)
    assert r.returncode == 1 and "no text" in r.stderr
    r = run_cli("tokenizer", "eval", env={"NANOCHAT_BASE_DIR": str(tmp_path / "nothing")})
    assert r.returncode == 1 and "nanochat tokenizer train" in r.stderr


def test_reference_encodings_never_fetched_when_offline(monkeypatch, tmp_path):
    """With downloads off, tokenizer eval uses only tiktoken's cache: no fetch is even attempted."""
    import tiktoken.load

    from nanochat.stages.tokenizer_eval import load_reference
    calls = []
    monkeypatch.setattr(tiktoken.load, "read_file", lambda blobpath: calls.append(blobpath) or b"")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    assert load_reference("gpt2") is None and load_reference("cl100k_base") is None
    assert calls == []
    assert tiktoken.load.read_file.__name__ == "<lambda>"  # the original fetcher is put back


def test_openmp_does_not_spin_by_default():
    code = "import os, nanochat, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # an explicit setting wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ACTIVE"
