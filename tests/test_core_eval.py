"""CORE scoring with stub models whose preferences are constructed, so the right accuracy is
known: each task type at accuracy exactly 1 and exactly 0, centering, the missing-task path,
few-shot sampling, left truncation, --max-per-task, a custom bundle, and the real bundle's
reading, and the 2-rank torchrun split. The `nanochat eval base` smoke run on the real tiny
checkpoint is in test_eval_chat.py."""
import json
import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from nanochat import core_eval
from nanochat.core_eval import (centered, core_summary, encode_option, evaluate_core, fewshot_indices, load_bundle,
                                render_texts, score_sequences, write_core_csv)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class OracleLM(nn.Module):
    """A causal stub: after any prefix of one of the `preferred` token sequences it puts a logit
    of 20 on that sequence's next token (0 elsewhere); after any other prefix every token is
    equally likely. So a preferred continuation costs ~0 nats per token, anything else ~log V."""

    def __init__(self, vocab_size, preferred, sequence_len=256):
        super().__init__()
        self.config = SimpleNamespace(sequence_len=sequence_len)
        self.vocab_size = vocab_size
        self.dummy = nn.Parameter(torch.zeros(()))
        self.next = {}
        for seq in preferred:
            for i in range(len(seq) - 1):
                self.next[tuple(seq[:i + 1])] = seq[i + 1]
        self.rows_seen = []  # batch sizes of the forwards, to check batching

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.shape
        self.rows_seen.append(B)
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            row = idx[b].tolist()
            for t in range(T):
                nxt = self.next.get(tuple(row[:t + 1]))
                if nxt is not None:
                    logits[b, t, nxt] = 20.0
        return logits


MC_ITEMS = [
    {"query": "The sky on a clear day is", "choices": ["blue", "made of cheese", "underground"], "gold": 0},
    {"query": "Water freezes at zero degrees", "choices": ["Fahrenheit always", "Celsius"], "gold": 1},
    {"query": "A cat says", "choices": ["woof woof", "quack", "meow", "moo"], "gold": 2},
    {"query": "Two plus two is", "choices": ["four", "seven"], "gold": 0},
]
SCHEMA_ITEMS = [
    {"context_options": ["The trophy did not fit in the suitcase because the trophy",
                         "The trophy did not fit in the suitcase because the suitcase"],
     "continuation": "was too big.", "gold": 0},
    {"context_options": ["Anna lent money to Mary because Anna", "Anna lent money to Mary because Mary"],
     "continuation": "needed it.", "gold": 1},
    {"context_options": ["The dog chased the cat, so the dog", "The dog chased the cat, so the cat"],
     "continuation": "ran up a tree.", "gold": 1},
]
LM_ITEMS = [
    {"context": "The capital of France is", "continuation": "Paris"},
    {"context": "Roses are red, violets are", "continuation": "blue"},
    {"context": "One, two, three,", "continuation": "four, five"},
]


