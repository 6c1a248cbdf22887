"""CORE scoring. With a character-level tokenizer and a bigram model whose logits are set by
hand, the scored spans, mean losses and decisions of each task type are computed by hand, the
way upstream nanochat's scorer defines them: multiple choice after the choices' common prefix,
schema over the options' common suffix (which may reach into the contexts), language modelling
with the delimiter's space inside the span. Also: the item order and few-shot draw (exact
indices from Python's random with seeds 1337 and 1234), no cropping of long prompts, batched
scoring equal to per-item scoring on a real GPT, stub oracles at accuracy exactly 1 and 0,
centering, missing tasks, custom bundles, the real bundle's reading, and the 2-rank torchrun
split. The `nanochat eval base` smoke run on the real tiny checkpoint is in test_eval_chat.py;
bench/core_vs_upstream.py runs upstream's own scorer beside ours."""
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import OracleLM, select_positions
from nanochat import core_eval
from nanochat.core_eval import (centered, core_summary, encode_item, evaluate_core, fewshot_indices, load_bundle,
                                render_prompts, score_sequences, score_task, scored_spans, task_subset,
                                write_core_csv)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
        prompts = render_prompts("multiple_choice", items, idx, 3, "\nAnswer: ")
        shots = fewshot_indices(len(items), idx, 3)
        header = "".join(f"{items[j]['query']}\nAnswer: {items[j]['choices'][items[j]['gold']]}\n\n" for j in shots)
        assert prompts == [f"{header}Question {idx}: pick\nAnswer: {c}" for c in items[idx]["choices"]]
        assert idx not in shots
    # scoring with few-shot: an oracle over the rendered gold options gets all right
    bos = tokenizer.get_bos_token_id()
    preferred = [tokenizer.encode(render_prompts("multiple_choice", items, i, 3, "\nAnswer: ")[items[i]["gold"]],
                                  prepend=bos) for i in range(len(items))]
    model = OracleLM(tokenizer.get_vocab_size(), preferred)
    task = {"type": "multiple_choice", "num_fewshot": 3, "delimiter": "\nAnswer: "}
    assert core_eval.evaluate_task(model, tokenizer, "cpu", task, items, list(range(8))) == 8


def test_joint_tokenization_scores_the_continuation(tokenizer):
    """The real BPE: with the " " delimiter the space merges into the choice's first token."""
    task = {"type": "multiple_choice", "num_fewshot": 0, "delimiter": " "}
    items = [{"query": "The capital of France is", "choices": ["Paris", "London"], "gold": 0}]
    bos = tokenizer.get_bos_token_id()
    seqs = encode_item(tokenizer, task, items, 0)
    assert [t for t, _ in seqs] == [tokenizer.encode(f"The capital of France is {c}", prepend=bos)
                                    for c in ("Paris", "London")]
    assert [tokenizer.decode(t[s:]) for t, s in seqs] == [" Paris", " London"]


# ---------------------------------------------------------------------------
# Hand-computed spans and decisions: one token per character, a bigram model

