"""GSM8K: grade-school math word problems with worked solutions.

The reference solutions carry calculator annotations `<<48/2=24>>`; each becomes a tool call (a
`python` part holding the expression) followed by the tool's answer (a `python_output` part), so
the model learns to call the calculator. The final answer follows `#### `.
"""
import re

from tasks.common import Task, content_text
from tasks.hub import load_split

_ANNOTATION_RE = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
# `#### ` then an optional dollar sign and a number: -1,234.5 / 72 / .5
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


def extract_answer(text: str) -> str | None:
    """The number after the last `####`, as a plain string without commas, '$' or spaces
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
    def __init__(self, subset="main", split="test", **kwargs):
        super().__init__(**kwargs)
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
        """True when the response's `#### N` equals the reference's (as numbers)."""
        ref = extract_answer(content_text(conversation["messages"][-1]["content"]))
        return answers_equal(extract_answer(assistant_response), ref)

    def reward(self, conversation, assistant_response) -> float:
        """RL reward: 1.0 for a right final answer, else 0.0."""
        return float(self.evaluate(conversation, assistant_response))