def write_bundle(root, tasks, meta=None, files=None):
    """A bundle in the standard layout: core.yaml, eval_meta_data.csv, eval_data/<uri>."""
    os.makedirs(root, exist_ok=True)
    lines = ["icl_tasks:"]
    for t in tasks:
        lines.append("-")
        for k, v in t.items():
            lines.append(f"  {k}: {json.dumps(v)}")
    with open(os.path.join(root, "core.yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if meta is not None:
        with open(os.path.join(root, "eval_meta_data.csv"), "w") as f:
            f.write("Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n")
            for label, b in meta.items():
                f.write(f"{label},x,y,0,0,{b},,\"a task, with a comma\"\n")
    for uri, items in (files or {}).items():
        p = os.path.join(root, "eval_data", uri)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            for it in items:
                f.write(json.dumps(it) + "\n")
    return os.path.join(root, "core.yaml")


def zero_shot_texts(kind, item, delim):
    """The texts a 0-shot item must be scored on, written out by hand (not via render_texts)."""
    if kind == "mc":
        return [item["query"] + delim + c for c in item["choices"]]
    if kind == "schema":
        return [c + delim + item["continuation"] for c in item["context_options"]]
    return [item["context"] + delim + item["continuation"]]


def oracle_for(tokenizer, kind, items, delim, pick, sequence_len=256):
    """An oracle that prefers option pick(item) of every item."""
    bos = tokenizer.get_bos_token_id()
    preferred = [tokenizer.encode(zero_shot_texts(kind, it, delim)[pick(it)], prepend=bos) for it in items]
    return OracleLM(tokenizer.get_vocab_size(), preferred, sequence_len)


def three_task_bundle(tmp_path, delim=" "):
    return write_bundle(str(tmp_path / "bundle"), [
        {"label": "my_mc", "dataset_uri": "a/mc.jsonl", "num_fewshot": [0], "icl_task_type": "multiple_choice",
         "continuation_delimiter": delim},
        {"label": "my_schema", "dataset_uri": "a/schema.jsonl", "num_fewshot": [0], "icl_task_type": "schema",
         "continuation_delimiter": delim},
        {"label": "my_lm", "dataset_uri": "b/lm.jsonl", "num_fewshot": [0], "icl_task_type": "language_modeling",
         "continuation_delimiter": delim},
    ], meta={"my_mc": 25, "my_schema": 50, "my_lm": 0},
        files={"a/mc.jsonl": MC_ITEMS, "a/schema.jsonl": SCHEMA_ITEMS, "b/lm.jsonl": LM_ITEMS})


@pytest.mark.parametrize("delim", [" ", "\nAnswer: "])
def test_each_task_type_scores_exactly_one_or_zero(tokenizer, tmp_path, delim):
    cfg = three_task_bundle(tmp_path, delim)
    cases = [("mc", "my_mc", MC_ITEMS), ("schema", "my_schema", SCHEMA_ITEMS), ("lm", "my_lm", LM_ITEMS)]
    for kind, label, items in cases:
        right = oracle_for(tokenizer, kind, items, delim, lambda it: it.get("gold", 0))
        r = evaluate_core(right, tokenizer, "cpu", config_path=cfg)
        assert r["accuracy"][label] == 1.0, (kind, r["accuracy"])
        if kind == "lm":
            # prefers a different continuation: greedy decoding cannot reproduce the right one
            wrong_items = [dict(it, continuation=it["continuation"] + " and more") for it in items]
            wrong = oracle_for(tokenizer, kind, wrong_items, delim, lambda it: 0)
            wrong_items2 = [dict(it, continuation="zzz") for it in items]
            wrong2 = oracle_for(tokenizer, kind, wrong_items2, delim, lambda it: 0)
            assert evaluate_core(wrong2, tokenizer, "cpu", config_path=cfg)["accuracy"][label] == 0.0
            # an oracle for a longer continuation still reproduces the exact prefix: correct
            assert evaluate_core(wrong, tokenizer, "cpu", config_path=cfg)["accuracy"][label] == 1.0
        else:
            n_opts = "choices" if kind == "mc" else "context_options"
            wrong = oracle_for(tokenizer, kind, items, delim, lambda it: (it["gold"] + 1) % len(it[n_opts]))
            assert evaluate_core(wrong, tokenizer, "cpu", config_path=cfg)["accuracy"][label] == 0.0


def test_centering_and_core_mean(tokenizer, tmp_path):
    assert centered(0.25, 0.25) == 0.0 and centered(1.0, 0.62) == 1.0
    assert abs(centered(0.5, 0.25) - 1 / 3) < 1e-12 and centered(0.0, 0.5) == -1.0
    cfg = three_task_bundle(tmp_path)
    # the MC oracle is right on MC, and knows nothing about schema/LM items
    model = oracle_for(tokenizer, "mc", MC_ITEMS, " ", lambda it: it["gold"])
    r = evaluate_core(model, tokenizer, "cpu", config_path=cfg)
    assert r["accuracy"]["my_mc"] == 1.0 and r["centered"]["my_mc"] == 1.0
    assert r["accuracy"]["my_lm"] == 0.0 and r["centered"]["my_lm"] == 0.0
    acc_s = r["accuracy"]["my_schema"]
    assert abs(r["centered"]["my_schema"] - (acc_s - 0.5) / 0.5) < 1e-12
    assert abs(r["core"] - (1.0 + 0.0 + (acc_s - 0.5) / 0.5) / 3) < 1e-12
    assert r["num_tasks"] == 3 and r["num_available"] == 3 and r["missing"] == []
    assert [t["baseline"] for t in r["tasks"]] == [0.25, 0.5, 0.0]


def test_missing_task_listed_and_skipped(tokenizer, tmp_path):
    root = str(tmp_path / "b")
    cfg = write_bundle(root, [
        {"label": "my_mc", "dataset_uri": "mc.jsonl", "num_fewshot": 0, "icl_task_type": "multiple_choice"},
        {"label": "gone", "dataset_uri": "nowhere/gone.jsonl", "num_fewshot": 0, "icl_task_type": "language_modeling"},
    ], meta={"my_mc": 25}, files={"mc.jsonl": MC_ITEMS})
    model = oracle_for(tokenizer, "mc", MC_ITEMS, " ", lambda it: it["gold"])
    r = evaluate_core(model, tokenizer, "cpu", config_path=cfg)
    assert r["missing"] == ["gone"] and r["num_tasks"] == 2 and r["num_available"] == 1
    assert r["core"] == 1.0 and "gone" not in r["accuracy"]
    line = core_summary(r)
    assert line.startswith("CORE over 1/2 tasks: 1.0000") and "missing: gone" in line
    out = tmp_path / "core.csv"
    write_core_csv(r, str(out))
    rows = out.read_text().splitlines()
    assert rows[0] == "task,type,num_items,accuracy,centered,baseline"
    assert rows[1].startswith("my_mc,multiple_choice,4,1.000000,1.000000,0.250000")
    assert rows[2].startswith("gone,missing")


def test_custom_bundle_without_eval_data_or_meta(tokenizer, tmp_path):
    """Task files next to core.yaml, no meta csv: the baseline is the expected guess accuracy."""
    root = tmp_path / "mine"
    root.mkdir()
    (root / "core.yaml").write_text("icl_tasks:\n- label: own\n  dataset_uri: own.jsonl\n"
                                    "  num_fewshot: [0]\n  icl_task_type: multiple_choice\n")
    (root / "own.jsonl").write_text("".join(json.dumps(it) + "\n" for it in MC_ITEMS))
    model = oracle_for(tokenizer, "mc", MC_ITEMS, " ", lambda it: it["gold"])
    r = evaluate_core(model, tokenizer, "cpu", config_path=str(root / "core.yaml"))
    b = sum(1 / len(it["choices"]) for it in MC_ITEMS) / len(MC_ITEMS)
    assert r["accuracy"]["own"] == 1.0 and abs(r["tasks"][0]["baseline"] - b) < 1e-12


def test_bad_config_is_a_user_error(tmp_path):
    from nanochat.common import UserError
    with pytest.raises(UserError, match="not found"):
        load_bundle(str(tmp_path / "nope.yaml"))
    (tmp_path / "bad.yaml").write_text("icl_tasks:\n- label: x\n  dataset_uri: x.jsonl\n  icl_task_type: essay\n")
    with pytest.raises(UserError, match="essay"):
        load_bundle(str(tmp_path / "bad.yaml"))


def test_fewshot_never_the_item_and_deterministic():
    for n, k in [(5, 10), (50, 10), (2, 3), (1, 5)]:
        for idx in range(n):
            a = fewshot_indices(n, idx, k)
            assert idx not in a and len(a) == min(k, n - 1) and len(set(a)) == len(a)
            assert a == fewshot_indices(n, idx, k)
    # different items get different draws (not one fixed list)
    assert len({tuple(fewshot_indices(100, i, 5)) for i in range(20)}) > 15


def test_fewshot_rendering_uses_gold_answers_and_scores(tokenizer):
    items = [{"query": f"Question {i}: pick", "choices": [f"alpha{i}", f"beta{i}", f"gamma{i}"], "gold": i % 3}
             for i in range(8)]
    for idx in range(len(items)):
        opts = render_texts("multiple_choice", items, idx, 3, "\nAnswer: ")
        prefix = opts[0][0]
        shots = fewshot_indices(len(items), idx, 3)
        for j in shots:
            s = items[j]
            assert f"{s['query']}\nAnswer: {s['choices'][s['gold']]}\n\n" in prefix
        assert f"Question {idx}:" not in prefix[:-len(items[idx]["query"]) - len("\nAnswer: ")]
        assert prefix.endswith(f"Question {idx}: pick\nAnswer: ")
        assert [full for _, full in opts] == [prefix + c for c in items[idx]["choices"]]
    # scoring with few-shot: an oracle over the rendered gold options gets all right
    bos = tokenizer.get_bos_token_id()
    preferred = [tokenizer.encode(render_texts("multiple_choice", items, i, 3, "\nAnswer: ")[items[i]["gold"]][1],
                                  prepend=bos) for i in range(len(items))]
    model = OracleLM(tokenizer.get_vocab_size(), preferred)
    task = {"type": "multiple_choice", "num_fewshot": 3, "delimiter": "\nAnswer: "}
    assert core_eval.evaluate_task(model, tokenizer, "cpu", task, items, list(range(8)), 256) == 8


def test_joint_tokenization_scores_the_continuation(tokenizer):
    bos = tokenizer.get_bos_token_id()
    # " " delimiter: the space merges into the continuation's first token in the joint encoding
    toks, start = encode_option(tokenizer, "The capital of France is ", "The capital of France is Paris", 64)
    assert toks == tokenizer.encode("The capital of France is Paris", prepend=bos)
    assert tokenizer.decode(toks[start:]).strip() == "Paris" and tokenizer.decode(toks[start:]).endswith("Paris")
    assert tokenizer.decode(toks[1:start]).rstrip() == "The capital of France is"
    # one option a prefix of another: both still score at least their own tokens
    t1, s1 = encode_option(tokenizer, "A pet: ", "A pet: dog", 64)
    t2, s2 = encode_option(tokenizer, "A pet: ", "A pet: dogs", 64)
    assert s1 < len(t1) and s2 < len(t2) and tokenizer.decode(t2[s2:]).strip() == "dogs"


def test_left_truncation_keeps_the_continuation(tokenizer):
    bos = tokenizer.get_bos_token_id()
    context = "Once upon a time there was a very long story that went on and on. " * 20
    cont = "The end of it all."
    full_ids = tokenizer.encode(context + cont, prepend=bos)
    assert len(full_ids) > 40
    toks, start = encode_option(tokenizer, context, context + cont, 32)
    assert len(toks) == 32 and toks[0] == bos
    assert toks[1:] == full_ids[-31:]
    assert tokenizer.decode(toks[start:]).endswith(cont) and tokenizer.decode(toks[start:]).strip() == cont
    # and end-to-end with a short model window: the oracle over the truncated text still wins
    items = [{"query": context + f"Item {i} ends with", "choices": ["a bang.", "a whimper."], "gold": i % 2}
             for i in range(4)]
    preferred = [encode_option(tokenizer, it["query"] + " ", it["query"] + " " + it["choices"][it["gold"]], 32)[0]
                 for it in items]
    model = OracleLM(tokenizer.get_vocab_size(), preferred, sequence_len=32)
    task = {"type": "multiple_choice", "num_fewshot": 0, "delimiter": " "}
    assert core_eval.evaluate_task(model, tokenizer, "cpu", task, items, list(range(4)), 32) == 4


def test_batched_scoring_packs_items_and_matches_one_by_one(tokenizer):
    torch.manual_seed(0)
    V = tokenizer.get_vocab_size()

    class CausalStub(nn.Module):
        """Logits at t depend on tokens 0..t only (a running mean of embeddings): padding after a
        row must not change it."""
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, 16)
            self.head = nn.Linear(16, V)
            self.calls = 0

        def forward(self, idx):
            self.calls += 1
            h = self.emb(idx).cumsum(1) / torch.arange(1, idx.size(1) + 1).view(1, -1, 1)
            return self.head(h)

    model = CausalStub()
    seqs = [encode_option(tokenizer, p, f, 128) for it in MC_ITEMS for p, f in render_texts("multiple_choice",
                                                                                         MC_ITEMS, MC_ITEMS.index(it),
                                                                                         2, " ")]
    together = score_sequences(model, seqs, "cpu", batch_tokens=100000)
    assert model.calls == 1  # every option of every item in one forward
    model.calls = 0
    alone = score_sequences(model, seqs, "cpu", batch_tokens=1)
    assert model.calls == len(seqs)
    for (la, ea), (lb, eb) in zip(together, alone):
        assert abs(la - lb) < 1e-5 and ea == eb


def test_max_per_task_and_subsample_is_deterministic(tokenizer, tmp_path):
    items = [{"context": f"Number {i} is", "continuation": str(i)} for i in range(30)]
    cfg = write_bundle(str(tmp_path / "b"), [
        {"label": "nums", "dataset_uri": "n.jsonl", "num_fewshot": [2], "icl_task_type": "language_modeling"},
    ], meta={"nums": 0}, files={"n.jsonl": items})
    bos = tokenizer.get_bos_token_id()
    preferred = [tokenizer.encode(render_texts("language_modeling", items, i, 2, " ")[0][1], prepend=bos)
                 for i in range(30)]
    model = OracleLM(tokenizer.get_vocab_size(), preferred)
    r = evaluate_core(model, tokenizer, "cpu", config_path=cfg, max_per_task=7)
    assert r["tasks"][0]["num_items"] == 7 and r["accuracy"]["nums"] == 1.0
    assert evaluate_core(model, tokenizer, "cpu", config_path=cfg)["tasks"][0]["num_items"] == 30


def test_real_bundle_reads(data_dir):
    tasks = load_bundle()
    assert len(tasks) == 22
    by = {t["label"]: t for t in tasks}
    assert by["hellaswag_zeroshot"]["baseline"] == 0.25 and by["boolq"]["baseline"] == 0.62
    assert by["winograd"]["type"] == "schema" and by["jeopardy"]["delimiter"] == "\nAnswer: "
    assert by["arc_easy"]["num_fewshot"] == 10 and by["copa"]["delimiter"] == " "
    missing = sorted(t["label"] for t in tasks if not os.path.isfile(t["path"]))
    assert missing == ["coqa", "squad"]
    for t in tasks:
        if os.path.isfile(t["path"]):
            items = core_eval.load_items(t["path"])
            # every item renders and encodes for its type
            assert render_texts(t["type"], items, 0, t["num_fewshot"], t["delimiter"])


def test_distributed_core_matches_single_process(tokenizer, tmp_path):
    """2 ranks under torchrun (gloo) split the items and all-reduce the counts."""
    cfg = three_task_bundle(tmp_path)
    single = evaluate_core(oracle_for(tokenizer, "mc", MC_ITEMS, " ", lambda it: it["gold"]), tokenizer, "cpu",
                           config_path=cfg)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, torch.distributed as dist
        sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
        from test_core_eval import oracle_for, MC_ITEMS
        from nanochat.core_eval import evaluate_core
        from nanochat.tokenizer import get_tokenizer
        dist.init_process_group("gloo")
        tok = get_tokenizer()
        r = evaluate_core(oracle_for(tok, "mc", MC_ITEMS, " ", lambda it: it["gold"]), tok, "cpu", config_path={cfg!r})
        json.dump(r, open({str(tmp_path)!r} + f"/out{{dist.get_rank()}}.json", "w"))
        dist.destroy_process_group()
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for rank in range(2):
        r = json.load(open(tmp_path / f"out{rank}.json"))
        assert r["accuracy"] == single["accuracy"] and math.isclose(r["core"], single["core"])
        assert [t["num_items"] for t in r["tasks"]] == [4, 3, 3]


def test_eval_base_custom_core_config_cli(base_checkpoint, base_dir, tmp_path):
    """`nanochat eval base --eval core --core-config` on the real tiny checkpoint, with a bundle in
    tmp (one task file missing); and a bad --eval value is a clean error."""
    cfg = write_bundle(str(tmp_path / "mine"), [
        {"label": "my_mc", "dataset_uri": "mc.jsonl", "num_fewshot": [1], "icl_task_type": "multiple_choice"},
        {"label": "my_lm", "dataset_uri": "lm.jsonl", "num_fewshot": [1], "icl_task_type": "language_modeling"},
        {"label": "absent", "dataset_uri": "absent.jsonl", "num_fewshot": [0], "icl_task_type": "schema"},
    ], meta={"my_mc": 30}, files={"mc.jsonl": MC_ITEMS, "lm.jsonl": LM_ITEMS})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "nanochat", "eval", "base", "--eval", "core", "--core-config", cfg,
                        "--device-type", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CORE over 2/3 tasks" in r.stdout and "missing: absent" in r.stdout
    assert "my_mc" in r.stdout and "my_lm" in r.stdout
    csvs = [f for f in os.listdir(os.path.join(base_dir, "eval")) if f.startswith("core_base_")]
    text = open(os.path.join(base_dir, "eval", sorted(csvs)[-1])).read()
    assert "my_mc,multiple_choice,4," in text and "absent,missing" in text and ",0.300000" in text
    bad = subprocess.run([sys.executable, "-m", "nanochat", "eval", "base", "--eval", "core,vibes"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "vibes" in bad.stderr and "Traceback" not in bad.stderr
