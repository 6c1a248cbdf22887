"""`nanochat export hf`: the exported folder loads with plain transformers (offline, remote code)
and gives nanochat's logits, greedy tokens, token ids and chat rendering.

transformers, tokenizers and safetensors are required (the dev extra installs them): a missing
package is a failure, not a skip."""
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"  # everything below must work without the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# remote code is copied into a modules cache: keep it in the session's temp folder, not in ~/.cache
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(os.environ["NANOCHAT_BASE_DIR"], "hf_modules"))

import pytest
import torch
import transformers  # noqa: F401  (ImportError here = failure: CI installs it with the dev extra)
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanochat import checkpoint as ck
from nanochat import models
from nanochat.cli import main as cli_main
from nanochat.engine import reference_generate
from nanochat.gpt import GPT, GPTConfig

# GQA (4 heads, 2 kv heads), 3 layers (value embeddings on layers 0 and 2 only), a short window
# of 8 tokens on layers 0 and 1 (prompts below are longer), the last layer full
TINY = dict(sequence_len=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL", short_window=8)

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Emoji: 😀🎉👍🏽 and flags 🇫🇷, family 👨‍👩‍👧",
    "中文测试：你好，世界。日本語のテキスト、한국어 텍스트",
    "def f(x):\n    return x ** 2  # square\n\n\tif a != b: print('tab')\r\n",
    "numbers 12345678 3.14159 1,000,000 and   many    spaces\n\n\n  end ",
    "Ünïcödé àccents, Ελληνικά, русский, العربية",
    "",
    " ",
    "'s 't 're 've 'm 'll 'd I'M YOU'RE",
]


@contextlib.contextmanager
def base_dir(path):
    """Run nanochat code against a private NANOCHAT_BASE_DIR (our checkpoints stay out of the
    session's folder, where other tests look for the largest sft/base model)."""
    old = os.environ["NANOCHAT_BASE_DIR"]
    os.environ["NANOCHAT_BASE_DIR"] = path
    try:
        yield path
    finally:
        os.environ["NANOCHAT_BASE_DIR"] = old


def random_model(vocab_size, seed=0):
    """A GPT whose every parameter is random (nanochat's init zeroes the output projections and
    the smear, which would hide mistakes in the attention and MLP branches and in the smear); the
    smear and backout are strong."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, **TINY)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambdas"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 1.0 / p.size(-1) ** 0.5)
        model.smear_lambda.fill_(1.2)
        model.backout_lambda.fill_(0.3)
    return model.eval()


def test_the_random_model_exercises_smear_backout_and_gates(env):
    """Each of them changes the logits, so the matches below check the remote code's version."""
    model, ids = env["model"], torch.randint(0, 100, (1, 20))
    with torch.no_grad():
        ref = model(ids)
        for name, value in (("smear_lambda", 0.0), ("backout_lambda", 0.0), ("blocks.2.attn.ve_gate.weight", 0.0)):
            p = model.get_parameter(name)
            saved = p.clone()
            p.fill_(value)
            assert (model(ids) - ref).abs().max() > 1e-2, name
            p.copy_(saved)


