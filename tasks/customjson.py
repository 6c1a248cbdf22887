"""Conversations from your own file: `.jsonl` or `.jsonl.gz`, one conversation per line, either
a JSON list of messages (like ../shared/data/chat/*) or an object {"messages": [...]}.

Roles must alternate user/assistant, starting with user and ending with assistant; a leading
system message is folded into the first user message. A bad line is an error naming the file and
line, so a typo never silently drops data.
"""
import gzip
import json
import os

from nanochat.common import UserError
from tasks.common import Task, check_conversation, merge_system


def read_conversations(filepath: str) -> list[list[dict]]:
    if not os.path.isfile(filepath):
        raise UserError(f"conversation file not found: {filepath}")
    opener = gzip.open if filepath.endswith(".gz") else open
    conversations = []
    try:
        with opener(filepath, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{filepath}:{lineno}: not valid JSON ({e})") from None
                messages = obj.get("messages") if isinstance(obj, dict) else obj
                if isinstance(messages, list):
                    messages = merge_system(messages)
                problem = check_conversation(messages)
                if problem:
                    raise UserError(f"{filepath}:{lineno}: {problem}")
                conversations.append(messages)
    except (OSError, EOFError, UnicodeDecodeError) as e:  # e.g. a truncated .gz
        raise UserError(f"cannot read {filepath}: {e}") from e
    if not conversations:
        raise UserError(f"{filepath} holds no conversations")
    return conversations


class CustomJSON(Task):
    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        self.filepath = filepath
        self.rows = read_conversations(filepath)

    def get_example(self, index):
        return {"messages": self.rows[index]}
