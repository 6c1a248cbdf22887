"""The task datasets on the real offline files (../shared/data), their scoring, the spelling and
identity generators, CustomJSON, and mixtures."""
import gzip
import json
import os

import pytest

from nanochat.chat_data import Mixture
from nanochat.common import UserError
from tasks.arc import ARC
from tasks.common import Task, check_conversation, content_text, render_mc
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K, annotated_to_parts, extract_answer, extract_answer_strict
from tasks.humaneval import HumanEval, build_program, build_program_strict, extract_code, leading_imports
from tasks.identity import DEFAULT_PERSONA, IdentityConversations
from tasks.mmlu import MMLU
from tasks.spellingbee import SimpleSpelling, SpellingBee, final_number, load_words, words_path


@pytest.fixture(autouse=True)
def _offline(monkeypatch, data_dir):
    # The shared data is complete: a test that reached for the network would be a bug.
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")


# ---------------------------------------------------------------------------
# Loaders: exact row counts from ../shared/data/README.md

@pytest.mark.parametrize("subset,split,n", [
    ("ARC-Easy", "train", 2251), ("ARC-Easy", "validation", 570), ("ARC-Easy", "test", 2376),
    ("ARC-Challenge", "train", 1119), ("ARC-Challenge", "validation", 299), ("ARC-Challenge", "test", 1172),
])
def test_arc_counts_and_format(subset, split, n):
    task = ARC(subset, split)
    assert len(task) == n and task.eval_type == "categorical"
    for i in range(0, n, 97):
        ex = task[i]
        assert check_conversation(ex["messages"]) is None
        gold = ex["messages"][-1]["content"]
        row = task.rows[i]
        assert ex["letters"] == row["choices"]["label"] and gold == row["answerKey"]
        # the gold choice's text is printed right before "=" and the gold label
        gold_text = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
        assert f"\n- {gold_text}={gold}\n" in ex["messages"][0]["content"]


def test_arc_known_item_and_numeric_labels():
    task = ARC("ARC-Easy", "test")
    ex = task[0]
    assert "photosynthesis is the foundation of most food webs" in ex["messages"][0]["content"]
    assert ex["messages"][-1]["content"] == "A"
    # ARC-Easy test item 14 is labelled 1..4: kept as it is (as upstream renders it)
    row = task.rows[14]
    assert row["choices"]["label"] == ["1", "2", "3", "4"]
    ex = task[14]
    assert ex["letters"] == ["1", "2", "3", "4"] and ex["messages"][-1]["content"] == row["answerKey"]
    assert f"- {row['choices']['text'][0]}=1\n" in ex["messages"][0]["content"]
    assert task.evaluate(ex, row["answerKey"]) and not task.evaluate(ex, "5")


@pytest.mark.parametrize("split,n", [("dev", 285), ("validation", 1542), ("test", 14079)])
def test_mmlu_counts_and_gold_letter(split, n):
    task = MMLU("all", split)
    assert len(task) == n and task.eval_type == "categorical"
    for i in range(0, n, 211):
        ex = task[i]
        assert check_conversation(ex["messages"]) is None
        assert ex["letters"] == ["A", "B", "C", "D"]
        assert ex["messages"][-1]["content"] == "ABCD"[task.rows[i]["answer"]]


def test_mmlu_first_test_item():
    ex = MMLU("all", "test")[0]
    assert "Q(sqrt(2), sqrt(3), sqrt(18))" in ex["messages"][0]["content"]
    assert ex["messages"][-1]["content"] == "B"  # answer 1 -> "4"
    assert "\n- 4=B\n" in ex["messages"][0]["content"]
    assert ex["messages"][0]["content"].startswith("Multiple Choice question: Find the degree")  # no subject prefix


def test_categorical_evaluate():
    ex = MMLU("all", "dev")[0]
    gold = ex["messages"][-1]["content"]
    wrong = next(letter for letter in ex["letters"] if letter != gold)
    task = MMLU("all", "dev")
    for good in (gold, f" {gold}", f"{gold}.", f"({gold})", f"{gold}) because"):
        assert task.evaluate(ex, good), good
    for bad in (wrong, "", "I think", gold.lower() + "x"):
        assert not task.evaluate(ex, bad), bad


def test_render_mc_exact_string():
    """Upstream nanochat's format, character for character: the choice, '=', the letter."""
    text = render_mc("Which is red?", ["A", "B", "C"], ["grass", "blood", " sky "])
    assert text == ("Multiple Choice question: Which is red?\n"
                    "- grass=A\n"
                    "- blood=B\n"
                    "-  sky =C\n"
                    "\n"
                    "Respond only with the letter of the correct answer.")


