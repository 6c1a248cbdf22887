"""Spelling tasks generated from the word list $NANOCHAT_DATA/words/words_alpha.txt.

Small models see tokens, not letters, so they are bad at "how many r's in strawberry". Two
synthetic tasks teach the letters inside tokens:
- SpellingBee: how many times does letter X occur in word Y. The assistant spells the word,
  counts, checks the count with a calculator call `'word'.count('x')`, then answers `#### N`.
- SimpleSpelling: spell a word letter by letter.
Example i of a split is a pure function of (task, split, i), so datasets are reproducible. Words
are split ~90/10 into train/test by a hash of the word, so test words never appear in train.
"""
import functools
import os
import random
import re
import zlib

from nanochat.common import UserError, get_data_dir
from nanochat.download import downloads_off
from tasks.common import Task, content_text
from tasks.hub import fetch_file

WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/master/words_alpha.txt"

MIN_LEN, MAX_LEN = 3, 15     # very short words are trivial, very long ones are mostly chemistry
TEST_PERCENT = 10
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def words_path(data_dir=None) -> str:
    return os.path.join(data_dir or get_data_dir(), "words", "words_alpha.txt")


def word_split(word: str) -> str:
    return "test" if zlib.crc32(word.encode()) % 100 < TEST_PERCENT else "train"


def check_words(path):
    with open(path, encoding="utf-8") as f:
        if sum(1 for _ in f) < 100_000:
            raise OSError("the word list is too short: truncated download?")


@functools.lru_cache(maxsize=4)
def load_words(path: str, split: str) -> list[str]:
    if not os.path.isfile(path):
        if downloads_off():
            raise UserError(f"word list not found: {path} and downloads are off (NANOCHAT_OFFLINE/HF_HUB_OFFLINE). "
                            f"Point NANOCHAT_DATA at a data root with words/words_alpha.txt (e.g. ../shared/data), "
                            f"or put {WORDS_URL} there")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fetch_file(WORDS_URL, path, validate=check_words)
    with open(path, encoding="utf-8") as f:
        words = [w.strip().lower() for w in f]
    words = [w for w in words if MIN_LEN <= len(w) <= MAX_LEN and w.isascii() and w.isalpha()]
    return [w for w in words if word_split(w) == split]


def check_split(split):
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, not {split!r}")


# Phrasings of the question; {l} = the letter as the user writes it, {w} = the word as written.
COUNT_TEMPLATES = [
    "How many {l}s are in {w}?",
    "How many {l}'s are there in {w}?",
    "How many times does the letter {l} appear in {w}?",
    "How many times does {l} occur in the word {w}?",
    "Count the {l}'s in {w}.",
    "Count how many times the letter {l} shows up in the word {w}.",
    "In the word {w}, how many {l}'s are there?",
    "how many {l} in {w}",
    "how many {l}s in {w}?",
    "What is the number of {l}'s in {w}?",
    "Can you count the letter {l} in {w} for me?",
    "Tell me how many times {l} appears in {w}.",
    "Number of {l} in {w}?",
    "I need to know how many {l}'s the word {w} has.",
    "Does {w} contain the letter {l}? How many times?",
    "{w}: how many {l}s?",
    "Quick question: how many {l}'s does {w} have?",
    "¿Cuántas veces aparece la letra {l} en {w}?",
    "Combien de fois la lettre {l} apparaît-elle dans {w} ?",
    "Wie oft kommt der Buchstabe {l} in {w} vor?",
]

SPELL_TEMPLATES = [
    "Spell the word {w}.",
    "How do you spell {w}?",
    "Spell {w} letter by letter.",
    "Can you spell {w} for me?",
    "spell {w}",
    "Please spell out the word {w}.",
    "What are the letters of {w}, in order?",
    "Write {w} one letter at a time.",
    "Break {w} into its letters.",
    "Spell out {w}, separating the letters with commas.",
]


def _styled(rng, text, quotes=("", "'", '"')):
    q = rng.choice(quotes)
    return f"{q}{text}{q}"


def spell(word: str) -> str:
    return ", ".join(word)


def final_number(text: str) -> int | None:
    """The number after the last `####`, else the last integer in the text."""
    m = re.findall(r"####\s*(-?\d+)", text)
    if not m:
        m = re.findall(r"-?\d+", text)
    return int(m[-1]) if m else None


class WordTask(Task):
    """`size` generated examples over the train or test words of the word list."""

    def __init__(self, size=1000, split="train", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        check_split(split)
        self.size, self.split = size, split
        self.words = load_words(words_path(data_dir), split)

    def num_examples(self):
        return self.size


class SpellingBee(WordTask):

    def get_example(self, index):
        rng = random.Random(f"spellingbee-{self.split}-{index}")
        word = rng.choice(self.words)
        # Mostly letters of the word; sometimes any letter, so that "0" is a possible answer.
        letter = rng.choice(word) if rng.random() < 0.85 else rng.choice(ALPHABET)
        count = word.count(letter)
        template = rng.choice(COUNT_TEMPLATES)
        # "'r''s" reads badly: no single quotes around a letter that gets a plural 's'
        quotes = ("", '"') if ("{l}s" in template or "{l}'s" in template) else ("", "'", '"')
        shown_letter = _styled(rng, letter.upper() if rng.random() < 0.3 else letter, quotes)
        question = template.format(l=shown_letter, w=_styled(rng, word))
        if rng.random() < 0.2:
            question = question.lower()

        positions = [str(i + 1) for i, c in enumerate(word) if c == letter]
        first = f"Let me spell '{word}' letter by letter: {spell(word)}.\n"
        if count == 0:
            first += f"None of those letters is '{letter}', so I count 0."
        elif count == 1:
            first += f"'{letter}' appears only at position {positions[0]}, so I count 1."
        else:
            first += f"'{letter}' appears at positions {', '.join(positions)}, so I count {count}."
        first += " Let me check with the calculator: "
        plural = "time" if count == 1 else "times"
        closing = rng.choice([
            f"\n\nThe letter '{letter}' appears {count} {plural} in '{word}'.",
            f"\n\nSo '{word}' has {count} '{letter}'{'' if count == 1 else 's'}.",
            f"\n\nThe answer is {count}.",
        ])
        parts = [
            {"type": "text", "text": first},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"{closing}\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "word": word, "letter": letter, "answer": count}

    def evaluate(self, conversation, assistant_response):
        ref = final_number(content_text(conversation["messages"][-1]["content"]))
        return final_number(assistant_response) == ref


class SimpleSpelling(WordTask):

    def get_example(self, index):
        rng = random.Random(f"simplespelling-{self.split}-{index}")
        word = rng.choice(self.words)
        question = rng.choice(SPELL_TEMPLATES).format(w=_styled(rng, word))
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": spell(word)}],
                "word": word}

    def evaluate(self, conversation, assistant_response):
        """The single letters after the last ':' (or in the whole response) must spell the word."""
        tail = assistant_response.rsplit(":", 1)[-1].lower()
        return "".join(re.findall(r"\b[a-z]\b", tail)) == conversation["word"]
