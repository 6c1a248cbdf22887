"""What `train mid`, `train sft` and `train rl` share: conversation mixtures, the two ways of
packing rendered conversations into rows, the masked losses, and checkpoint/flag plumbing.

Mixtures are written as a spec string, e.g. "chat,arc-easy,gsm8k,identity*2,spellingbee:5000":
a comma list of sources; `name*K` repeats a source K times per pass, `name:N` keeps its first N
examples (or, for the generated tasks, makes N of them). A path to a .jsonl/.jsonl.gz file is a
CustomJSON source. Every source holds out the examples whose index is 99 mod 100 (1%) as its
validation part, the same in every stage, so SFT never trains on what mid-training validated on.

Packing (docs/chat_training.md):
* mid ("pack"): like pretraining: BOS-aligned best fit with the shared `BestFitPacker`, rows full,
  a conversation that does not fit is cut and continues in the next row, every token is a target.
* sft ("pad"): best fit of WHOLE conversations into rows of T+1 tokens; when no buffered
  conversation fits the space left, the rest of the row is padding (BOS in the inputs, -1 in the
  targets). A conversation longer than T+1 tokens is truncated to T+1. Targets are -1 wherever
  the render mask is 0 (user turns, tool outputs, BOS, <|assistant_start|>).
"""
import argparse
import math
import os
import random
from bisect import bisect_left, insort

import numpy as np
import torch
import torch.distributed as dist

from nanochat.common import UserError, get_data_dir, get_dist_info, print0

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


def online_data_present(stage, data_dir=None) -> bool:
    from tasks.hub import local_files
    need = [("HuggingFaceTB/smol-smoltalk", "default", "train")]
    if stage == "mid":
        need.append(("cais/mmlu", "auxiliary_train", "train"))
    return all(local_files(repo, subset, split, data_dir) for repo, subset, split in need)


def default_mixture(stage, data_dir=None) -> tuple[str, str]:
    """(spec, why): the online mixture when SmolTalk (and, for mid, MMLU auxiliary_train) is in the
    data root; else the offline one when $NANOCHAT_DATA/chat has conversation files; else the
    online one, downloaded on first use, unless downloads are off."""
    from nanochat.common import downloads_off
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
    from tasks.arc import ARC
    from tasks.customjson import CustomJSON
    from tasks.gsm8k import GSM8K
    from tasks.identity import IdentityConversations
    from tasks.mmlu import MMLU
    from tasks.smoltalk import SmolTalk
    from tasks.spellingbee import SimpleSpelling, SpellingBee
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
        from nanochat.dataloader import BestFitPacker
        self.packer = BestFitPacker(self.T + 1, cut=True) if self.mode == "pack" else None
        self._entries, self._docs = [], {}  # pad mode: sorted (length, key), key -> (ids, mask)

    def render(self, pos):
        conv = self.mixture[pos]
        # pad mode: a conversation longer than a row is truncated to the row (its tail is lost)
        limit = self.T + 1 if self.mode == "pad" else 10 ** 9
        ids, mask = self.tokenizer.render_conversation(conv, max_tokens=limit)
        return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.int8)

    def _add(self, key, ids, mask):
        if self.mode == "pack":
            self.packer.add(ids, key)
        else:
            insort(self._entries, (len(ids), key))
            self._docs[key] = (ids, mask)

    def _buffered(self):
        return len(self.packer) if self.mode == "pack" else len(self._entries)

    def _fill(self):
        while not self._exhausted and self._buffered() < self.buffer_size:
            if self.cursor == len(self.positions):
                if not self.loop:
                    self._exhausted = True
                    break
                self.epoch, self.cursor = self.epoch + 1, 0
            pos = self.positions[self.cursor]
            ids, mask = self.render(pos)
            self._add((self.epoch, pos), ids, mask)
            self.cursor += 1

    def _pad_row(self, row, mask_row):
        """Best fit of whole conversations; False when nothing is buffered."""
        C = self.T + 1
        if not self._entries:
            return False
        row.fill(self.bos)
        mask_row.fill(0)
        pos = 0
        while pos < C:
            i = bisect_left(self._entries, (C - pos + 1,)) - 1  # largest conversation that fits
            if i < 0:
                break
            length, key = self._entries.pop(i)
            ids, mask = self._docs.pop(key)
            row[pos:pos + length] = ids
            mask_row[pos:pos + length] = mask
            pos += length
        return True

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
            elif not self._pad_row(rows[b], masks[b]):
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
        if self.mode == "pack":
            st = self.packer.state()
            buffer, pending = st["buffer"], st["pending"]
            pending = None if pending is None else [list(pending[0]), int(pending[1])]
            counters = [self.packer.tokens_in, self.packer.tokens_out, self.packer.tokens_dropped]
        else:
            buffer, pending, counters = [key for _, key in self._entries], None, None
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
        # same greedy best fit as the loader, over the whole sample as its buffer
        entries = sorted(lengths)
        rows = 0
        while entries:
            rows += 1
            space = C
            while True:
                i = bisect_left(entries, space + 1) - 1
                if i < 0:
                    break
                space -= entries.pop(i)
    return rows * n / k


