"""Conversation data for `train mid` and `train sft`: mixtures of sources, and the loader that
packs rendered conversations into rows, in one of two ways.

Mixtures are written as a spec string, e.g. "chat,arc-easy,gsm8k,identity*2,spellingbee:5000":
a comma list of sources; `name*K` repeats a source K times per pass, `name:N` keeps its first N
examples (or, for the generated tasks, makes N of them). A path to a .jsonl/.jsonl.gz file is a
CustomJSON source. Every source holds out the examples whose index is 99 mod 100 (1%) as its
validation part, the same in every stage, so SFT never trains on what mid-training validated on.

Packing (docs/chat_training.md):
Both use the best-fit packer of pretraining (`nanochat.dataloader.BestFitPacker`):
* mid ("pack"): like pretraining: rows full, a conversation that does not fit is cut and
  continues in the next row, every token is a target.
* sft ("pad"): best fit of WHOLE conversations into rows of T+1 tokens; when no buffered
  conversation fits the space left, the rest of the row is padding (BOS in the inputs, -1 in the
  targets). A conversation longer than T+1 tokens is truncated to T+1. Targets are -1 wherever
  the render mask is 0 (user turns, tool outputs, BOS, <|assistant_start|>).
"""
import os
import random

import numpy as np
import torch

from nanochat.common import UserError, get_data_dir, get_dist_info
from nanochat.dataloader import BestFitPacker
from nanochat.download import downloads_off
from tasks.arc import ARC
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K
from tasks.hub import local_files
from tasks.identity import IdentityConversations
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

VAL_MOD = 100  # example i of a source is validation data when i % VAL_MOD == VAL_MOD - 1

MIXTURE_HELP = ("comma list of: smoltalk, mmlu-aux, gsm8k, arc-easy, arc-challenge, identity, simplespelling, "
                "spellingbee, chat (every .jsonl/.jsonl.gz in $NANOCHAT_DATA/chat), or a path to a .jsonl file; "
                "NAME*K repeats a source K times, NAME:N keeps N examples (generated tasks: makes N)")

# The defaults, as mixture specs (printed at start). Online = nanochat's; offline = the stand-ins
# found in ../shared/data (no SmolTalk, no MMLU auxiliary_train).
DEFAULT_MIXTURES = {
    ("mid", "online"): "smoltalk,mmlu-aux,gsm8k,identity*2,simplespelling:200000,spellingbee:80000",
    ("mid", "offline"): "chat,arc-easy,arc-challenge,gsm8k,identity*2,simplespelling:5000,spellingbee:5000",
    ("sft", "online"): "arc-easy,arc-challenge,gsm8k,smoltalk:10000,identity,simplespelling:300,spellingbee:300",
    ("sft", "offline"): "arc-easy,arc-challenge,gsm8k,chat,identity,simplespelling:300,spellingbee:300",
}


# ---------------------------------------------------------------------------
# Mixtures

def chat_files(data_dir=None) -> list[str]:
    folder = os.path.join(data_dir or get_data_dir(), "chat")
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith((".jsonl", ".jsonl.gz")))


# what each stage's online mixture downloads: (repo, subset, split)
ONLINE_NEEDS = {
    "mid": [("HuggingFaceTB/smol-smoltalk", "default", "train"), ("cais/mmlu", "auxiliary_train", "train")],
    "sft": [("HuggingFaceTB/smol-smoltalk", "default", "train")],
}


def online_data_present(stage, data_dir=None) -> bool:
    return all(local_files(repo, subset, split, data_dir) for repo, subset, split in ONLINE_NEEDS[stage])