def test_mc_item_renders_to_exact_tokens(tokenizer):
    """A real MMLU item through the chat template: BOS, <|user_start|>, the prompt's tokens,
    <|user_end|>, <|assistant_start|>, then the single answer-letter token (trained on) and
    <|assistant_end|>; the completion prompt stops right after <|assistant_start|>."""
    ex = MMLU("all", "test")[0]
    text = ex["messages"][0]["content"]
    assert text == (
        "Multiple Choice question: Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "- 0=A\n- 4=B\n- 2=C\n- 6=D\n\nRespond only with the letter of the correct answer.")
    sp = tokenizer.encode_special
    ids, mask = tokenizer.render_conversation(ex)
    prompt = [tokenizer.get_bos_token_id(), sp("<|user_start|>")] + tokenizer.encode(text) + \
        [sp("<|user_end|>"), sp("<|assistant_start|>")]
    assert ids == prompt + tokenizer.encode("B") + [sp("<|assistant_end|>")]
    assert len(tokenizer.encode("B")) == 1
    assert mask == [0] * len(prompt) + [1, 1]
    # the point of "choice=letter" with no space: each letter in the prompt is the very token the
    # assistant answers with (" A" would be another token)
    text_ids = tokenizer.encode(text)
    for letter in "ABCD":
        want = [tokenizer.encode("=")[0], tokenizer.encode(letter)[0]]
        assert any(text_ids[k:k + 2] == want for k in range(len(text_ids) - 1)), letter
    assert tokenizer.render_for_completion(ex) == prompt


@pytest.mark.parametrize("split,n", [("train", 7473), ("test", 1319)])
def test_gsm8k_counts_and_parts(split, n):
    task = GSM8K("main", split)
    assert len(task) == n and task.eval_type == "generative"
    for i in range(0, n, 101):
        ex = task[i]
        assert check_conversation(ex["messages"]) is None
        parts = ex["messages"][-1]["content"]
        # the parts are the reference answer, annotations turned into tool call + output
        rebuilt = ""
        for k, part in enumerate(parts):
            if part["type"] == "text":
                rebuilt += part["text"]
            elif part["type"] == "python":
                assert parts[k + 1]["type"] == "python_output"
                rebuilt += f"<<{part['text']}={parts[k + 1]['text']}>>"
        assert rebuilt.replace(" ", "") == task.rows[i]["answer"].replace(" ", "")
        assert "<<" not in content_text([p for p in parts if p["type"] == "text"])
        # the reference scores itself correct
        assert task.evaluate(ex, task.rows[i]["answer"])


def test_gsm8k_annotation_to_parts():
    parts = annotated_to_parts("Natalia sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.\n#### 72")
    assert parts == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips.\nIn all 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72.\n#### 72"},
    ]
    assert annotated_to_parts("no tools here #### 3") == [{"type": "text", "text": "no tools here #### 3"}]