# ---------------------------------------------------------------------------
# Losses

def global_sum(x: float, device) -> float:
    """Sum of a number over all processes (itself without torchrun)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([float(x)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())
    return float(x)


def token_normalized_loss(model, x, y, num_tokens, world_size=1):
    """Summed cross-entropy of one micro-batch over its non-ignored targets, divided by the number
    of such targets in the whole optimizer step (all micro-batches, all ranks): the accumulated
    gradient is then that of the mean over the step's tokens, whatever the share of each
    micro-batch. An all-masked micro-batch sums to 0 (finite, zero gradient), and a step with no
    target at all divides by max(1, 0). The optimizer AVERAGES gradients over ranks, hence the
    factor world_size."""
    loss_sum = model(x, y, loss_reduction="sum")
    return loss_sum * (world_size / max(1, num_tokens)), loss_sum.detach()


def rl_advantages(rewards, std_normalize=False, eps=1e-6):
    """rewards (G, K) for G questions x K samples -> advantages: reward - the group's mean,
    divided by the group's (population) std + eps when std_normalize."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    adv = rewards - rewards.mean(dim=-1, keepdim=True)
    if std_normalize:
        adv = adv / (rewards.std(dim=-1, unbiased=False, keepdim=True) + eps)
    return adv


def pg_loss(logprobs, targets, advantages, num_tokens, world_size=1):
    """Policy-gradient loss of a micro-batch: -(advantage x logprob) summed over the sampled tokens
    (targets != -1: prompt and forced tool-output tokens are -1), divided by the number of sampled
    tokens of the whole step (all micro-batches and ranks; times world_size as the optimizer
    averages over ranks). logprobs, targets (B, T); advantages (B,)."""
    valid = (targets != -1).to(logprobs.dtype)
    objective = (logprobs * valid * advantages.to(logprobs.dtype)[:, None]).sum()
    return -objective * (world_size / max(1, num_tokens))


def rl_batch(sequences, masks, pad_id):
    """Token lists (prompt + completion) and their masks (1 = sampled) -> (inputs, targets) (N, L-1)
    right-padded: inputs padded with pad_id, targets -1 wherever the next token was not sampled."""
    L = max(len(s) for s in sequences)
    inputs = torch.full((len(sequences), L - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), L - 1), -1, dtype=torch.long)
    for i, (seq, m) in enumerate(zip(sequences, masks)):
        ids = torch.tensor(seq, dtype=torch.long)
        mk = torch.tensor(m, dtype=torch.bool)
        n = len(seq) - 1
        inputs[i, :n] = ids[:-1]
        targets[i, :n] = torch.where(mk[1:], ids[1:], torch.full_like(ids[1:], -1))
    return inputs, targets


