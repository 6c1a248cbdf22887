"""HumanEval: 164 Python functions to complete, checked by running their unit tests.

The user message is the function's signature and docstring; the reference assistant message is
the complete function. Scoring runs the model's code in the sandbox of nanochat/execution.py and
the task's tests in a separate checker process (execution.check_solution).

The program is assembled as upstream nanochat assembles it by default ("strict"): the prompt's
leading import lines, a blank line, then the first ```/```python fenced block of the completion
(closed, stripped), or the whole stripped completion when there is none; nothing else, so a
completion that is only the function body fails. `lenient=True` keeps our looser assembly
(`build_program`): the fenced block that defines the entry point, unclosed fences and ```py
accepted, and a body-only completion appended to the prompt. Either way the tests run in the
checker, never in the completion's process (the one difference from upstream, which appends the
tests and `check(entry_point)` to the program and runs it all in one process).
"""
import re

from nanochat.execution import check_solution
from tasks.common import Task
from tasks.hub import load_split

_STRICT_FENCE_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.S)
_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def extract_code(response: str, entry_point: str | None = None) -> str:
    """The code in a response: the fenced block that defines `entry_point` (else the first fenced
    block), or the whole response when it has no fence."""
    blocks = _FENCE_RE.findall(response)
    if not blocks:
        return response
    if entry_point:
        for block in blocks:
            if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", block):
                return block
    return blocks[0]


def prompt_imports(prompt: str) -> str:
    return "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))


def leading_imports(prompt: str) -> str:
    """Upstream's imports: the prompt's import lines (stripped) up to its first line that is
    neither an import, a comment nor blank."""
    out = []
    for line in prompt.split("\n"):
        s = line.strip()
        if s.startswith(("import ", "from ")):
            out.append(s)
        elif s and not s.startswith("#"):
            break
    return "\n".join(out)


def build_program_strict(prompt: str, completion: str) -> str:
    """Upstream's program: leading_imports(prompt), a blank line, and the first closed fenced
    block ("```" or "```python", then a newline) of the completion, stripped, or the whole
    completion stripped when it has none. The tests are not part of it: they run in the checker."""
    blocks = _STRICT_FENCE_RE.findall(completion)
    code = blocks[0].strip() if blocks else completion.strip()
    return f"{leading_imports(prompt)}\n\n{code}\n"


def build_program(prompt: str, completion: str, entry_point: str) -> str:
    """Lenient assembly: the completion as a program that defines entry_point: the prompt's imports + the model's
    code. A completion that is only the function body (no `def entry_point`) is appended to the
    prompt. The tests are not part of it: they run in the checker (execution.check_solution)."""
    code = extract_code(completion, entry_point)
    if not re.search(rf"def\s+{re.escape(entry_point)}\s*\(", code):
        code = prompt + code
    return f"{prompt_imports(prompt)}\n\n{code}\n"


class HumanEval(Task):
    def __init__(self, split="test", timeout=10.0, lenient=False, **kwargs):
        super().__init__(**kwargs)
        self.lenient = lenient
        self.rows = load_split("openai/openai_humaneval", "openai_humaneval", split)
        self.timeout = timeout

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + "\n" + row["canonical_solution"]}],
                "task_id": row["task_id"], "prompt": row["prompt"], "test": row["test"],
                "entry_point": row["entry_point"]}

    def evaluate(self, conversation, assistant_response):
        """True when the task's tests pass. The completion runs in the sandbox and the tests in a
        separate checker process that decides alone (nanochat/execution.py, docs/tools.md): no
        printed marker, exit status or returned object can fake a pass."""
        prompt = conversation["prompt"]
        if self.lenient:
            program = build_program(prompt, assistant_response, conversation["entry_point"])
        else:
            program = build_program_strict(prompt, assistant_response)
        result = check_solution(program, conversation["test"], conversation["entry_point"],
                                helpers=f"{prompt_imports(prompt)}\n\n{prompt}", timeout=self.timeout)
        return result.passed