@pytest.mark.parametrize("text,want", [
    ("so #### 72", "72"),
    ("#### 1,234", "1234"),
    ("#### 1,234,567.5", "1234567.5"),
    ("#### -5", "-5"),
    ("#### $18", "18"),
    ("#### $ 2,000.50", "2000.50"),
    ("#### 0.25", "0.25"),
    ("#### 72.", "72"),
    ("####72", "72"),
    ("first #### 3 then #### 4", "4"),
    ("The answer is 72", None),
    ("#### ", None),
    ("", None),
])
def test_gsm8k_extract_answer(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize("text,want", [
    ("so #### 72", "72"),
    ("#### 1,234", "1234"),
    ("#### 72.", "72."),          # the dot is part of the match
    ("#### 72.00", "72.00"),
    ("#### $18", None),           # no digit right after "#### "
    ("####72", None),             # exactly one space
    ("#### -5", "-5"),
    ("first #### 3 then #### 4", "3"),  # the first one
    ("The answer is 72", None),
])
def test_gsm8k_extract_answer_strict(text, want):
    assert extract_answer_strict(text) == want


def test_gsm8k_evaluate_strict_and_lenient():
    strict, lenient = GSM8K("main", "test"), GSM8K("main", "test", lenient=True)
    ex = strict[0]
    assert strict.rows[0]["answer"].endswith("#### 18")
    both = ["blah\n#### 18", "#### 18\nthat's it", "#### 1,8"]  # commas are dropped by both
    only_lenient = ["#### 18.", "#### 18.00", "#### $18", "####18", "#### 3 no wait #### 18"]
    only_strict = ["#### 18 no wait #### 3"]   # strict reads the first answer, lenient the last
    neither = ["#### 19", "The answer is 18", "#### -18"]
    for resp in both:
        assert strict.evaluate(ex, resp) and lenient.evaluate(ex, resp), resp
    for resp in only_lenient:
        assert lenient.evaluate(ex, resp) and not strict.evaluate(ex, resp), resp
    for resp in only_strict:
        assert strict.evaluate(ex, resp) and not lenient.evaluate(ex, resp), resp
    for resp in neither:
        assert not strict.evaluate(ex, resp) and not lenient.evaluate(ex, resp), resp
    assert strict.reward(ex, "#### 18") == 1.0 and strict.reward(ex, "#### 18.0") == 0.0
    assert lenient.reward(ex, "#### 18.0") == 1.0


# ---------------------------------------------------------------------------
# HumanEval

def test_humaneval_count_and_format():
    task = HumanEval()
    assert len(task) == 164 and task.eval_type == "generative"
    ex = task[0]
    assert check_conversation(ex["messages"]) is None
    assert ex["entry_point"] == "has_close_elements"


def test_humaneval_extract_code():
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"
    assert extract_code("Here:\n```python\nx = 1\n```\nbye") == "x = 1\n"
    assert extract_code("```\ny = 2\n```") == "y = 2\n"
    two = "```python\nimport os\n```\nand\n```python\ndef g(a):\n    return a\n```"
    assert extract_code(two, "g") == "def g(a):\n    return a\n"
    assert extract_code("```python\ndef g(a):\n    return a\n", "g") == "def g(a):\n    return a\n"  # unclosed


@pytest.mark.parametrize("index", [0, 2, 53, 163])
def test_humaneval_canonical_passes_wrong_fails(index):
    strict, lenient = HumanEval(), HumanEval(lenient=True)
    ex = strict[index]
    row = strict.rows[index]
    full = row["prompt"] + row["canonical_solution"]
    for task in (strict, lenient):
        assert task.evaluate(ex, full)                                 # whole function, raw
        assert task.evaluate(ex, f"Sure!\n```python\n{full}\n```\n")   # fenced
        assert task.evaluate(ex, ex["messages"][-1]["content"])        # the reference answer
        assert not task.evaluate(ex, row["prompt"] + "    return None\n")
        assert not task.evaluate(ex, "this is not code")
    assert lenient.evaluate(ex, row["canonical_solution"])             # body only: lenient appends it to the prompt
    assert not strict.evaluate(ex, row["canonical_solution"])          # strict runs it as it is


def test_humaneval_strict_program_assembly():
    prompt = "from typing import List\n# helper\nimport math\n\n\ndef f(xs: List[int]) -> int:\n    import os\n"
    assert leading_imports(prompt) == "from typing import List\nimport math"  # stops at the first def
    fenced = "Here you go:\n```python\ndef f(xs):\n    return 1\n```\nand\n```\ndef g():\n    pass\n```"
    assert build_program_strict(prompt, fenced) == "from typing import List\nimport math\n\ndef f(xs):\n    return 1\n"
    # no closed ```/```python block: the whole completion, stripped (fence markers and all)
    assert build_program_strict(prompt, "  def f(xs):\n    return 2\n\n") == \
        "from typing import List\nimport math\n\ndef f(xs):\n    return 2\n"
    assert build_program_strict(prompt, "```py\ndef f(xs):\n    return 3\n```").endswith("```py\ndef f(xs):\n    return 3\n```\n")
    assert build_program_strict(prompt, "```python\ndef f(xs):\n    return 4\n").endswith("\n\n```python\ndef f(xs):\n    return 4\n")


def test_humaneval_strict_and_lenient_differ_on_concrete_completions():
    """Completions the lenient assembly accepts and upstream's (strict) rejects."""
    strict, lenient = HumanEval(), HumanEval(lenient=True)
    ex = strict[0]
    row = strict.rows[0]
    full = row["prompt"] + row["canonical_solution"]
    helper_first = f"```python\nimport math\n```\nThen:\n```python\n{full}\n```"  # the first block defines nothing
    cases = {"```py fence": f"```py\n{full}\n```", "unclosed fence": f"```python\n{full}",
             "the defining block is not the first": helper_first, "body only": row["canonical_solution"]}
    for name, resp in cases.items():
        assert lenient.evaluate(ex, resp), name
        assert not strict.evaluate(ex, resp), name


OLD_MARKER = "__nanochat_humaneval_passed__"  # what the previous grader looked for in stdout
WRONG = "def has_close_elements(numbers, threshold):\n    return True\n"
CHEATS = {
    "print the marker and exit 0": f"import sys\nprint({OLD_MARKER!r})\nsys.exit(0)\n" + WRONG,
    "marker from atexit, then exit 0": "import atexit, os\n"
        f"atexit.register(lambda: (print({OLD_MARKER!r}, flush=True), os._exit(0)))\n" + WRONG,
    "marker from excepthook, then exit 0": "import sys, os\n"
        f"sys.excepthook = lambda *a: (print({OLD_MARKER!r}, flush=True), os._exit(0))\n" + WRONG,
    "os._exit(0) before the tests": "import os\nos._exit(0)\n" + WRONG,
    "exit(0) from inside the function": "import sys\ndef has_close_elements(numbers, threshold):\n    sys.exit(0)\n",
    "always-equal object": "class Eq:\n    def __eq__(self, other):\n        return True\n"
        "def has_close_elements(numbers, threshold):\n    return Eq()\n",
    "always-equal bool subclass": "class B(int):\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = int.__hash__\ndef has_close_elements(numbers, threshold):\n    return B(1)\n",
    "redefine check": WRONG + "def check(candidate):\n    pass\n",
    "patch builtins": "import builtins\nbuiltins.AssertionError = type('X', (BaseException,), {})\n" + WRONG,
    "spray fake replies on every fd": "import os\nfor fd in range(3, 64):\n    try:\n"
        "        os.write(fd, b'[\"ok\", true]\\n' * 50)\n    except OSError:\n        pass\n" + WRONG,
}


@pytest.mark.parametrize("cheat", sorted(CHEATS))
def test_humaneval_wrong_solutions_cannot_fake_a_pass(cheat):
    """The attacks that passed the previous grader (its marker was printed by the program the
    completion ran in): the checker, a process the completion never runs in, decides alone."""
    task = HumanEval()
    ex = task[0]
    assert not task.evaluate(ex, CHEATS[cheat]), cheat
    row = task.rows[0]
    assert task.evaluate(ex, row["prompt"] + row["canonical_solution"])


def test_humaneval_completion_that_breaks_cleanup_costs_one_item():
    """A completion that nests 1,500 directories made the old cleanup raise RecursionError,
    aborting the whole `eval chat`: now it is just a failed item."""
    task = HumanEval()
    ex = task[0]
    code = ("import os\npath = 'd'\nfor i in range(1500):\n    os.mkdir(path)\n    path += '/d'\n"
            "def has_close_elements(numbers, threshold):\n    return False\n")
    assert task.evaluate(ex, code) is False


def test_humaneval_program_has_imports_and_no_tests():
    task = HumanEval()
    ex = task[0]
    program = build_program(ex["prompt"], ex["messages"][-1]["content"], ex["entry_point"])
    assert program.startswith("from typing import List")
    assert "def has_close_elements(" in program
    assert "check(" not in program and "def check" not in program  # the tests run in the checker


# ---------------------------------------------------------------------------
# Spelling

def test_spellingbee_counts_and_calculator():
    from nanochat.calculator import calculate
    task = SpellingBee(size=300, split="train")
    assert len(task) == 300
    zero = 0
    for ex in task:
        assert check_conversation(ex["messages"]) is None
        word, letter, n = ex["word"], ex["letter"], ex["answer"]
        assert n == word.count(letter)
        parts = ex["messages"][-1]["content"]
        call = next(p for p in parts if p["type"] == "python")
        out = next(p for p in parts if p["type"] == "python_output")
        assert call["text"] == f"'{word}'.count('{letter}')" and out["text"] == str(n)
        assert calculate(call["text"]) == str(n)   # the tool really gives this output
        assert ", ".join(word) in parts[0]["text"]  # the word is spelled out before counting
        assert word in ex["messages"][0]["content"]
        assert task.evaluate(ex, content_text(parts))
        zero += n == 0
    assert 0 < zero < 150  # some letters absent from the word, most present
    assert len({ex["messages"][0]["content"].replace(ex["word"], "W") for ex in task}) > 30  # varied phrasing


def test_spellingbee_evaluate():
    task = SpellingBee(size=10, split="test")
    ex = next(e for e in task if e["answer"] > 0)
    n = ex["answer"]
    assert task.evaluate(ex, f"Let me count... #### {n}")
    assert task.evaluate(ex, f"It appears {n} times.")  # no '####': the last number
    assert not task.evaluate(ex, f"#### {n + 1}")
    assert not task.evaluate(ex, "I don't know")
    assert final_number("positions 2, 3 so #### 2") == 2


def test_spelling_deterministic_and_splits_disjoint():
    a, b = SpellingBee(size=500, split="train"), SpellingBee(size=500, split="train")
    assert [a[i] for i in range(0, 500, 7)] == [b[i] for i in range(0, 500, 7)]
    test = SpellingBee(size=500, split="test")
    assert not {e["word"] for e in a} & {e["word"] for e in test}
    train_words = set(load_words(words_path(), "train"))
    test_words = set(load_words(words_path(), "test"))
    assert not train_words & test_words
    assert 20_000 < len(test_words) < len(train_words)
    s_train, s_test = SimpleSpelling(size=500, split="train"), SimpleSpelling(size=500, split="test")
    assert not {e["word"] for e in s_train} & {e["word"] for e in s_test}


def test_simplespelling():
    task = SimpleSpelling(size=200, split="train")
    assert len(task) == 200
    for ex in task:
        assert check_conversation(ex["messages"]) is None
        assert ex["word"] in ex["messages"][0]["content"]
        assert task.evaluate(ex, ex["messages"][-1]["content"])
    ex = task[0]
    w = ex["word"]
    assert task.evaluate(ex, f"{w} is spelled: " + "-".join(w))
    assert not task.evaluate(ex, ", ".join(w[:-1]))
    assert not task.evaluate(ex, ", ".join(w) + ", x")
    assert len({ex["messages"][0]["content"].replace(ex["word"], "W") for ex in task}) > 10


# ---------------------------------------------------------------------------
# CustomJSON

def test_customjson_shared_files(data_dir):
    sharegpt = CustomJSON(os.path.join(data_dir, "chat", "sharegpt.jsonl.gz"))
    assert len(sharegpt) == 11097
    dolly = CustomJSON(os.path.join(data_dir, "chat", "dolly_hh_sample.jsonl"))
    assert len(dolly) == 1000
    for task in (sharegpt, dolly):
        for i in range(0, len(task), 997):
            assert check_conversation(task[i]["messages"]) is None


def test_customjson_formats(tmp_path):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(conv) + "\n\n")
        f.write(json.dumps({"messages": conv}) + "\n")
        f.write(json.dumps([{"role": "system", "content": "be nice"}] + conv) + "\n")
    task = CustomJSON(str(path))
    assert len(task) == 3
    assert task[0]["messages"] == conv and task[1]["messages"] == conv
    assert task[2]["messages"][0]["content"] == "be nice\n\nhi"