@torch.no_grad()
def evaluate_loss(model, batches, steps, device) -> float:
    """Mean cross-entropy over the non-ignored targets of `steps` batches (summed over ranks)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    batches = iter(batches)
    for _ in range(steps):
        try:
            x, y = next(batches)
        except StopIteration:
            break
        total[0] += model(x, y, loss_reduction="sum").double()
        total[1] += (y != -1).sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total[0] / total[1]) if total[1] > 0 else math.nan


def small_chatcore(model, tokenizer, device, task_names, max_problems, max_new_tokens=128, batch_size=32):
    """Accuracy on a few evenly spaced problems per task, and their mean centered accuracy
    (the ChatCORE formula of `nanochat eval chat`, over the tasks given). Each rank scores its
    stride of the problems; the counts are summed over ranks."""
    from nanochat.engine import Engine
    from nanochat.stages import eval_chat as ec
    _, rank, _, world = get_dist_info()
    engine = Engine(model, tokenizer)
    results = {}
    was_training = model.training
    model.eval()
    with ec.autocast_ctx(device):
        for name in task_names:
            task = ec.load_task(name)
            mine = ec.pick_problems(len(task), max_problems)[rank::world]
            if task.eval_type == "categorical":
                c, t, b = ec.run_categorical(model, tokenizer, task, mine, device, batch_size)
            else:
                c, t, b = ec.run_generative(engine, tokenizer, task, mine, 1, max_new_tokens, 0.0, None, batch_size)
            counts = torch.tensor([c, t, b], dtype=torch.float64, device=device)
            if dist.is_available() and dist.is_initialized() and world > 1:
                dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            c, t, b = counts.tolist()
            acc, base = c / max(t, 1), b / max(t, 1)
            results[name] = {"accuracy": acc, "centered": ec.centered(acc, base)}
    model.train(was_training)
    return {name: r["accuracy"] for name, r in results.items()}, ec.chatcore(results)


# ---------------------------------------------------------------------------
# Learning rates inherited along base -> mid -> sft -> rl

LR_KEYS = ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")
LR_DEFAULTS = dict(embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5)


def inherited_lrs(meta, args) -> dict:
    """The source checkpoint's learning rates (its meta's `lrs`, written by mid/sft/rl, else its
    user_config, written by train base; nanochat's defaults if neither has them), each overridden
    by this stage's flag when given. Not yet scaled by --init-lr-frac."""
    src = meta.get("lrs") or meta.get("user_config") or {}
    out = {}
    for k in LR_KEYS:
        flag = getattr(args, k, None)
        out[k] = float(flag if flag is not None else src.get(k, LR_DEFAULTS[k]))
    return out


def add_lr_flags(parser, init_lr_frac, weight_decay=0.0):
    g = parser.add_argument_group("optimization")
    for k in LR_KEYS:
        g.add_argument("--" + k.replace("_", "-"), type=float, default=None,
                       help=f"override the source checkpoint's {k} (default: inherited)")
    g.add_argument("--init-lr-frac", type=float, default=init_lr_frac,
                   help=f"multiply the inherited learning rates by this (default {init_lr_frac})")
    g.add_argument("--weight-decay", type=float, default=weight_decay, help=f"Muon weight decay (default {weight_decay})")
    return g


# ---------------------------------------------------------------------------
# Checkpoint plumbing shared by the three stages

def add_training_flags(parser, stage, sources, device_batch_size, total_batch_size, eval_every, save_every):
    """The flags mid, sft and rl share (same names and meanings as `nanochat train base`)."""
    from nanochat.common import add_common_flags
    parser.add_argument("-i", "--source", default=sources[0], choices=sources,
                        help=f"checkpoints to start from (default {sources[0]}); --model-tag/--step pick one")
    add_common_flags(parser)
    g = parser.add_argument_group("batch and horizon")
    g.add_argument("--device-batch-size", type=int, default=device_batch_size,
                   help=f"sequences per micro-batch per process (default {device_batch_size})")
    if total_batch_size is not None:
        g.add_argument("--total-batch-size", type=int, default=total_batch_size,
                       help=f"tokens per optimizer step over all processes (default {total_batch_size})")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (default -1: from --num-epochs)")
    g.add_argument("--num-epochs", type=float, default=1.0, help="passes over the training data (default 1)")
    g.add_argument("--seed", type=int, default=42, help="data order / sampling seed (default 42)")
    g = parser.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-every", type=int, default=eval_every, help=f"evaluate every N steps, -1 = only at the end (default {eval_every})")
    g.add_argument("--log-every", type=int, default=1, help="print/record a step line every N steps (default 1)")
    g.add_argument("--save-every", type=int, default=save_every, help=f"checkpoint every N steps (always at the end) (default {save_every})")
    g.add_argument("--resume", action="store_true", help=f"continue from the latest complete checkpoint in checkpoints/{stage}/<tag>")
    g.add_argument("--resume-from-step", type=int, default=None, help="continue from this checkpoint step")
    g.add_argument("--dry-run", action="store_true", help="print the configuration and exit")
    return g