class CharTokenizer:
    """One token per byte and <|bos|> = 256, so every span can be counted by hand."""
    bos = 256

    def get_bos_token_id(self):
        return self.bos

    def get_vocab_size(self):
        return 257

    def encode(self, text, prepend=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        return ([] if prepend is None else [prepend]) + list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode()


CHARS = CharTokenizer()


class BigramLM(nn.Module):
    """The logits of the next token depend on the current token only: boosts[(a, b)] is the
    logit of character b after character a, every other logit is 0. Keeps every row it is fed."""

    def __init__(self, boosts, sequence_len=16):
        super().__init__()
        self.config = SimpleNamespace(sequence_len=sequence_len)
        self.table = torch.zeros(257, 257)
        for (a, b), v in boosts.items():
            self.table[ord(a), ord(b)] = v
        self.rows = []

    def forward(self, idx, logits_positions=None):
        self.rows.extend(idx.tolist())
        return select_positions(self.table[idx], logits_positions)


def hand_loss(boosts, prev, nxt):
    """-log p(nxt | prev) written out: log of the sum of exp(logits) minus the logit of nxt."""
    row = {b: v for (a, b), v in boosts.items() if a == prev}
    return math.log(257 - len(row) + sum(math.exp(v) for v in row.values())) - row.get(nxt, 0.0)


def test_multiple_choice_scores_after_the_common_prefix_of_the_choices():
    task = {"type": "multiple_choice", "num_fewshot": 0, "delimiter": " "}
    items = [{"query": "Q", "choices": ["xy", "xzz"], "gold": 0}]
    seqs = encode_item(CHARS, task, items, 0)
    # "Q xy" and "Q xzz" share <bos> "Q x", 4 tokens: only "y" and "zz" are scored
    assert [s for _, s in seqs] == [4, 4]
    assert [CHARS.decode(t[s:]) for t, s in seqs] == ["y", "zz"]
    boosts = {("x", "y"): 3.0, ("z", "z"): 10.0}
    (options,) = score_task(BigramLM(boosts), CHARS, "cpu", task, items, [0])
    a = hand_loss(boosts, "x", "y")                                    # 2.6207
    b = (hand_loss(boosts, "x", "z") + hand_loss(boosts, "z", "z")) / 2  # 2.8161
    assert options[0][0] == pytest.approx(a, abs=1e-5) and options[1][0] == pytest.approx(b, abs=1e-5)
    assert core_eval.is_correct("multiple_choice", options, 0)
    # scoring the whole choice ("xy" vs "xzz" after "Q ") would pick the longer, wrong one
    first = hand_loss(boosts, " ", "x")
    assert (first + 2 * b) / 3 < (first + a) / 2


def test_multiple_choice_ties_and_empty_spans():
    """A tie goes to the first option; a choice whose tokens are all shared with another (an
    empty span, mean nan) is never picked over an earlier number, and as the first option it is
    always picked: list.index(min(...)) with nan, as upstream decides."""
    task = {"type": "multiple_choice", "num_fewshot": 0, "delimiter": " "}
    (options,) = score_task(BigramLM({}), CHARS, "cpu", task, [{"query": "Q", "choices": ["xa", "xb"], "gold": 1}], [0])
    assert options[0][0] == options[1][0] and not core_eval.is_correct("multiple_choice", options, 1)
    items = [{"query": "Q", "choices": ["x", "xy"], "gold": 1}]
    assert [CHARS.decode(t[s:]) for t, s in encode_item(CHARS, task, items, 0)] == ["", "y"]
    (options,) = score_task(BigramLM({("x", "y"): 9.0}), CHARS, "cpu", task, items, [0])
    assert math.isnan(options[0][0]) and options[1][0] < 0.05
    assert core_eval.is_correct("multiple_choice", options, 0)
    assert core_eval.is_correct("multiple_choice", options[::-1], 0)


def test_schema_scores_the_common_suffix_even_inside_the_contexts():
    task = {"type": "schema", "num_fewshot": 0, "delimiter": " "}
    items = [{"context_options": ["Ann ate", "Bob ate"], "continuation": "it", "gold": 1}]
    seqs = encode_item(CHARS, task, items, 0)
    # "Ann ate it" and "Bob ate it" end alike over " ate it" (7 tokens): the span starts inside the contexts
    assert [s for _, s in seqs] == [4, 4]
    assert [CHARS.decode(t[s:]) for t, s in seqs] == [" ate it", " ate it"]
    boosts = {("b", " "): 5.0}
    (options,) = score_task(BigramLM(boosts), CHARS, "cpu", task, items, [0])
    rest = sum(hand_loss(boosts, p, n) for p, n in zip(" ate i", "ate it"))
    assert options[0][0] == pytest.approx((hand_loss(boosts, "n", " ") + rest) / 7, abs=1e-5)
    assert options[1][0] == pytest.approx((hand_loss(boosts, "b", " ") + rest) / 7, abs=1e-5)
    # only the span's first token tells the options apart; scoring just "it" would be a tie (-> option 0)
    assert core_eval.is_correct("schema", options, 1)


@pytest.mark.parametrize("delim", [" ", "\nAnswer: "])
def test_language_modelling_trims_the_context_and_scores_the_delimiter_space(delim):
    task = {"type": "language_modeling", "num_fewshot": 0, "delimiter": delim}
    items = [{"context": "  2+2= \n", "continuation": "4"}]
    # the context is trimmed on both sides, the prompt without the continuation too
    assert render_prompts("language_modeling", items, 0, 0, delim) == ["2+2=" + delim.rstrip(), "2+2=" + delim + "4"]
    ((toks, start),) = encode_item(CHARS, task, items, 0)
    assert CHARS.decode(toks[start:]) == " 4" and start == 1 + len("2+2=" + delim.rstrip())
    before_space = (delim.rstrip() or "=")[-1]
    # greedy decoding must produce the space too: "4" alone after it is not enough
    wrong = BigramLM({(before_space, "5"): 5.0, (" ", "4"): 5.0})
    right = BigramLM({(before_space, " "): 5.0, (" ", "4"): 5.0})
    assert core_eval.evaluate_task(wrong, CHARS, "cpu", task, items, [0]) == 0
    assert core_eval.evaluate_task(right, CHARS, "cpu", task, items, [0]) == 1
    # few-shot contexts are trimmed too
    items = [{"context": " a ", "continuation": "b"}, {"context": "c\n", "continuation": "d"}]
    assert render_prompts("language_modeling", items, 1, 1, delim)[1] == f"a{delim}b\n\nc{delim}d"


def test_language_modelling_without_a_clean_prefix_scores_after_the_common_prefix():
    """Where the stripped prompt's tokens are no prefix of the whole's (upstream stops there)."""
    without, full = [256, 1, 2, 9], [256, 1, 2, 3, 4]
    assert scored_spans("language_modeling", [without, full]) == [(full, 3)]
    assert scored_spans("language_modeling", [[256, 1, 2], [256, 1, 2]]) == [([256, 1, 2], 2)]


# ---------------------------------------------------------------------------
# Item order, few-shot draw, no cropping, batching

def test_item_order_and_fewshot_draw_follow_the_seeds():
    # random.Random(1337).shuffle(list(range(10))) gives [0, 3, 7, 2, 1, 6, 4, 5, 8, 9]
    assert task_subset(10, -1) == [0, 3, 7, 2, 1, 6, 4, 5, 8, 9]
    assert task_subset(10, 4) == [0, 3, 7, 2]  # the first 4 of the shuffle, not sorted
    assert task_subset(10, 20) == task_subset(10, 0) == task_subset(10, -1)
    # position p of the scored list: random.Random(1234 + p).sample(the other positions, k)
    assert [fewshot_indices(4, p, 2) for p in range(4)] == [[2, 1], [3, 2], [3, 1], [0, 1]]
    assert fewshot_indices(4, 0, 2) == random.Random(1234).sample([1, 2, 3], 2)


def test_prompts_come_from_the_shuffled_and_cut_list(tmp_path):
    """10 items, 2-shot, --max-per-task 4: the items scored are file items 0, 3, 7, 2 (positions
    0-3), and the shots of position p are the positions fewshot_indices(4, p, 2) of that list."""
    items = [{"context": f"c{i}", "continuation": f"v{i}"} for i in range(10)]
    cfg = write_bundle(str(tmp_path / "b"), [
        {"label": "order", "dataset_uri": "o.jsonl", "num_fewshot": [2], "icl_task_type": "language_modeling"},
    ], meta={"order": 0}, files={"o.jsonl": items})
    model = BigramLM({})
    r = evaluate_core(model, CHARS, "cpu", config_path=cfg, max_per_task=4)
    assert r["tasks"][0]["num_items"] == 4
    assert sorted(CHARS.decode(row) for row in model.rows) == sorted([
        "c7 v7\n\nc3 v3\n\nc0 v0",  # position 0 (file 0): shots at positions 2, 1 = files 7, 3
        "c2 v2\n\nc7 v7\n\nc3 v3",  # position 1 (file 3): positions 3, 2 = files 2, 7
        "c2 v2\n\nc3 v3\n\nc7 v7",  # position 2 (file 7): positions 3, 1 = files 2, 3
        "c0 v0\n\nc3 v3\n\nc2 v2",  # position 3 (file 2): positions 0, 1 = files 0, 3
    ])


def tiny_gpt(vocab_size, sequence_len=16, seed=0):
    """A random 2-layer GPT with a short attention window (8) and every weight nonzero."""
    from nanochat.gpt import GPT, GPTConfig
    cfg = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                    window_pattern="SL", short_window=8)
    torch.manual_seed(seed)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():  # the init zeroes the output projections: give attention a voice
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.size(1)))
    return model.eval()