@pytest.fixture(scope="module")
def env(tokenizer):
    """A private base dir holding the session tokenizer, a random sft checkpoint (tag d3, step
    7) and its export in `out`."""
    root = tempfile.mkdtemp(prefix="nanochat-export-")
    shutil.copytree(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "tokenizer"), os.path.join(root, "tokenizer"))
    with base_dir(root):
        model = random_model(tokenizer.get_vocab_size())
        meta = dict(model_config=dataclasses.asdict(model.config), user_config={"note": "random test model"})
        ck.save_checkpoint(ck.checkpoint_dir("sft", "d3"), 7, model.state_dict(), None, meta)
        out = os.path.join(root, "export")
        assert cli_main(["export", "hf", "--out", out]) == 0  # default source: sft
    yield dict(root=root, out=out, model=model, tokenizer=tokenizer)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def hf(env):
    model = AutoModelForCausalLM.from_pretrained(env["out"], trust_remote_code=True, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(env["out"], local_files_only=True)
    return model.eval(), tok


def test_folder(env):
    out, tok = env["out"], env["tokenizer"]
    for name in ("config.json", "model.safetensors", "configuration_nanochat.py", "modeling_nanochat.py",
                 "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "nanochat"
    assert config["architectures"] == ["NanochatForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nanochat.NanochatForCausalLM"
    for k, v in dataclasses.asdict(env["model"].config).items():
        assert config[k] == v, k
    assert config["vocab_size"] == tok.get_vocab_size()
    assert config["bos_token_id"] == tok.get_bos_token_id()
    assert config["eos_token_id"] == tok.encode_special("<|assistant_end|>")  # a chat (sft) model
    assert config["torch_dtype"] == "float32"
    with open(os.path.join(out, "README.md")) as f:
        card = f.read()
    assert "trust_remote_code=True" in card and "sft" in card and "step 7" in card
    # the remote code needs nothing but torch and transformers
    for name in ("configuration_nanochat.py", "modeling_nanochat.py"):
        with open(os.path.join(out, name)) as f:
            imports = [line for line in f if line.startswith(("import ", "from "))]
        assert all(line.split()[1].split(".")[0] in ("torch", "transformers", "") for line in imports), imports


def reference_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def test_logits_match(env, hf):
    model, tok = env["model"], env["tokenizer"]
    hf_model, _ = hf
    prompts = [tok.encode(t, prepend="<|bos|>")[:60] for t in TEXTS[:4]] + [[tok.get_bos_token_id()]]
    assert max(len(p) for p in prompts) > 2 * TINY["short_window"]  # the windows matter
    for ids in prompts:
        want = reference_logits(model, ids)
        with torch.no_grad():
            got = hf_model(torch.tensor([ids])).logits[0]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # the loss: HF's labels are the inputs (shifted inside), nanochat's targets are the next tokens
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        want = model(ids[:, :-1], targets=ids[:, 1:])
        got = hf_model(ids, labels=ids).loss
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_left_padding_and_cache(env, hf):
    """A left-padded batch gives each row its own logits; feeding tokens one by one through the
    cache gives the full forward's logits (windows included)."""
    model, tok = env["model"], env["tokenizer"]
    hf_model, _ = hf
    a = tok.encode(TEXTS[0], prepend="<|bos|>")[:30]
    b = tok.encode(TEXTS[2], prepend="<|bos|>")[:12]
    pad = len(a) - len(b)
    ids = torch.tensor([a, [0] * pad + b])
    mask = torch.tensor([[1] * len(a), [0] * pad + [1] * len(b)])
    with torch.no_grad():
        out = hf_model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[0], reference_logits(model, a), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1, pad:], reference_logits(model, b), atol=1e-4, rtol=0)

    with torch.no_grad():
        step = hf_model(torch.tensor([a[:5]]), use_cache=True)
        cache, logits = step.past_key_values, [step.logits[0]]
        for t in a[5:]:
            step = hf_model(torch.tensor([[t]]), past_key_values=cache, use_cache=True)
            logits.append(step.logits[0])
    torch.testing.assert_close(torch.cat(logits), reference_logits(model, a), atol=1e-4, rtol=0)

    # the smear's previous token given explicitly (what generate() does), a chunk at a time, and
    # a left-padded batch continued through its cache
    with torch.no_grad():
        step = hf_model(torch.tensor([a[:7]]), use_cache=True)
        got = hf_model(torch.tensor([a[7:11]]), past_key_values=step.past_key_values, use_cache=True,
                       prev_token_ids=torch.tensor([[a[6]]])).logits[0]
        torch.testing.assert_close(got, reference_logits(model, a)[7:11], atol=1e-4, rtol=0)
        step = hf_model(ids[:, :-3], attention_mask=mask[:, :-3], use_cache=True)
        got = hf_model(ids[:, -3:], attention_mask=mask, past_key_values=step.past_key_values, use_cache=True).logits
    torch.testing.assert_close(got[0], reference_logits(model, a)[-3:], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1], reference_logits(model, b)[-3:], atol=1e-4, rtol=0)
    # a cache that does not know the previous token: refused, not silently unsmeared
    with torch.no_grad():
        cache = hf_model(torch.tensor([a[:5]]), use_cache=True).past_key_values
        del cache.nanochat_last_token
        with pytest.raises(ValueError, match="prev_token_ids"):
            hf_model(torch.tensor([a[5:6]]), past_key_values=cache, use_cache=True)