def check_common_args(args):
    if args.device_batch_size < 1:
        raise UserError(f"--device-batch-size must be >= 1, not {args.device_batch_size}")
    if args.num_iterations == 0 or args.num_iterations < -1:
        raise UserError(f"--num-iterations must be >= 1 (or -1 for --num-epochs), not {args.num_iterations}")
    if args.num_epochs <= 0:
        raise UserError(f"--num-epochs must be > 0, not {args.num_epochs}")
    if args.log_every < 1:
        raise UserError("--log-every must be >= 1")
    if args.init_lr_frac <= 0:
        raise UserError(f"--init-lr-frac must be > 0, not {args.init_lr_frac}")
    if args.resume and args.resume_from_step is not None:
        raise UserError("give --resume or --resume-from-step, not both")


def resolve_start(args, stage, world_size):
    """Where the run starts. Returns (src_dir, src_step, model_tag, out_dir, resume_step): the
    source checkpoint (checkpoints/<source>/<tag>), the output folder checkpoints/<stage>/<tag>
    (same tag), and the step to resume from in it (None for a fresh run)."""
    from nanochat import checkpoint as ck
    src_dir, model_tag, src_step = ck.resolve_checkpoint(args.source, args.model_tag, args.step)
    out_dir = ck.checkpoint_dir(stage, model_tag)
    resume_step = None
    if args.resume or args.resume_from_step is not None:
        steps = ck.complete_steps(out_dir)
        if not steps:
            raise UserError(f"nothing to resume: no complete checkpoint in {out_dir} (train without --resume first)")
        resume_step = steps[-1] if args.resume else args.resume_from_step
        if resume_step not in steps:
            raise UserError(f"no complete checkpoint for step {resume_step} in {out_dir}; "
                            f"complete steps: {', '.join(map(str, steps))}")
        meta = ck.load_meta(out_dir, resume_step, require=("loop",))
        if meta.get("world_size", 1) != world_size:
            raise UserError(f"the checkpoint was saved by {meta.get('world_size')} process(es); "
                            f"resume with the same number (now {world_size})")
    return src_dir, src_step, model_tag, out_dir, resume_step


def log_report(section, data):
    try:
        from nanochat.report import get_report
    except ImportError:
        return
    get_report().log(section=section, data=data)


# ---------------------------------------------------------------------------
# The training loop of mid-training and SFT (RL has its own, in stages/train_rl.py)

