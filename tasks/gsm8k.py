"""GSM8K: grade-school math word problems with worked solutions.

The reference solutions carry calculator annotations `<<48/2=24>>`; each becomes a tool call (a
`python` part holding the expression) followed by the tool's answer (a `python_output` part), so
the model learns to call the calculator. The final answer follows `#### `.

Scoring is upstream nanochat's by default ("strict"): the first `#### ` followed by digits, dots
and commas, commas removed, must equal the reference's as a string ("#### 72.", "#### 72.0",
"#### $72" and "####72" are all wrong for 72). `lenient=True` keeps our looser checker: the last
`####`, an optional "$" and spaces allowed, compared as numbers.
"""
import re

from tasks.common import Task
from tasks.hub import load_split

_ANNOTATION_RE = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
# strict (upstream's rule): "#### " then a run of digits, '.', ',' with an optional leading '-'
_STRICT_ANSWER_RE = re.compile(r"#### (-?[0-9.,]+)")
# lenient: `#### ` then an optional dollar sign and a number: -1,234.5 / 72 / .5
_ANSWER_RE = re.compile(r"####\s*\$?\s*(-?\s*(?:\d[\d,]*(?:\.\d+)?|\.\d+))")


def annotated_to_parts(answer: str) -> list[dict]:
    """'48/2 = <<48/2=24>>24 clips' -> text '48/2 = ', python '48/2', python_output '24', text '24 clips'."""
    parts, pos = [], 0
    for m in _ANNOTATION_RE.finditer(answer):
        if m.start() > pos:
            parts.append({"type": "text", "text": answer[pos:m.start()]})
        parts.append({"type": "python", "text": m.group(1).strip()})
        parts.append({"type": "python_output", "text": m.group(2).strip()})
        pos = m.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


def extract_answer_strict(text: str) -> str | None:
    """Upstream's extraction: the first "#### <digits, dots, commas>", commas removed
    ('#### 1,234.50' -> '1234.50', '#### 72.' -> '72.'); None when there is none."""
    m = _STRICT_ANSWER_RE.search(text)
    return m.group(1).strip().replace(",", "") if m else None


def extract_answer(text: str) -> str | None:
    """Lenient extraction: the number after the last `####`, as a plain string without commas, '$' or spaces
    ('#### $1,234.50' -> '1234.50'); None when there is none."""
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "").replace(" ", "")


def answers_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return a == b


class GSM8K(Task):
    def __init__(self, subset="main", split="test", lenient=False, **kwargs):
        super().__init__(**kwargs)
        self.lenient = lenient
        if subset not in ("main", "socratic"):
            raise ValueError(f"GSM8K subset must be main or socratic, not {subset!r}")
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be train or test, not {split!r}")
        self.rows = load_split("openai/gsm8k", subset, split)

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": annotated_to_parts(row["answer"])}]}

    def evaluate(self, conversation, assistant_response):
        """Strict (default): the response's first `#### N` equals the reference's as a string.
        Lenient: the last `#### N` of each, as numbers. The reference's answer is in the last
        text part of its message."""
        content = conversation["messages"][-1]["content"]
        ref_text = content[-1]["text"] if isinstance(content, list) else content
        if self.lenient:
            return answers_equal(extract_answer(assistant_response), extract_answer(ref_text))
        pred = extract_answer_strict(assistant_response)
        return pred is not None and pred == extract_answer_strict(ref_text)

    def reward(self, conversation, assistant_response) -> float:
        """RL reward: 1.0 for a right final answer (by `evaluate`, so strict unless the task was
        made lenient), else 0.0."""
        return float(self.evaluate(conversation, assistant_response))
