"""HumanEval: 164 Python functions to complete, checked by running their unit tests.

The user message is the function's signature and docstring; the reference assistant message is
the complete function. Scoring runs the model's code together with the task's tests in the
sandbox of nanochat/execution.py.
"""
import re

from nanochat.execution import execute_code
from tasks.common import Task
from tasks.hub import load_split

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


PASS_MARKER = "__nanochat_humaneval_passed__"


def build_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """imports of the prompt + the model's code + the tests + check(entry_point). A completion
    that is only the function body (no `def entry_point`) is appended to the prompt."""
    code = extract_code(completion, entry_point)
    if not re.search(rf"def\s+{re.escape(entry_point)}\s*\(", code):
        code = prompt + code
    # The marker is printed only after check() returned: a completion that calls sys.exit(0)
    # early exits with status 0 but never prints it, so it cannot pass.
    return f"{prompt_imports(prompt)}\n\n{code}\n\n{test}\n\ncheck({entry_point})\nprint({PASS_MARKER!r})\n"


class HumanEval(Task):
    def __init__(self, split="test", timeout=10.0, **kwargs):
        super().__init__(**kwargs)
        self.rows = load_split("openai/openai_humaneval", "openai_humaneval", split)
        self.timeout = timeout

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}],
                "task_id": row["task_id"], "prompt": row["prompt"], "test": row["test"],
                "entry_point": row["entry_point"]}

    def evaluate(self, conversation, assistant_response):
        program = build_program(conversation["prompt"], assistant_response, conversation["test"],
                                conversation["entry_point"])
        result = execute_code(program, timeout=self.timeout)
        return bool(result.success and PASS_MARKER in result.stdout)