def stop_at(tokens, stops):
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i + 1]
    return tokens


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_greedy(env, hf, use_cache):
    model, tok = env["model"], env["tokenizer"]
    hf_model, _ = hf
    stops = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    prompts = [tok.encode(TEXTS[0], prepend="<|bos|>")[:10],
               tok.render_for_completion({"messages": [{"role": "user", "content": "What is 2+2?"}]})]
    for ids in prompts:
        want = stop_at(list(reference_generate(model, ids, 24, temperature=0)), stops)
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=24, use_cache=use_cache)
        assert out[0, :len(ids)].tolist() == ids
        assert out[0, len(ids):].tolist() == want
        assert len(ids) + len(want) > TINY["short_window"]


def test_generate_batch_left_padded(env, hf):
    model, tok = env["model"], env["tokenizer"]
    hf_model, hf_tok = hf
    texts = ["The quick brown fox jumps over", "Hi"]
    stops = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    hf_tok.padding_side = "left"
    batch = hf_tok(texts, return_tensors="pt", padding=True)
    out = hf_model.generate(**batch, do_sample=False, max_new_tokens=12)
    width = batch["input_ids"].size(1)
    for row, text in zip(out.tolist(), texts):
        want = stop_at(list(reference_generate(model, tok.encode(text, prepend="<|bos|>"), 12, temperature=0)), stops)
        assert row[width:width + len(want)] == want


def test_tokenizer_matches(env, hf, data_dir):
    from nanochat.dataset import iter_texts
    tok = env["tokenizer"]
    _, hf_tok = hf
    docs = []
    for doc in iter_texts("val", data_dir=data_dir):
        docs.append(doc[:3000])
        if len(docs) == 30:
            break
    bos = tok.get_bos_token_id()
    for text in TEXTS + docs:
        ids = tok.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids, text[:80]
        assert hf_tok(text)["input_ids"] == [bos] + ids  # documents start with <|bos|>
        assert hf_tok.decode(ids) == tok.decode(ids)
    for name in tok.get_special_tokens():
        assert hf_tok.convert_tokens_to_ids(name) == tok.encode_special(name)
    # the one documented difference: transformers reads special-token strings in text as the
    # special tokens (the chat template relies on it); nanochat's encode() never does
    text = "a <|user_start|> b"
    a, b = tok.encode("a "), tok.encode(" b")
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == a + [tok.encode_special("<|user_start|>")] + b
    assert len(hf_tok) == tok.get_vocab_size()
    assert hf_tok.bos_token_id == bos and hf_tok.eos_token_id == tok.encode_special("<|assistant_end|>")


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 👋 你好"}],
    [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "No.\nWhy?"},
     {"role": "user", "content": "Please!"}],
    [{"role": "user", "content": "What is 12*13?"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me compute: "},
                                       {"type": "python", "text": "12*13"},
                                       {"type": "python_output", "text": "156"},
                                       {"type": "text", "text": " So it is 156."}]}],
]


