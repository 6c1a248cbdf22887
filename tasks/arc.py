"""ARC (AI2 Reasoning Challenge): grade-school science questions, multiple choice.
Subsets ARC-Easy and ARC-Challenge; splits train, validation, test."""
from tasks.common import Task, evaluate_letter, render_mc
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
        # The item's own labels, as upstream nanochat renders them: "A".."E" for nearly all items,
        # "1".."4" for a few (each is one token either way).
        letters = list(row["choices"]["label"])
        if row["answerKey"] not in letters:
            raise ValueError(f"ARC row {index}: answer {row['answerKey']!r} is not one of its labels {letters}")
        prompt = render_mc(row["question"], letters, row["choices"]["text"])
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["answerKey"]}],
                "letters": letters}

    def evaluate(self, conversation, assistant_response):
        return evaluate_letter(conversation, assistant_response)