@pytest.mark.parametrize("bad,why", [
    ('[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]', "alternate"),
    ('[{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]', "alternate"),
    ('[{"role": "user", "content": "a"}]', "at least"),
    ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]', "end with"),
    ('[{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]', "string"),
    ('{"role": "user", "content": "a"', "not valid JSON"),
    ('{"conversation": []}', "at least"),
])
def test_customjson_bad_line(tmp_path, bad, why):
    good = '[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]'
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + bad + "\n")
    with pytest.raises(UserError, match=why) as err:
        CustomJSON(str(path))
    assert f"{path}:2:" in str(err.value)


def test_customjson_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        CustomJSON(str(tmp_path / "nope.jsonl"))


# ---------------------------------------------------------------------------
# Task slicing, mixtures, sequences

class Numbers(Task):
    def __init__(self, n, tag, **kw):
        super().__init__(**kw)
        self.n, self.tag = n, tag

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"{self.tag}{index}"}, {"role": "assistant", "content": "ok"}]}


def tags(examples):
    return [ex["messages"][0]["content"] for ex in examples]


def test_task_slicing():
    assert tags(Numbers(10, "a", start=2, stop=8, step=3)) == ["a2", "a5"]
    assert len(Numbers(10, "a", start=2, stop=8, step=3)) == 2
    assert len(Numbers(10, "a", stop=100)) == 10
    t = Numbers(5, "a")
    assert t[-1]["messages"][0]["content"] == "a4"
    with pytest.raises(IndexError):
        t[5]
    assert len(ARC("ARC-Easy", "test", stop=100)) == 100


