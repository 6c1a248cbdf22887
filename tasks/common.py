"""The Task base class and small helpers shared by the task files (mixtures of tasks are
nanochat/chat_data.py's `Mixture`).

A task is a list of conversations `{"messages": [{"role", "content"}, ...]}` plus a way to score
a model's answer. `Task(start, stop, step)` views a slice of the underlying examples, so
`ARC(...)` is the whole split and `ARC(..., stop=100)` its first hundred items.
"""
import re


class Task:
    """Subclasses keep their examples in `self.rows` (or implement `num_examples()`), implement
    `get_example(index)` (raw index into the dataset) and `evaluate(conversation,
    assistant_response)`, and set `eval_type`: 'generative' (sample text) or 'categorical' (pick
    one of the conversation's "letters")."""

    eval_type = "generative"
    rows = ()

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, assistant_response: str):
        raise NotImplementedError

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, (stop - self.start + self.step - 1) // self.step)

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{type(self).__name__} index {i} out of range (len {n})")
        return self.get_example(self.start + i * self.step)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


# ---------------------------------------------------------------------------
# Helpers

LETTERS = "ABCDEFGHIJ"


def render_mc(question: str, letters, choices) -> str:
    """A multiple-choice prompt in upstream nanochat's format (karpathy/nanochat tasks/common.py),
    used for training data (ARC, MMLU in the mid/SFT mixtures) and for `eval chat` alike:

        Multiple Choice question: <question>
        - <choice 1>=A
        - <choice 2>=B

        Respond only with the letter of the correct answer.

    The label follows its choice with no space before it, so that the letter in the prompt is the
    same token as the bare letter the assistant answers with (" A" and "A" are different tokens).
    Question and choices are used as given (not stripped)."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


_LETTER_RE = re.compile(r"^\W*([A-Z0-9])(?![A-Za-z0-9])")


def evaluate_letter(conversation: dict, assistant_response: str) -> bool:
    """Categorical scoring: the response's leading label ("B", "B.", "(B) ...", or "3" for the few
    ARC items labelled 1-4) must be the gold one. `eval chat` passes exactly one of the item's
    labels, so there this is plain equality with the gold label."""
    m = _LETTER_RE.match(assistant_response.strip())
    return bool(m) and m.group(1) == conversation["messages"][-1]["content"]


def content_text(content) -> str:
    """The text of a message content, whether a string or a list of parts."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


def merge_system(messages: list) -> list:
    """Fold a leading system message into the first user message: our chat format has only user
    and assistant turns."""
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system" \
            and isinstance(messages[0].get("content"), str):
        system, rest = messages[0], messages[1:]
        if rest and isinstance(rest[0], dict) and rest[0].get("role") == "user" and isinstance(rest[0].get("content"), str):
            first = dict(rest[0], content=system["content"].strip() + "\n\n" + rest[0]["content"])
            return [first] + rest[1:]
        return rest
    return messages


def check_conversation(messages) -> str | None:
    """None when `messages` is a valid conversation, else what is wrong with it."""
    if not isinstance(messages, list) or len(messages) < 2:
        return "a conversation needs at least one user and one assistant message"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            return f"message {i} must be an object with 'role' and 'content'"
        want = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != want:
            return f"message {i} has role {msg['role']!r}, expected {want!r} (roles must alternate, starting with user)"
        content = msg["content"]
        if isinstance(content, list) and want == "assistant":
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in ("text", "python", "python_output") \
                        or not isinstance(part.get("text"), str):
                    return f"message {i} has a bad part {part!r} (want {{'type': text|python|python_output, 'text': str}})"
        elif not isinstance(content, str):
            return f"message {i} content must be a string"
    if messages[-1]["role"] != "assistant":
        return "a conversation must end with an assistant message"
    return None
