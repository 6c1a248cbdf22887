"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations for mid-training and SFT.
Online only: downloaded into $NANOCHAT_DATA/tasks/ on first use (splits train and test)."""
from tasks.common import Task, check_conversation, merge_system
from tasks.hub import load_split


class SmolTalk(Task):
    def __init__(self, split="train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train or test, not {split!r}")
        rows = load_split("HuggingFaceTB/smol-smoltalk", "default", split)
        self.rows = []
        for row in rows:
            messages = merge_system([{"role": m["role"], "content": m["content"]} for m in row["messages"]])
            if check_conversation(messages) is None:  # the hub data is clean; skip rather than crash if not
                self.rows.append(messages)

    def get_example(self, index):
        return {"messages": self.rows[index]}
