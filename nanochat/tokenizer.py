"""The BPE tokenizer: trained with rustbpe, encoded with tiktoken, plus chat rendering.

Saved under $NANOCHAT_BASE_DIR/tokenizer/ as three files:
  merges.tiktoken   one "base64(token bytes) rank" line per mergeable token (tiktoken's format)
  tokenizer.json    the split pattern and the special tokens with their ids
  token_bytes.pt    int32 tensor [vocab]: UTF-8 byte length of each token, 0 for special tokens
"""
import base64
import json
import os
import time

import rustbpe
import tiktoken
import torch
from tqdm import tqdm

from nanochat.common import UserError, atomic_write_text, get_base_dir
from nanochat.dataset import iter_texts, split_shards, validate_shards

SPECIAL_TOKENS = [
    "<|bos|>",            # starts every document
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",   # the assistant calls the calculator
    "<|output_start|>", "<|output_end|>",   # the tool's answer, forced into the stream
]

# GPT-4's split pattern, except numbers are split into groups of 1-2 digits (not 1-3): with a
# small vocabulary, fewer digit-group tokens waste less of it.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1  # the 256 bytes, the specials, and at least one merge


def tokenizer_dir() -> str:
    return os.path.join(get_base_dir(), "tokenizer")


class Tokenizer:
    def __init__(self, mergeable_ranks: dict, pattern: str = SPLIT_PATTERN, name: str = "nanochat"):
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        n = len(mergeable_ranks)
        self.special_ids = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_ids)
        self.bos_id = self.special_ids["<|bos|>"]

    # -- training, saving, loading ------------------------------------------------------------

    @classmethod
    def train(cls, text_iterator, vocab_size: int, pattern: str = SPLIT_PATTERN):
        """Learn vocab_size - 9 mergeable tokens (256 bytes + merges) from an iterator of strings."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise UserError(f"vocab size {vocab_size} is too small: it must be at least {MIN_VOCAB_SIZE} "
                            f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens + 1 merge)")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(text_iterator, vocab_size - len(SPECIAL_TOKENS), pattern=pattern)
        ranks = {bytes(tok): rank for tok, rank in bpe.get_mergeable_ranks()}
        if len(ranks) != vocab_size - len(SPECIAL_TOKENS):
            raise UserError(f"the training text only supported {len(ranks) - 256} merges, fewer than the "
                            f"{vocab_size - len(SPECIAL_TOKENS) - 256} needed for vocab size {vocab_size}: "
                            f"give it more text (--max-chars) or ask for a smaller --vocab-size")
        return cls(ranks, pattern)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in
                 sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])]
        atomic_write_text(os.path.join(directory, "merges.tiktoken"), "\n".join(lines) + "\n")
        token_bytes = torch.zeros(self.get_vocab_size(), dtype=torch.int32)
        for tok, rank in self.mergeable_ranks.items():
            token_bytes[rank] = len(tok)
        tmp = os.path.join(directory, f"token_bytes.pt.tmp.{os.getpid()}")
        torch.save(token_bytes, tmp)
        os.replace(tmp, os.path.join(directory, "token_bytes.pt"))
        meta = {"pattern": self.pattern, "special_tokens": self.special_ids, "vocab_size": self.get_vocab_size()}
        atomic_write_text(os.path.join(directory, "tokenizer.json"), json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str):
        merges = os.path.join(directory, "merges.tiktoken")
        if not os.path.exists(merges):
            raise UserError(f"no tokenizer in {directory}: run `nanochat tokenizer train` first")
        ranks = {}
        with open(merges, "rb") as f:
            for line in f:
                if line.strip():
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok)] = int(rank)
        with open(os.path.join(directory, "tokenizer.json")) as f:
            meta = json.load(f)
        tok = cls(ranks, meta["pattern"])
        if tok.special_ids != meta["special_tokens"]:
            raise UserError(f"tokenizer in {directory} was saved with different special tokens")
        return tok

    # -- encoding ---------------------------------------------------------------------------------

    def get_vocab_size(self) -> int:
        return len(self.mergeable_ranks) + len(SPECIAL_TOKENS)

    def get_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    def get_bos_token_id(self) -> int:
        return self.bos_id

    def encode_special(self, name: str) -> int:
        if name not in self.special_ids:
            raise ValueError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}")
        return self.special_ids[name]

    def stop_ids(self) -> set[int]:
        """The tokens that end an assistant reply when sampled: <|assistant_end|>, and <|bos|> (a
        base model starts a new document)."""
        return {self.special_ids["<|assistant_end|>"], self.bos_id}

    def _as_id(self, x):
        return self.encode_special(x) if isinstance(x, str) else int(x)

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """Encode a string (-> list of ids) or a list of strings (-> list of lists).
        Special-token strings inside the text are encoded as ordinary text, never as specials.
        prepend/append: a token id or a special-token name, e.g. prepend="<|bos|>"."""
        pre = [] if prepend is None else [self._as_id(prepend)]
        post = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        if isinstance(text, (list, tuple)):
            out = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
            if pre or post:
                out = [pre + ids + post for ids in out]
            return out
        raise TypeError(f"encode takes a str or a list of str, not {type(text).__name__}")

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids) -> bytes:
        """Raw bytes (a token may hold half a UTF-8 character; streaming code needs the bytes)."""
        return self.enc.decode_bytes(list(ids))

    def id_to_token(self, token_id: int) -> str:
        return self.enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    # -- chat ---------------------------------------------------------------------------------

    def render_conversation(self, conversation, max_tokens: int = 2048):
        """Tokenize a conversation for training. Returns (ids, mask): mask is 1 on exactly the
        tokens the assistant must learn to produce (its text, its python tool calls and
        <|assistant_end|>) and 0 elsewhere (BOS, user turns, <|assistant_start|>, tool outputs,
        which the tool produces at run time)."""
        messages = _validated_messages(conversation)
        ids, mask = [], []

        def add(tokens, m):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        s = self.special_ids
        add(self.bos_id, 0)
        for msg in messages:
            content = msg["content"]
            if msg["role"] == "user":
                add(s["<|user_start|>"], 0)
                add(self.encode(content), 0)
                add(s["<|user_end|>"], 0)
                continue
            add(s["<|assistant_start|>"], 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            else:
                for part in content:
                    kind, text = part["type"], part["text"]
                    if kind == "text":
                        add(self.encode(text), 1)
                    elif kind == "python":
                        add(s["<|python_start|>"], 1)
                        add(self.encode(text), 1)
                        add(s["<|python_end|>"], 1)
                    elif kind == "python_output":
                        add(s["<|output_start|>"], 0)
                        add(self.encode(text), 0)
                        add(s["<|output_end|>"], 0)
                    else:
                        raise ValueError(f"unknown assistant content part type {kind!r}")
            add(s["<|assistant_end|>"], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation) -> list[int]:
        """The prompt for the model's next reply: the conversation without its last assistant
        message (if it ends with one), followed by <|assistant_start|>."""
        messages = _message_list(conversation)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise ValueError("a conversation needs at least one user message")
        prompt = messages + [{"role": "assistant", "content": ""}]
        ids, _ = self.render_conversation({"messages": prompt}, max_tokens=10**9)
        # drop the empty assistant reply's <|assistant_end|>, keep <|assistant_start|>
        assert ids[-1] == self.special_ids["<|assistant_end|>"]
        return ids[:-1]

    def visualize(self, ids, mask=None, color: bool = True) -> str:
        """Show tokens separated by '|'; trained-on tokens (mask 1) in green, the rest in red.
        Without color, trained-on tokens are wrapped in [ ]."""
        out = []
        for i, t in enumerate(ids):
            piece = self.id_to_token(t)
            m = None if mask is None else mask[i]
            if m is None:
                out.append(piece)
            elif color:
                out.append(("\033[92m" if m else "\033[91m") + piece + "\033[0m")
            else:
                out.append(f"[{piece}]" if m else piece)
        return "|".join(out)


def _message_list(conversation):
    if isinstance(conversation, dict):
        if "messages" not in conversation:
            raise ValueError("a conversation is {'messages': [...]}")
        return list(conversation["messages"])
    return list(conversation)


def _validated_messages(conversation):
    """Merge a leading system message into the first user message; check user/assistant alternate."""
    messages = _message_list(conversation)
    if messages and messages[0].get("role") == "system":
        if len(messages) < 2 or messages[1].get("role") != "user":
            raise ValueError("a system message must be followed by a user message")
        merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [merged] + messages[2:]
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, msg in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if msg.get("role") != want:
            raise ValueError(f"message {i} has role {msg.get('role')!r} but {want!r} was expected: "
                             f"roles must alternate user/assistant, starting with user")
        if want == "user" and not isinstance(msg.get("content"), str):
            raise ValueError(f"message {i}: user content must be a string")
    return messages


_CACHE = {}


def get_tokenizer(directory: str | None = None) -> Tokenizer:
    directory = directory or tokenizer_dir()
    if directory not in _CACHE:
        _CACHE[directory] = Tokenizer.load(directory)
    return _CACHE[directory]


def get_token_bytes(device="cpu", directory: str | None = None):
    directory = directory or tokenizer_dir()
    path = os.path.join(directory, "token_bytes.pt")
    if not os.path.exists(path):
        raise UserError(f"no {path}: run `nanochat tokenizer train` first")
    return torch.load(path, map_location=device, weights_only=True)


def capped_texts(texts, max_chars: int, doc_cap: int, progress=None):
    """Yield documents cut to doc_cap characters until max_chars characters have been yielded."""
    total = 0
    for text in texts:
        if total >= max_chars:
            return
        text = text[:doc_cap][: max_chars - total]
        total += len(text)
        if progress is not None:
            progress.update(len(text))
        yield text


def train_from_shards(vocab_size: int, max_chars: int, doc_cap: int, data_dir=None, folder=None,
                      show_progress: bool = True) -> tuple[Tokenizer, int, float]:
    """Train on the training split of the pretraining shards. Returns (tokenizer, chars, seconds)."""
    if max_chars <= 0 or doc_cap <= 0:
        raise UserError("--max-chars and --doc-cap must be positive")
    validate_shards(split_shards("train", data_dir, folder))  # a bad shard is an error now, not mid-way
    counted = {"chars": 0}
    bar = tqdm(total=max_chars, unit="char", unit_scale=True, desc="reading text", disable=not show_progress)

    def texts():
        for t in capped_texts(iter_texts("train", data_dir=data_dir, folder=folder), max_chars, doc_cap, bar):
            counted["chars"] += len(t)
            yield t

    t0 = time.time()
    # Check there is text before handing the iterator to rustbpe, so "empty" is a clear error.
    it = texts()
    first = next((t for t in it if t), None)
    if first is None:
        bar.close()
        raise UserError("the pretraining shards hold no text to train the tokenizer on")

    def chained():
        yield first
        yield from it

    tok = Tokenizer.train(chained(), vocab_size)
    bar.close()
    return tok, counted["chars"], time.time() - t0