def default_mixture(stage, data_dir=None) -> tuple[str, str]:
    """(spec, why): the online mixture when SmolTalk (and, for mid, MMLU auxiliary_train) is in the
    data root; else the offline one when $NANOCHAT_DATA/chat has conversation files; else the
    online one, downloaded on first use, unless downloads are off."""
    if online_data_present(stage, data_dir):
        return DEFAULT_MIXTURES[(stage, "online")], "online (SmolTalk found in the data root)"
    if chat_files(data_dir):
        return DEFAULT_MIXTURES[(stage, "offline")], "offline (no SmolTalk in the data root; using its chat/ files)"
    if downloads_off():
        root = data_dir or get_data_dir()
        raise UserError(f"no chat data in {root}: neither tasks/HuggingFaceTB/smol-smoltalk nor chat/*.jsonl; "
                        f"unset NANOCHAT_OFFLINE to download SmolTalk, point NANOCHAT_DATA at a data root with "
                        f"chat/, or give --mixture")
    return DEFAULT_MIXTURES[(stage, "online")], "online (downloaded into the data root on first use)"


def parse_mixture(spec: str) -> list[tuple[str, int | None, int]]:
    """'identity*2,spellingbee:500' -> [('identity', None, 2), ('spellingbee', 500, 1)]."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, repeats, n = item, 1, None
        if "*" in name:
            name, r = name.rsplit("*", 1)
            if not r.isdigit() or int(r) < 1:
                raise UserError(f"--mixture: bad repeat count in '{item}' (want NAME*K with K >= 1)")
            repeats = int(r)
        if ":" in name and not os.path.exists(name):
            name, c = name.rsplit(":", 1)
            if not c.isdigit() or int(c) < 1:
                raise UserError(f"--mixture: bad size in '{item}' (want NAME:N with N >= 1)")
            n = int(c)
        out.append((name, n, repeats))
    if not out:
        raise UserError("--mixture is empty")
    return out


def build_sources(name, n=None, data_dir=None) -> list[tuple[str, object]]:
    """[(label, Task)] for one mixture name (`chat` gives one source per file)."""
    stop = {} if n is None else {"stop": n}
    size = {} if n is None else {"size": n}
    if name == "smoltalk":
        return [("SmolTalk", SmolTalk("train", **stop))]
    if name == "mmlu-aux":
        return [("MMLU auxiliary_train", MMLU("auxiliary_train", "train", **stop))]
    if name == "gsm8k":
        return [("GSM8K train", GSM8K("main", "train", **stop))]
    if name in ("arc-easy", "arc-challenge"):
        subset = "ARC-Easy" if name == "arc-easy" else "ARC-Challenge"
        return [(f"{subset} train", ARC(subset, "train", **stop))]
    if name == "identity":
        return [("Identity", IdentityConversations(split="train", **size))]
    if name == "simplespelling":
        return [("SimpleSpelling", SimpleSpelling(split="train", data_dir=data_dir, **size))]
    if name == "spellingbee":
        return [("SpellingBee", SpellingBee(split="train", data_dir=data_dir, **size))]
    if name == "chat":
        files = chat_files(data_dir)
        if not files:
            folder = os.path.join(data_dir or get_data_dir(), "chat")
            raise UserError(f"--mixture chat: no .jsonl/.jsonl.gz conversation files in {folder}")
        return [(f"chat/{os.path.basename(f)}", CustomJSON(f, **stop)) for f in files]
    if name.endswith((".jsonl", ".jsonl.gz")):
        return [(os.path.basename(name), CustomJSON(name, **stop))]
    raise UserError(f"--mixture: unknown source '{name}' ({MIXTURE_HELP})")


class Mixture:
    """The examples of several sources in one deterministic shuffled order, either the training
    part of each source (split="train") or its held-out 1% (split="val")."""

    def __init__(self, spec, split="train", seed=42, data_dir=None, sources=None):
        """`sources`: another Mixture's `.sources` (of the same spec), to skip loading them again."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be train or val, not {split!r}")
        self.spec, self.split = spec, split
        self.sources = sources  # (label, task, repeats)
        if sources is None:
            self.sources = [(label, task, repeats) for name, n, repeats in parse_mixture(spec)
                            for label, task in build_sources(name, n, data_dir)]
        want_val = split == "val"
        self.index_map = []
        self.counts = []
        for si, (label, task, repeats) in enumerate(self.sources):
            idx = [(si, i) for i in range(len(task)) if (i % VAL_MOD == VAL_MOD - 1) == want_val]
            self.index_map += idx * repeats
            self.counts.append(len(idx) * repeats)
        random.Random(seed).shuffle(self.index_map)

    def __len__(self):
        return len(self.index_map)

    def __getitem__(self, i):
        si, ei = self.index_map[i]
        return self.sources[si][1][ei]

    def table(self) -> list[tuple[str, int, float]]:
        """[(label, rows, share)] per source (rows counting repeats)."""
        total = max(1, len(self))
        return [(label + (f" x{rep}" if rep > 1 else ""), c, c / total)
                for (label, _, rep), c in zip(self.sources, self.counts)]

    def describe(self) -> str:
        lines = [f"{'source':<34} {'rows':>9} {'share':>7}"]
        lines += [f"{label:<34} {rows:>9,} {100 * share:>6.1f}%" for label, rows, share in self.table()]
        lines.append(f"{'total (' + self.split + ')':<34} {len(self):>9,}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Loaders

class ConversationLoader:
    """Iterator of (inputs, targets) LongTensors (B, T) on `device` from a Mixture.

    mode "pack" (mid-training): BestFitPacker rows, cut conversations continue, all targets.
    mode "pad" (SFT): whole conversations, padding, targets -1 where the render mask is 0.
    Rank r reads mixture positions r, r+W, r+2W, ...; `loop` repeats the data forever (epoch
    counts passes), else iteration stops when a batch can no longer be filled. `state_dict()` is
    small and JSON-serializable (the buffered conversations are referenced by position and
    re-rendered by `load_state_dict`), so resuming gives exactly the same batches."""

    def __init__(self, mixture, tokenizer, B, T, mode="pack", device="cpu", loop=True, buffer_size=100,
                 rank=None, world_size=None):
        if mode not in ("pack", "pad"):
            raise ValueError(f"mode must be pack or pad, not {mode!r}")
        _, env_rank, _, env_world = get_dist_info()
        self.rank = env_rank if rank is None else rank
        self.world_size = env_world if world_size is None else world_size
        self.mixture, self.tokenizer, self.B, self.T, self.mode = mixture, tokenizer, B, T, mode
        self.device = torch.device(device)
        self.loop, self.buffer_size = loop, buffer_size
        self.bos = tokenizer.get_bos_token_id()
        self.positions = list(range(self.rank, len(mixture), self.world_size))
        if not self.positions:
            raise UserError(f"the {mixture.split} mixture has {len(mixture)} conversations: fewer than the "
                            f"{self.world_size} processes")
        self.epoch, self.cursor = 0, 0
        self._exhausted = False
        self.last_targets = 0  # targets (!= -1) in the last batch, counted on the host
        self._reset_buffer()

    def _reset_buffer(self):
        self.packer = BestFitPacker(self.T + 1, cut=True, pad=self.mode == "pad")

    def render(self, pos):
        conv = self.mixture[pos]
        # pad mode: a conversation longer than a row is truncated to the row (its tail is lost)
        limit = self.T + 1 if self.mode == "pad" else 10 ** 9
        ids, mask = self.tokenizer.render_conversation(conv, max_tokens=limit)
        return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.int8)

    def _add(self, key, ids, mask):
        self.packer.add(ids, key, mask=mask if self.mode == "pad" else None)

    def _fill(self):
        while not self._exhausted and len(self.packer) < self.buffer_size:
            if self.cursor == len(self.positions):
                if not self.loop:
                    self._exhausted = True
                    break
                self.epoch, self.cursor = self.epoch + 1, 0
            pos = self.positions[self.cursor]
            ids, mask = self.render(pos)
            self._add((self.epoch, pos), ids, mask)
            self.cursor += 1

    def __iter__(self):
        return self

    def __next__(self):
        C = self.T + 1
        rows = np.empty((self.B, C), dtype=np.int64)
        masks = np.zeros((self.B, C), dtype=np.int8)
        for b in range(self.B):
            self._fill()
            if self.mode == "pack":
                while not self.packer.pack_row(rows[b]):
                    if self._exhausted:
                        raise StopIteration
                    self.buffer_size *= 2  # a buffer of short conversations cannot fill a row yet
                    self._fill()
            else:
                rows[b].fill(self.bos)  # the padding: BOS inputs, mask 0 (no target)
                if not self.packer.pack_row(rows[b], masks[b]):
                    raise StopIteration
        inputs = torch.from_numpy(rows[:, :-1].copy())
        targets = torch.from_numpy(rows[:, 1:].copy())
        if self.mode == "pad":
            targets[torch.from_numpy(masks[:, 1:] == 0)] = -1
            self.last_targets = int((masks[:, 1:] != 0).sum())
        else:
            self.last_targets = targets.numel()
        # counted on the host, before the copy: the training loop never has to ask the device
        if torch.device(self.device).type == "cuda":
            return (inputs.pin_memory().to(self.device, non_blocking=True),
                    targets.pin_memory().to(self.device, non_blocking=True))
        return inputs.to(self.device), targets.to(self.device)

    def state_dict(self) -> dict:
        st = self.packer.state()
        buffer, pending, counters = st["buffer"], None, None
        if self.mode == "pack":
            pending = None if st["pending"] is None else [list(st["pending"][0]), int(st["pending"][1])]
            counters = [self.packer.tokens_in, self.packer.tokens_out, self.packer.tokens_dropped]
        return {"mode": self.mode, "rank": self.rank, "world_size": self.world_size, "T": self.T,
                "epoch": self.epoch, "cursor": self.cursor, "buffer_size": self.buffer_size,
                "buffer": [list(k) for k in buffer], "pending": pending, "counters": counters}

    def load_state_dict(self, state):
        for k in ("mode", "rank", "world_size", "T"):
            if state[k] != getattr(self, k):
                raise UserError(f"cannot resume the data loader: its {k} was {state[k]!r}, now {getattr(self, k)!r}")
        self._reset_buffer()
        self.epoch, self.cursor, self.buffer_size = state["epoch"], state["cursor"], state["buffer_size"]
        self._exhausted = False
        for epoch, pos in state["buffer"]:
            ids, mask = self.render(pos)
            self._add((epoch, pos), ids, mask)
        if self.mode == "pack":
            if state["pending"] is not None:
                (epoch, pos), offset = state["pending"]
                ids, _ = self.render(pos)
                self.packer.set_pending(ids, (epoch, pos), offset)
            self.packer.tokens_in, self.packer.tokens_out, self.packer.tokens_dropped = state["counters"]


def estimate_rows(mixture, tokenizer, T, mode, sample=2000, seed=0) -> float:
    """Rows of T+1 tokens one pass over the mixture fills, from `sample` evenly spread
    conversations (their lengths; in pad mode, packed the same way as the loader)."""
    n = len(mixture)
    if n == 0:
        return 0.0
    k = min(n, sample)
    positions = [i * n // k for i in range(k)]
    C = T + 1
    limit = C if mode == "pad" else 10 ** 9
    lengths = [len(tokenizer.render_conversation(mixture[p], max_tokens=limit)[0]) for p in positions]
    if mode == "pack":
        rows = sum(lengths) / C
    else:
        # the loader's best fit, over the whole sample as its buffer
        packer = BestFitPacker(C, pad=True)
        for i, length in enumerate(lengths):
            packer.add(np.zeros(length, dtype=np.int32), i)
        row, rows = np.zeros(C, dtype=np.int32), 0
        while packer.pack_row(row):
            rows += 1
    return rows * n / k
