"""ARC (AI2 Reasoning Challenge): grade-school science questions, multiple choice.
Subsets ARC-Easy and ARC-Challenge; splits train, validation, test."""
from tasks.common import LETTERS, Task, evaluate_letter, render_mc
from tasks.hub import load_split


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset="ARC-Easy", split="test", **kwargs):
        super().__init__(**kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise ValueError(f"ARC subset must be ARC-Easy or ARC-Challenge, not {subset!r}")
        if split not in ("train", "validation", "test"):
            raise ValueError(f"ARC split must be train, validation or test, not {split!r}")
        self.rows = load_split("allenai/ai2_arc", subset, split)

    def get_example(self, index):
        row = self.rows[index]
        labels = list(row["choices"]["label"])
        # A few ARC items are labelled 1-4 instead of A-D: re-letter them all A, B, C, ... so every
        # categorical task answers with the same letter tokens.
        letters = list(LETTERS[:len(labels)])
        gold = letters[labels.index(row["answerKey"])]
        prompt = render_mc(row["question"], letters, row["choices"]["text"])
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": gold}],
                "letters": letters}

    def evaluate(self, conversation, assistant_response):
        return evaluate_letter(conversation, assistant_response)
