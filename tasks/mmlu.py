"""MMLU: multiple-choice questions over 57 subjects.
Subset `all` with splits dev, validation, test; subset `auxiliary_train` (split train; ~100K
questions from other multiple-choice sets, used for mid-training) is only on the hub."""
from tasks.common import LETTERS, Task, evaluate_letter, render_mc
from tasks.hub import load_split


class MMLU(Task):
    eval_type = "categorical"

    def __init__(self, subset="all", split="test", **kwargs):
        super().__init__(**kwargs)
        if subset not in ("all", "auxiliary_train"):
            raise ValueError(f"MMLU subset must be all or auxiliary_train, not {subset!r}")
        if subset == "all" and split not in ("dev", "validation", "test", "auxiliary_train"):
            raise ValueError(f"MMLU split must be dev, validation or test, not {split!r}")
        if subset == "auxiliary_train" and split != "train":
            raise ValueError("MMLU subset auxiliary_train has only the split train")
        rows = load_split("cais/mmlu", subset, split)
        # The auxiliary_train subset wraps each row in a struct column named "train".
        self.rows = [r["train"] if isinstance(r.get("train"), dict) else r for r in rows]

    def get_example(self, index):
        row = self.rows[index]
        letters = list(LETTERS[:len(row["choices"])])
        # the question as it is, without its subject (as upstream nanochat renders it)
        return {"messages": [{"role": "user", "content": render_mc(row["question"], letters, row["choices"])},
                             {"role": "assistant", "content": letters[row["answer"]]}],
                "letters": letters, "subject": row.get("subject") or ""}

    def evaluate(self, conversation, assistant_response):
        return evaluate_letter(conversation, assistant_response)