def test_long_prompts_are_never_cropped():
    task = {"type": "multiple_choice", "num_fewshot": 0, "delimiter": " "}
    items = [{"query": "a long question " * 5, "choices": ["yes", "no"], "gold": 0}]
    model = BigramLM({}, sequence_len=8)
    core_eval.evaluate_task(model, CHARS, "cpu", task, items, [0])
    assert [len(CHARS.decode(r)) for r in model.rows] == [80 + 1 + 2, 80 + 1 + 3]  # the whole text, 10x the context
    # our GPT takes rows longer than its training context (its rotary table grows past
    # sequence_len), and its first positions do not change
    gpt = tiny_gpt(257, sequence_len=16)
    ids = torch.randint(0, 256, (1, 160))
    with torch.no_grad():
        long, short = gpt(ids), gpt(ids[:, :16])
    assert long.shape == (1, 160, 257) and torch.isfinite(long).all()
    assert torch.allclose(long[:, :16], short, atol=1e-5)
    # and the loss of a long sequence is over all of it
    toks = [256] + ids[0].tolist()
    ((loss, _),) = score_sequences(gpt, [(toks, 1)], "cpu", pad_id=256)
    with torch.no_grad():
        want = F.cross_entropy(gpt(torch.tensor([toks]))[0, :-1], torch.tensor(toks[1:])).item()
    assert loss == pytest.approx(want, abs=1e-5)


