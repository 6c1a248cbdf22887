"""Pretraining data loader: documents -> BOS-aligned packed rows of T+1 tokens -> (inputs, targets).

Two layers:

* `BestFitPacker`: the packing core. It takes token sequences that each start with BOS
  (pretraining documents, or rendered conversations in mid-training and SFT) and fills rows of
  exactly `row_len` tokens: no padding, or (pad=True, SFT) whole documents and padding.
* `PretrainLoader`: reads the parquet shards (row groups strided across ranks), tokenizes them in a
  background thread, packs with the core and yields (inputs, targets) LongTensors of shape (B, T)
  on the device, with `state_dict()` / `load_state_dict()` for exact resume.

How a row is filled (`cut=True`, the default):
 1. If the previous row ended in the middle of a document, the rest of that document (the
    "continuation") comes first; if it is longer than a row it fills the whole row and carries on.
 2. Then, best fit: repeatedly put in the largest buffered document that fits whole in the space
    left (each one starts with its BOS).
 3. When no buffered document fits, the SHORTEST buffered document is cut: its head fills the row
    exactly and its tail becomes the continuation that opens the next row. (Of all choices it leaves
    the fewest tokens without their document's start in context.)
So nothing is ever thrown away (utilization ~100% minus what sits in the buffer when a finite
stream ends). BOS alignment: every document begins with its own BOS, placed by best fit at a row
start or right after other whole documents; a row that does not start with BOS starts with the
continuation of the document cut at the end of the previous row of this rank's stream. Those
continuation tokens are trained on without their document's beginning in context (as in classic
GPT-2-style packing); the first token of a continuation is an input but not a target (its
predecessor sits at the end of the previous row), the same as the BOS that opens any other row.
Upstream nanochat instead crops that document and drops the rest (`cut=False` here reproduces
that), which loses about a third of the tokens at T=2048.
"""
import os
import queue
import threading
from bisect import bisect_left, insort

import numpy as np
import torch

from nanochat.common import UserError, get_dist_info
from nanochat.dataset import num_row_groups, read_row_group_texts, split_shards


class BestFitPacker:
    """Packs documents (token sequences starting with BOS, each with a unique sortable `key`) into
    rows of `row_len` tokens. Feed with `add`, take rows with `pack_row`; the keys of what is still
    buffered (`state()`) are enough to rebuild the packer exactly, given the documents again.
    Counters: tokens_in (added), tokens_out (written to rows), tokens_dropped (cut=False crops).

    When no buffered document fits the space left in a row: cut=True cuts the shortest one and
    continues it in the next row; cut=False crops it (the rest is dropped); pad=True (whole
    documents only, each at most row_len tokens) leaves the rest of the row as the caller filled
    it (padding), with mask 0."""

    def __init__(self, row_len: int, cut: bool = True, pad: bool = False):
        self.row_len = row_len
        self.cut = cut
        self.pad = pad
        self._entries = []      # sorted (length, key): best fit = bisect on length
        self._docs = {}         # key -> (tokens int32 array, mask array or None)
        self.pending = None     # [key, tokens, mask, offset]: the continuation that opens the next row
        self.available = 0      # tokens buffered, pending remainder included
        self.tokens_in = self.tokens_out = self.tokens_dropped = 0

    def __len__(self):
        return len(self._entries)

    def add(self, tokens, key, mask=None):
        tokens = np.asarray(tokens, dtype=np.int32)
        if len(tokens) == 0:
            return
        if self.pad and len(tokens) > self.row_len:
            raise ValueError(f"pad=True packs whole documents: {len(tokens)} tokens do not fit a row of {self.row_len}")
        insort(self._entries, (len(tokens), key))
        self._docs[key] = (tokens, None if mask is None else np.asarray(mask, dtype=np.int8))
        self.available += len(tokens)
        self.tokens_in += len(tokens)

    def set_pending(self, tokens, key, offset, mask=None):
        """Restore a continuation (used by load_state_dict): tokens[offset:] opens the next row."""
        tokens = np.asarray(tokens, dtype=np.int32)
        self.pending = [key, tokens, None if mask is None else np.asarray(mask, dtype=np.int8), offset]
        self.available += len(tokens) - offset

    def _write(self, out, out_mask, pos, tokens, mask, start, n):
        out[pos:pos + n] = tokens[start:start + n]
        if out_mask is not None:
            out_mask[pos:pos + n] = 1 if mask is None else mask[start:start + n]
        self.tokens_out += n
        self.available -= n

    def pack_row(self, out, out_mask=None) -> bool:
        """Fill `out` (a 1-D array of row_len) and optionally `out_mask`. False (and `out` untouched)
        when fewer than row_len tokens are buffered (pad=True: none at all): add more documents first."""
        C = self.row_len
        if (not self._entries) if self.pad else self.available < C:
            return False
        pos = 0
        if self.pending is not None:
            key, tokens, mask, off = self.pending
            n = min(len(tokens) - off, C)
            self._write(out, out_mask, 0, tokens, mask, off, n)
            pos = n
            self.pending[3] += n
            if self.pending[3] == len(tokens):
                self.pending = None
        while pos < C:
            space = C - pos
            i = bisect_left(self._entries, (space + 1,)) - 1  # largest document with length <= space
            if i < 0:
                if self.pad:
                    break  # the rest of the row is padding
                i = 0  # nothing fits whole: cut the shortest, which leaves the shortest continuation
            length, key = self._entries.pop(i)
            tokens, mask = self._docs.pop(key)
            n = min(length, space)
            self._write(out, out_mask, pos, tokens, mask, 0, n)
            pos += n
            if n < length:
                if self.cut:
                    self.pending = [key, tokens, mask, n]
                else:
                    self.available -= length - n
                    self.tokens_dropped += length - n
        return True

    def leftover(self) -> np.ndarray:
        """All tokens still buffered (continuation remainder first): what a finite stream leaves unused."""
        parts = [] if self.pending is None else [self.pending[1][self.pending[3]:]]
        parts += [self._docs[key][0] for _, key in self._entries]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def state(self) -> dict:
        """Keys of the buffered documents, and (key, offset) of the continuation."""
        return {"buffer": [key for _, key in self._entries],
                "pending": None if self.pending is None else (self.pending[0], self.pending[3])}