def mixture(sources, seed):
    """A chat_data.Mixture over ready-made tasks: [(label, task, repeats)]."""
    return Mixture("test", "train", seed=seed, sources=sources)


def test_mixture_composition_and_determinism():
    a, b = Numbers(30, "a"), Numbers(5, "b")
    mix = mixture([("a", a, 1), ("b", b, 2)], seed=1)
    got = tags(mix[i] for i in range(len(mix)))
    assert len(mix) == 40
    assert sorted(got) == sorted(tags(a) + tags(b) * 2)  # every example, b twice
    again = mixture([("a", a, 1), ("b", b, 2)], seed=1)
    assert got == tags(again[i] for i in range(40))     # deterministic
    other = mixture([("a", a, 1), ("b", b, 2)], seed=2)
    assert got != tags(other[i] for i in range(40))     # the seed matters
    assert got != tags(a) + tags(b) * 2                  # actually shuffled
    first_half = got[:20]
    assert any(t.startswith("b") for t in first_half)    # interleaved, not blocked


def test_mixture_of_real_tasks():
    mix = Mixture("arc-easy:50,gsm8k:50,spellingbee:50,identity:50", "train")
    assert len(mix) == 200
    assert all(check_conversation(mix[i]["messages"]) is None for i in range(len(mix)))