def run_lm_stage(args, stage, section):
    """`train mid` (stage="mid": packed like pretraining, every token a target) and `train sft`
    (stage="sft": padded whole conversations, assistant tokens only). Same loop, flags, metrics
    and resume mechanism as `train base`."""
    from nanochat import checkpoint as ck
    from nanochat.common import (autodetect_device_type, compute_cleanup, compute_init, get_compute_dtype,
                                 init_wandb)
    from nanochat.stages.train_base import StepLog, lr_multiplier, muon_momentum
    check_common_args(args)
    if args.max_seq_len == 0 or args.max_seq_len < -1 or args.max_seq_len == 1:
        raise UserError(f"--max-seq-len must be >= 2 (or -1 for the model's), not {args.max_seq_len}")
    device_type = args.device_type or autodetect_device_type()
    mode = "pack" if stage == "mid" else "pad"
    is_dist, rank, local_rank, world_size, device = compute_init(device_type, seed=args.seed)
    master = rank == 0
    try:
        src_dir, src_step, model_tag, out_dir, resume_step = resolve_start(args, stage, world_size)
        load_dir, load_step = (out_dir, resume_step) if resume_step is not None else (src_dir, src_step)
        model, tokenizer, load_meta = ck.build_model(load_dir, load_step, device, phase="train")
        src_meta = ck.load_meta(src_dir, src_step)
        model_config = load_meta["model_config"]
        T = args.max_seq_len if args.max_seq_len > 0 else model_config["sequence_len"]
        B = args.device_batch_size
        dtype = get_compute_dtype(device.type)
        autocast_on = dtype != torch.float32

        def autocast():
            return torch.autocast(device_type=device.type, dtype=dtype, enabled=autocast_on)

        spec, why = (args.mixture, "from --mixture") if args.mixture else default_mixture(stage)
        train_mix = Mixture(spec, "train", seed=args.seed)
        val_mix = Mixture(spec, "val", seed=args.seed, sources=train_mix.sources)
        print0(f"mixture ({why}): {spec}")
        print0(train_mix.describe())
        print0(f"validation: {len(val_mix):,} held-out conversations (1% of each source)")

        tokens_per_fwdbwd = B * T * world_size
        total_batch_size = args.total_batch_size if args.total_batch_size > 0 else tokens_per_fwdbwd
        if total_batch_size % tokens_per_fwdbwd:
            raise UserError(f"--total-batch-size {total_batch_size} is not a multiple of device-batch-size * "
                            f"max-seq-len * processes = {B} * {T} * {world_size} = {tokens_per_fwdbwd}")
        grad_accum = total_batch_size // tokens_per_fwdbwd
        rows_per_step = B * world_size * grad_accum
        est_rows = estimate_rows(train_mix, tokenizer, T, mode)
        if args.num_iterations > 0:
            num_iterations = args.num_iterations
        else:
            num_iterations = max(1, round(args.num_epochs * est_rows / rows_per_step))
        if resume_step is not None and resume_step > num_iterations:
            raise UserError(f"the checkpoint is at step {resume_step}, past --num-iterations {num_iterations}")
        eval_steps = max(1, args.eval_tokens // tokens_per_fwdbwd) if args.eval_tokens > 0 else 20 * grad_accum
        lrs = inherited_lrs(src_meta, args)
        user_config = dict(vars(args))
        derived = dict(model_tag=model_tag, source=f"{args.source}/{model_tag}@{src_step}", max_seq_len=T,
                       total_batch_size=total_batch_size, grad_accum=grad_accum, num_iterations=num_iterations,
                       estimated_rows_per_epoch=round(est_rows), mixture=spec, train_conversations=len(train_mix),
                       val_conversations=len(val_mix), eval_steps=eval_steps, world_size=world_size,
                       lrs={k: v * args.init_lr_frac for k, v in lrs.items()})
        print0(f"from {args.source}/{model_tag} step {src_step} -> {out_dir}")
        print0(f"batch: {total_batch_size:,} tokens/step = {B} rows x {T} tokens x {world_size} procs x {grad_accum} accum; "
               f"{num_iterations:,} steps (~{est_rows / rows_per_step:.1f} steps per epoch)")
        print0("learning rates: " + ", ".join(f"{k} {v:.4g}" for k, v in derived["lrs"].items())
               + f" (inherited x {args.init_lr_frac})")
        if args.dry_run:
            print0(derived)
            return 0

        use_compile = args.compile if args.compile is not None else device.type == "cuda"
        train_model = torch.compile(model, dynamic=False) if use_compile else model
        optimizer = model.setup_optimizer(weight_decay=args.weight_decay,
                                          **{k: v * args.init_lr_frac for k, v in lrs.items()})
        loader = ConversationLoader(train_mix, tokenizer, B, T, mode=mode, device=device, loop=True)

        loop = {}
        if resume_step is not None:
            _, shard, meta = ck.load_checkpoint(out_dir, resume_step, device, load_optimizer=True, rank=rank)
            optimizer.load_state_dict(shard["optimizer"])
            loader.load_state_dict(shard["extra"]["loader"])
            ck.set_rng_state(shard["rng"])
            loop = meta["loop"]
        ck.begin_run(out_dir, resume_step, master)
        start_step = resume_step or 0
        log = StepLog(device, total_batch_size, num_iterations, **loop)
        wandb_run = init_wandb(args.run, "nanochat-" + stage, {**user_config, **derived}, master)
        token_bytes = None
        if stage == "mid":
            from nanochat.tokenizer import get_token_bytes
            token_bytes = get_token_bytes(device)
        chatcore_tasks = [t.strip() for t in args.chatcore_tasks.split(",") if t.strip()]

        def save(step):
            meta = dict(model_config=model_config, user_config=user_config, derived=derived, step=step,
                        lrs=lrs, source=dict(stage=args.source, model_tag=model_tag, step=src_step),
                        world_size=world_size, val_loss=last_val,
                        loop=log.state())
            ck.save_checkpoint(out_dir, step, model.state_dict(), optimizer.state_dict(), meta, rank=rank,
                               extra={"loader": loader.state_dict()})
            print0(f"saved {out_dir} step {step}")

        step, record, last_val, last_chatcore = start_step, None, None, None
        while True:
            last = step == num_iterations
            fresh = step == start_step and resume_step is not None
            if not fresh and len(val_mix) >= world_size and (last or (args.eval_every > 0 and step % args.eval_every == 0)):
                model.eval()
                with autocast():
                    val = ConversationLoader(val_mix, tokenizer, B, T, mode=mode, device=device, loop=False)
                    last_val = evaluate_loss(model, val, eval_steps, device)
                    msg = f"val loss {last_val:.4f}"
                    record = record or {"step": step}
                    record["val_loss"] = last_val
                    if token_bytes is not None:
                        from nanochat.loss_eval import evaluate_bpb
                        val = ConversationLoader(val_mix, tokenizer, B, T, mode=mode, device=device, loop=False)
                        record["val_bpb"] = evaluate_bpb(model, val, eval_steps, token_bytes)
                        msg += f" | val bpb {record['val_bpb']:.4f}"
                model.train()
                print0(f"step {step:05d}/{num_iterations:05d} | {msg}")
            if not fresh and args.chatcore_every > 0 and chatcore_tasks and (last or (step > 0 and step % args.chatcore_every == 0)):
                accs, score = small_chatcore(model, tokenizer, device, chatcore_tasks, args.chatcore_max_problems,
                                             args.chatcore_max_new_tokens)
                last_chatcore = score
                print0(f"step {step:05d}/{num_iterations:05d} | ChatCORE {score:.4f} ("
                       + ", ".join(f"{k} {v:.3f}" for k, v in accs.items()) + ")")
                record = record or {"step": step}
                record.update({"chatcore": score, **{f"acc_{k}": v for k, v in accs.items()}})
            if record is not None:
                if master:
                    ck.append_metrics(out_dir, record)
                    wandb_run.log(record, step=record["step"])
                record = None
            if not fresh and (last or (args.save_every > 0 and step > 0 and step % args.save_every == 0)):
                save(step)
            if last:
                break
            log.begin_step()

            # --- one optimizer step: fetch all micro-batches first, to count the step's targets
            lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if stage == "mid" and group.get("kind") == "muon":
                    group["momentum"] = muon_momentum(step)
            batches, local_tokens = [], 0
            for _ in range(grad_accum):
                batches.append(next(loader))
                local_tokens += loader.last_targets  # counted on the host: no wait for the device
            # (with torchrun, one small all-reduce of the count: the only per-step sync)
            num_tokens = int(global_sum(local_tokens, device)) if world_size > 1 else local_tokens
            loss_total = torch.zeros((), device=device)
            for x, y in batches:
                with autocast():
                    loss, loss_sum = token_normalized_loss(train_model, x, y, num_tokens, world_size)
                loss.backward()
                loss_total += loss_sum.float()
            if num_tokens > 0:
                optimizer.step()
            else:  # nothing to learn from in this step (every target masked): leave the weights alone
                print0(f"step {step + 1}: no trainable targets in the whole batch; skipped")
            model.zero_grad(set_to_none=True)
            if world_size > 1:
                dist.all_reduce(loss_total, op=dist.ReduceOp.SUM)
            log.end_step(loss_total / max(1, num_tokens))
            step += 1
            if log.due(step, args.log_every):
                record = log.line(step, lrm, start_step, text=f" | trained tokens {num_tokens:,}",
                                  trained_tokens=num_tokens, epoch=loader.epoch)

        summary = {"model tag": model_tag, "source": derived["source"], "mixture": spec, "steps": num_iterations,
                   "tokens": num_iterations * total_batch_size, "total batch size": total_batch_size,
                   "training time (min)": round(log.total_time / 60, 2), "final val loss": last_val,
                   "ChatCORE (small)": last_chatcore, "processes": world_size}
        print0("summary: " + " | ".join(f"{k} {v}" for k, v in summary.items() if v is not None))
        if master:
            log_report(section, [user_config, summary])
        wandb_run.finish()
        return 0
    finally:
        compute_cleanup()


def add_lm_stage_flags(parser, stage, max_seq_len_default=-1):
    g = parser.add_argument_group("data and schedule")
    g.add_argument("--mixture", default=None, help=f"training mixture (default: chosen by what is in the data root). {MIXTURE_HELP}")
    g.add_argument("--max-seq-len", type=int, default=max_seq_len_default,
                   help="row length in tokens (default -1: the model's context)")
    g.add_argument("--eval-tokens", type=int, default=-1, help="validation tokens per evaluation (default: 20 optimizer steps' worth)")
    g.add_argument("--chatcore-tasks", default="ARC-Easy,ARC-Challenge,MMLU,GSM8K,HumanEval,SpellingBee",
                   help="tasks of the periodic small ChatCORE (default: all six)")
    g.add_argument("--chatcore-max-problems", type=int, default=64, help="problems per task of the small ChatCORE (default 64)")
    g.add_argument("--chatcore-max-new-tokens", type=int, default=256, help="longest generative answer in the small ChatCORE (default 256)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off elsewhere)")
    return g