def chat_ids(hf_tok, messages, add_generation_prompt):
    out = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_chat_template(env, hf):
    tok = env["tokenizer"]
    _, hf_tok = hf
    for messages in CONVERSATIONS:
        conv = {"messages": messages}
        assert chat_ids(hf_tok, messages, True) == tok.render_for_completion(conv)
        if messages[-1]["role"] == "assistant" or len(messages) % 2 == 1:
            assert chat_ids(hf_tok, messages, False) == tok.render_conversation(conv, max_tokens=10**9)[0]
    with pytest.raises(Exception, match="alternate"):
        hf_tok.apply_chat_template([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}])


def test_bfloat16_export(env, hf):
    """--dtype bfloat16 stores bf16 weights; loaded in fp32 they give nanochat's logits for the
    same weights rounded to bf16."""
    from safetensors import safe_open
    out = os.path.join(env["root"], "export-bf16")
    with base_dir(env["root"]):
        assert cli_main(["export", "hf", "-i", "sft", "--model-tag", "d3", "--step", "7", "--out", out,
                         "--dtype", "bfloat16"]) == 0
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    rounded = random_model(env["tokenizer"].get_vocab_size())
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    hf_model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, local_files_only=True,
                                                    torch_dtype=torch.float32)
    ids = env["tokenizer"].encode(TEXTS[3], prepend="<|bos|>")[:40]
    with torch.no_grad():
        got = hf_model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, reference_logits(rounded, ids), atol=1e-4, rtol=0)


def test_trained_base_checkpoint(base_checkpoint, tmp_path):
    """The real tiny base model of the session, exported by the CLI: same logits and greedy tokens;
    a base model's eos is <|bos|> (the start of the next document)."""
    from nanochat.tokenizer import get_tokenizer
    out = str(tmp_path / "base")
    assert cli_main(["export", "hf", "-i", "base", "--model-tag", base_checkpoint.tag, "--out", out]) == 0
    model, tok, _ = models.load_model("base", "cpu", model_tag=base_checkpoint.tag)
    hf_model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, local_files_only=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok.eos_token_id == tok.get_bos_token_id() == hf_model.config.eos_token_id
    batch = hf_tok("The history of the city", return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    assert ids == tok.encode("The history of the city", prepend="<|bos|>")
    with torch.no_grad():
        torch.testing.assert_close(hf_model(**batch).logits[0], reference_logits(model, ids), atol=1e-4, rtol=0)
    want = stop_at(list(reference_generate(model, ids, 16, temperature=0)), {tok.get_bos_token_id()})
    got = hf_model.generate(**batch, do_sample=False, max_new_tokens=16)[0, len(ids):].tolist()
    assert got == want
    assert get_tokenizer() is tok


def test_cli_errors(env, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["export", "hf"])  # --out is required
    assert e.value.code == 2
    assert "--out" in capsys.readouterr().err
    with base_dir(env["root"]):
        # the export folder is not empty: refused without --force, nothing touched
        before = os.path.getmtime(os.path.join(env["out"], "model.safetensors"))
        assert cli_main(["export", "hf", "--out", env["out"]]) == 1
        assert "--force" in capsys.readouterr().err
        assert os.path.getmtime(os.path.join(env["out"], "model.safetensors")) == before
        assert cli_main(["export", "hf", "-i", "rl", "--out", os.path.join(env["root"], "x")]) == 1
        assert "no rl checkpoints" in capsys.readouterr().err
        assert cli_main(["export", "hf", "--model-tag", "d99", "--out", os.path.join(env["root"], "x")]) == 1
        assert "d99" in capsys.readouterr().err
        assert cli_main(["export", "hf", "--step", "3", "--out", os.path.join(env["root"], "x")]) == 1
        assert "no step 3" in capsys.readouterr().err
        assert not os.path.exists(os.path.join(env["root"], "x"))
        # --force writes into the non-empty folder and keeps files that are not ours
        with open(os.path.join(env["out"], "notes.txt"), "w") as f:
            f.write("mine")
        assert cli_main(["export", "hf", "--out", env["out"], "--force"]) == 0
        assert os.path.exists(os.path.join(env["out"], "notes.txt"))