# ---------------------------------------------------------------------------
# Identity

def test_identity_size_determinism_variety():
    task = IdentityConversations()
    assert len(task) == 1000 and task.eval_type == "generative"
    convs = list(task)
    assert convs == list(IdentityConversations())
    assert all(check_conversation(c["messages"]) is None for c in convs)
    firsts = {c["messages"][0]["content"] for c in convs}
    assert len(firsts) > 150
    assert len({json.dumps(c) for c in convs}) > 950
    turns = [len(c["messages"]) // 2 for c in convs]
    assert min(turns) == 1 and max(turns) >= 4  # single questions and multi-turn chats
    assert sum(any(ord(ch) > 0x2FF for ch in c["messages"][0]["content"]) for c in convs) > 30  # other scripts
    text = json.dumps(convs)
    for fact in ("internet", "remember", "calculator", "mistakes", "trained"):
        assert fact in text
    test = IdentityConversations(size=100, split="test")
    assert [c for c in test] != convs[:100]


def test_identity_uses_the_persona_file(tmp_path):
    with open(DEFAULT_PERSONA) as f:
        persona = json.load(f)
    persona["name"] = "Zephyrine"
    persona["owner"] = "Ada Lovelace"
    path = tmp_path / "persona.json"
    path.write_text(json.dumps(persona))
    task = IdentityConversations(size=300, persona_path=str(path))
    text = json.dumps(list(task))
    assert text.count("Zephyrine") > 100
    assert "Ada Lovelace" in text
    default = json.dumps(list(IdentityConversations(size=300)))
    assert "Zephyrine" not in default
    # the name question is answered with the persona's name
    name_answers = [c["messages"][i + 1]["content"] for c in task for i in range(0, len(c["messages"]), 2)
                    if "call you" in c["messages"][i]["content"].lower()]
    assert name_answers and all("Zephyrine" in a for a in name_answers)


def test_identity_bad_persona(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"name": "X"}')
    with pytest.raises(UserError, match="lacks"):
        IdentityConversations(persona_path=str(path))
    path.write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        IdentityConversations(persona_path=str(path))


def test_every_task_renders_with_the_tokenizer(tokenizer):
    tasks = [ARC("ARC-Challenge", "test", stop=3), MMLU("all", "dev", stop=3), GSM8K("main", "train", stop=3),
             HumanEval(stop=3), SpellingBee(size=3), SimpleSpelling(size=3), IdentityConversations(size=3)]
    python_start = tokenizer.encode_special("<|python_start|>")
    for task in tasks:
        for ex in task:
            ids, mask = tokenizer.render_conversation(ex)
            assert len(ids) == len(mask) and sum(mask) > 0
            if isinstance(task, (GSM8K, SpellingBee)):
                assert python_start in ids
            prompt = tokenizer.render_for_completion(ex)
            assert prompt[-1] == tokenizer.encode_special("<|assistant_start|>")


def test_humaneval_early_exit_does_not_pass(data_dir):
    from tasks.humaneval import HumanEval
    task = HumanEval()
    conv = task[0]
    cheat = "import sys\nsys.exit(0)\n"
    assert not task.evaluate(conv, f"```python\n{cheat}```")
    assert task.evaluate(conv, conv["messages"][1]["content"])