def test_batched_scoring_equals_each_item_scored_alone(tokenizer):
    """Our batches (many items' options, sorted by length) against upstream's way (one item's
    options right-padded together per forward) on a real GPT: the same mean losses (to float
    rounding) and the same decisions."""
    V = tokenizer.get_vocab_size()
    model = tiny_gpt(V)
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    pad = tokenizer.get_bos_token_id()
    for task, items in [({"type": "multiple_choice", "num_fewshot": 2, "delimiter": " "}, MC_ITEMS),
                        ({"type": "schema", "num_fewshot": 1, "delimiter": " "}, SCHEMA_ITEMS),
                        ({"type": "language_modeling", "num_fewshot": 2, "delimiter": "\nAnswer: "}, LM_ITEMS)]:
        calls.clear()
        batched = score_task(model, tokenizer, "cpu", task, items, list(range(len(items))), batch_tokens=100000)
        assert len(calls) == 1  # every option of every item in one forward
        for idx, options in enumerate(batched):
            seqs = encode_item(tokenizer, task, items, idx)
            T = max(len(t) for t, _ in seqs)
            ids = torch.tensor([t + [pad] * (T - len(t)) for t, _ in seqs])
            with torch.no_grad():
                logits = model(ids)
            losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            for r, ((t, s), (mean, exact)) in enumerate(zip(seqs, options)):
                assert mean == pytest.approx(losses[r, s - 1:len(t) - 1].mean().item(), abs=1e-5)
                assert exact == bool((logits[r, s - 1:len(t) - 1].argmax(-1) == ids[r, s:len(t)]).all())
            alone = score_task(model, tokenizer, "cpu", task, items, [idx], batch_tokens=1)
            assert [e for _, e in alone[0]] == [e for _, e in options]
            assert core_eval.is_correct(task["type"], alone[0], items[idx].get("gold")) == \
                core_eval.is_correct(task["type"], options, items[idx].get("gold"))


def test_max_per_task_and_subsample_is_deterministic(tokenizer, tmp_path):
    items = [{"context": f"Number {i} is", "continuation": str(i)} for i in range(30)]
    cfg = write_bundle(str(tmp_path / "b"), [
        {"label": "nums", "dataset_uri": "n.jsonl", "num_fewshot": [2], "icl_task_type": "language_modeling"},
    ], meta={"nums": 0}, files={"n.jsonl": items})
    bos = tokenizer.get_bos_token_id()
    scored = [items[i] for i in task_subset(30, 7)]
    preferred = [tokenizer.encode(render_prompts("language_modeling", scored, i, 2, " ")[1], prepend=bos)
                 for i in range(7)]
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
            # every item renders for its type
            assert render_prompts(t["type"], items, 0, t["num_fewshot"], t["delimiter"])


def test_distributed_core_matches_single_process(tokenizer, tmp_path):
    """2 ranks under torchrun (gloo) split the items and all-reduce the counts."""
    cfg = three_task_bundle(tmp_path)
    single = evaluate_core(oracle_for(tokenizer, "mc", MC_ITEMS, " ", lambda it: it["gold"]), tokenizer, "cpu",
                           config_path=cfg)
    oracle = oracle_for(tokenizer, "mc", MC_ITEMS, " ", lambda it: it["gold"])
    (tmp_path / "preferred.json").write_text(json.dumps(oracle.preferred))
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, torch.distributed as dist
        sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
        from helpers import OracleLM
        from nanochat.core_eval import evaluate_core
        from nanochat.tokenizer import get_tokenizer
        dist.init_process_group("gloo")
        tok = get_tokenizer()
        oracle = OracleLM(tok.get_vocab_size(), json.load(open({str(tmp_path / 'preferred.json')!r})))
        r = evaluate_core(oracle, tok, "cpu", config_path={cfg!r})
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