class PretrainLoader:
    """Iterator of (inputs, targets) LongTensors (B, T) on `device`, from the parquet shards.

    split: "train" (all shards but the last) or "val" (the last shard). The work is cut into units
    (shard, row group); rank r takes units r, r+W, r+2W, ... (W = world size), or, when there are
    fewer units than ranks (a small validation shard), every unit's rows r, r+W, ... Units are
    read and tokenized in a background thread (`prefetch` units ahead, `tokenizer_threads` threads
    inside the tokenizer). With loop=True (default) the data repeats forever (`epoch` counts the
    passes); with loop=False iteration stops when the rank's data cannot fill another batch.
    A new loader always starts at the beginning, so a fresh split="val" loader is a deterministic
    validation iterator.
    """

    def __init__(self, tokenizer, B: int, T: int, split: str = "train", device="cpu", rank=None,
                 world_size=None, buffer_size: int = 1000, tokenizer_threads: int = 4, prefetch: int = 2,
                 loop: bool = True, cut: bool = True, data_dir=None, folder=None):
        _, env_rank, _, env_world = get_dist_info()
        self.rank = env_rank if rank is None else rank
        self.world_size = env_world if world_size is None else world_size
        self.tokenizer, self.B, self.T, self.split = tokenizer, B, T, split
        self.device = torch.device(device)
        self.buffer_size, self.tokenizer_threads, self.prefetch, self.loop = buffer_size, tokenizer_threads, prefetch, loop
        self.bos = tokenizer.get_bos_token_id()
        self.shards = split_shards(split, data_dir, folder)
        units = [(s, rg) for s, path in enumerate(self.shards) for rg in range(num_row_groups(path))]
        if len(units) >= self.world_size:
            self.units = [(s, rg, 0, 1) for s, rg in units[self.rank::self.world_size]]
        else:
            self.units = [(s, rg, self.rank, self.world_size) for s, rg in units]
        self.packer = BestFitPacker(T + 1, cut)
        self.epoch = 0           # passes over this rank's units completed by the packer's input
        self.cursor = 0          # next unit to hand to the packer
        self.units_consumed = 0  # units handed to the packer so far (part of each document's key)
        self._exhausted = False
        self._thread = None

    # -- reading and tokenizing (background thread) --------------------------------------------

    def _read_unit(self, unit):
        shard, rg, r0, step = unit
        texts = read_row_group_texts(self.shards[shard], rg)
        rows = list(range(r0, len(texts), step))
        ids = self.tokenizer.encode([texts[r] or "" for r in rows], prepend=self.bos,
                                    num_threads=self.tokenizer_threads)
        return rows, [np.asarray(x, dtype=np.int32) for x in ids]

    def _produce(self, q, stop, epoch, cursor):
        try:
            if epoch > 0 and not self.loop:  # resumed at the end of a single pass
                q.put(None)
                return
            while not stop.is_set():
                rows, arrays = self._read_unit(self.units[cursor])
                item = (epoch, cursor, rows, arrays)
                cursor += 1
                if cursor == len(self.units):
                    cursor, epoch = 0, epoch + 1
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if epoch > 0 and cursor == 0 and not self.loop:
                    q.put(None)
                    return
        except BaseException as e:  # hand the error (e.g. a corrupt shard) to the training thread
            q.put(e)

    def _start(self):
        self._queue = queue.Queue(maxsize=max(1, self.prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True,
                                        args=(self._queue, self._stop, self.epoch, self.cursor))
        self._thread.start()

    def close(self):
        """Stop the background thread (also done by load_state_dict)."""
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _take_unit(self):
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if item is None:
            self._exhausted = True
            return
        if isinstance(item, BaseException):
            self._thread = None
            raise item
        epoch, cursor, rows, arrays = item
        shard, rg = self.units[cursor][:2]
        for row, tokens in zip(rows, arrays):
            self.packer.add(tokens, (self.units_consumed, row, shard, rg))
        self.units_consumed += 1
        self.epoch, self.cursor = (epoch + 1, 0) if cursor + 1 == len(self.units) else (epoch, cursor + 1)

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self):
        C = self.T + 1
        rows = np.empty((self.B, C), dtype=np.int64)
        for i in range(self.B):
            while not self._exhausted and (len(self.packer) < self.buffer_size or self.packer.available < C):
                self._take_unit()
            if not self.packer.pack_row(rows[i]):
                # loop=False and the data is used up: the partial batch is dropped, and its rows are
                # not counted as used
                self.packer.tokens_out -= i * C
                raise StopIteration
        both = np.empty((2, self.B, self.T), dtype=np.int64)
        both[0] = rows[:, :-1]
        both[1] = rows[:, 1:]
        t = torch.from_numpy(both)
        if self.device.type == "cuda":
            # a fresh pinned tensor per batch: the caching host allocator keeps it alive until the
            # asynchronous copy is done, so the copy overlaps with the training step
            t = t.pin_memory().to(self.device, non_blocking=True)
        else:
            t = t.to(self.device)
        return t[0], t[1]

    def utilization(self) -> float:
        """Tokens written to rows / tokens loaded (documents handed to the packer)."""
        return self.packer.tokens_out / max(1, self.packer.tokens_in)

    # -- exact resume -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Small, JSON-serializable state of this rank's loader, taken between batches. Each rank
        has its own: save one per rank. Documents are referenced by (shard, row group, row)."""
        st = self.packer.state()
        groups = {}
        for u, row, shard, rg in st["buffer"]:
            groups.setdefault((u, shard, rg), []).append(row)
        pending = None
        if st["pending"] is not None:
            (u, row, shard, rg), offset = st["pending"]
            pending = [u, row, shard, rg, int(offset)]
        return {"version": 1, "split": self.split, "rank": self.rank, "world_size": self.world_size,
                "T": self.T, "buffer_size": self.buffer_size, "cut": self.packer.cut,
                "shards": [os.path.basename(p) for p in self.shards],
                "epoch": self.epoch, "cursor": self.cursor, "units_consumed": self.units_consumed,
                "buffer": [[u, shard, rg, sorted(rows)] for (u, shard, rg), rows in sorted(groups.items())],
                "pending": pending, "tokens_in": self.packer.tokens_in, "tokens_out": self.packer.tokens_out,
                "tokens_dropped": self.packer.tokens_dropped}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the saved loader was: re-reads and re-tokenizes the buffered
        documents. The shards, split, T, world size and rank must be the same as when saved."""
        mine = {"split": self.split, "rank": self.rank, "world_size": self.world_size, "T": self.T,
                "buffer_size": self.buffer_size, "cut": self.packer.cut,
                "shards": [os.path.basename(p) for p in self.shards]}
        for k, v in mine.items():
            if state.get(k) != v:
                raise UserError(f"cannot resume the data loader exactly: its saved {k} is {state.get(k)!r}, "
                                f"now {v!r} (did the data, sequence length or number of GPUs change?)")
        self.close()
        self.packer = BestFitPacker(self.T + 1, self.packer.cut)
        wanted = {}  # (shard, rg) -> rows to re-tokenize
        for u, shard, rg, rows in state["buffer"]:
            wanted.setdefault((shard, rg), set()).update(rows)
        if state["pending"] is not None:
            u, row, shard, rg, offset = state["pending"]
            wanted.setdefault((shard, rg), set()).add(row)
        tokens = {}
        for (shard, rg), rows in sorted(wanted.items()):
            texts = read_row_group_texts(self.shards[shard], rg)
            rows = sorted(rows)
            ids = self.tokenizer.encode([texts[r] or "" for r in rows], prepend=self.bos,
                                        num_threads=self.tokenizer_threads)
            tokens.update({(shard, rg, r): x for r, x in zip(rows, ids)})
        for u, shard, rg, rows in state["buffer"]:
            for row in rows:
                self.packer.add(tokens[(shard, rg, row)], (u, row, shard, rg))
        if state["pending"] is not None:
            u, row, shard, rg, offset = state["pending"]
            self.packer.set_pending(tokens[(shard, rg, row)], (u, row, shard, rg), offset)
        self.packer.tokens_in = state["tokens_in"]
        self.packer.tokens_out = state["tokens_out"]
        self.packer.tokens_dropped = state["tokens_dropped"]
        self.epoch, self.cursor, self.units_consumed = state["epoch"], state["cursor"], state["units_consumed"]
        self._exhausted = False
