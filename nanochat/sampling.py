"""Sampling, apart from the batched decoding of engine.py:
- `sample(logits, ...)`: temperature / top-k / top-p sampling, with per-row settings.
- `Sequence`: one sequence being generated: its settings, its output so far, and the calculator
  tool's state machine (tokens between <|python_start|> and <|python_end|> are handed to
  `calculate`; a result is forced into the stream as <|output_start|> result <|output_end|>,
  with mask 0 so that training code can leave those tokens out of the loss).
- `reference_generate(model, ...)`: sampling without a KV cache, the reference the engine is
  tested against.
"""
from collections import deque

import torch
import torch.nn.functional as F

from nanochat.calculator import calculate

# Temperatures below the smallest normal float32 are greedy (see `sample`).
TINY_TEMPERATURE = torch.finfo(torch.float32).tiny


def check_settings(temperature, top_k=None, top_p=None):
    """ValueError unless the sampling settings are ones `sample` can honour: a finite
    temperature >= 0, top_k None or an integer >= 0 (0 = off), top_p None or in (0, 1]."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, not {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be None or an integer >= 0, not {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], not {top_p!r}")


# ---------------------------------------------------------------------------
# Sampling

def sample(logits, temperature, top_k=None, top_p=None, generator=None):
    """Next ids (B,) from logits (B, V). temperature, top_k, top_p are numbers (same for every
    row) or lists with one entry per row (None entries = no filtering; temperature 0 = greedy).
    Top-k keeps exactly the k largest logits (torch.topk's order); top-p then keeps the smallest
    set of likeliest tokens whose probability reaches p. When every row has a top-k, only the
    (B, max k) candidates are softmaxed and sampled, never the whole vocabulary (torch.multinomial
    draws one exponential per entry, a large part of a CPU decode step: docs/benchmarks.md).
    One torch.multinomial call for all rows; for a single row with a top-k this consumes
    the generator exactly like GPT.generate does.

    Any temperature >= 0 and top_p in (0, 1] is safe: a temperature too small for float32
    (below ~1.2e-38, where t / logits would underflow to 0 or overflow to inf) is greedy, which is
    what such a temperature means; logits are shifted by their row maximum before the division,
    so no value overflows into inf - inf; top-p always keeps the likeliest token, however small
    p. Logits that hold NaN or infinity (a broken model) raise ValueError instead of reaching
    torch.multinomial (which on CUDA would trip a device-side assert)."""
    B, V = logits.shape
    device = logits.device
    per_row = lambda x: list(x) if isinstance(x, (list, tuple)) else [x] * B
    temperature, top_k, top_p = per_row(temperature), per_row(top_k), per_row(top_p)
    greedy = [t is None or t < TINY_TEMPERATURE for t in temperature]
    if all(greedy):
        return logits.argmax(dim=-1)
    ks = [k if (k is not None and 0 < k < V) else None for k in top_k]
    if all(k is not None for k in ks):
        # candidates: the (B, kmax) largest logits, in descending order; a row's columns beyond
        # its own k are masked out
        kmax = max(ks)
        cand, cand_ids = torch.topk(logits, kmax, dim=-1)
        if min(ks) < kmax:
            cols = torch.arange(kmax, device=device)
            cand = cand.masked_fill(cols >= torch.tensor(ks, device=device)[:, None], float("-inf"))
        is_sorted = True
    else:
        cand, cand_ids, is_sorted = logits, None, False
        if any(k is not None for k in ks):
            # mixed rows: rows with a k keep their k largest, the others everything
            kmax = max(k for k in ks if k is not None)
            top_ids = torch.topk(logits, kmax, dim=-1).indices
            cols = torch.arange(kmax, device=device)
            kept = cols < torch.tensor([k or 0 for k in ks], device=device)[:, None]
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top_ids, kept)
            keep |= torch.tensor([k is None for k in ks], device=device)[:, None]
            cand = logits.masked_fill(~keep, float("-inf"))
    temps = torch.tensor([1.0 if g else t for g, t in zip(greedy, temperature)], device=device, dtype=cand.dtype)
    # shift first: every value is then <= 0 and the division can only go down to -inf (exp = 0)
    cand = cand - cand.max(dim=-1, keepdim=True).values
    probs = F.softmax(cand / temps[:, None], dim=-1)
    if not bool(torch.isfinite(probs).all()):
        bad = [i for i, ok in enumerate(torch.isfinite(probs).all(dim=-1).tolist()) if not ok]
        raise ValueError(f"the logits of row(s) {bad} hold NaN or infinity: cannot sample")
    ps = [p if (p is not None and p < 1.0) else None for p in top_p]
    if any(p is not None for p in ps):
        if is_sorted:
            sorted_probs, order = probs, None
        else:
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs                   # mass of the likelier tokens
        limit = torch.tensor([p if p is not None else 2.0 for p in ps], device=device, dtype=probs.dtype)
        keep_sorted = before < limit[:, None]
        keep_sorted[:, 0] = True  # the likeliest token always stays, even when p underflows to 0 in float32
        keep = keep_sorted if order is None else torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    ids = torch.multinomial(probs, num_samples=1, generator=generator)
    ids = (ids if cand_ids is None else cand_ids.gather(1, ids)).squeeze(1)
    if any(greedy):
        ids = torch.where(torch.tensor(greedy, device=device), logits.argmax(dim=-1), ids)
    return ids


# ---------------------------------------------------------------------------
# One sequence and its tool-use state machine

class Sequence:
    """A prompt being continued. `out`/`masks`: the generated tokens (without the final stop
    token) and their masks (1 = sampled, 0 = forced by the tool). `done` with `finish_reason`
    "stop" (<|assistant_end|> or <|bos|> sampled) or "length" (max_tokens or the cache is full).
    `owner`: anything the caller wants to find again (the server's request). `seed`: this
    sequence samples from its own generator seeded with it, so its output does not depend on
    which other sequences share the batch (None: the decoder's shared generator). A sequence
    whose sampling failed ends alone with finish_reason "error" and the reason in `error`."""

    def __init__(self, prompt, max_tokens=None, temperature=1.0, top_k=None, top_p=None, owner=None, seed=None):
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        check_settings(temperature, top_k, top_p)
        self.prompt = [int(t) for t in prompt]
        self.max_tokens = max_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.owner = owner
        self.seed = seed
        self.generator = None  # created by BatchDecoder.add when seed is set
        self.out, self.masks = [], []
        self.forced = deque()
        self.done, self.finish_reason, self.error = False, None, None
        self.limit = None      # set by BatchDecoder: max_tokens capped by the room left in the cache
        self.specials = None   # set by BatchDecoder.add
        self.in_python, self.expr = False, []

    def _init_tools(self, specials):
        """A prompt may end inside a python block (<|python_start|> without its <|python_end|>):
        pick up the state machine from there."""
        self.specials = specials
        start, end = specials["python_start"], specials["python_end"]
        for i in range(len(self.prompt) - 1, -1, -1):
            if self.prompt[i] == end:
                break
            if self.prompt[i] == start:
                self.in_python, self.expr = True, self.prompt[i + 1:]
                break

    def choose(self, sampled):
        """(token, mask) to emit next: a pending forced tool token, else the sampled one."""
        if self.forced:
            return self.forced.popleft(), 0
        return sampled, 1

    def accept(self, token, mask, tokenizer):
        """Record the emitted token and advance the tool state machine."""
        s = self.specials
        if token in s["stop"]:
            self.done, self.finish_reason = True, "stop"
            return
        self.out.append(token)
        self.masks.append(mask)
        if token == s["python_start"]:
            self.in_python, self.expr = True, []
        elif token == s["python_end"] and self.in_python:
            self.in_python = False
            result = calculate(tokenizer.decode(self.expr))
            if result is not None:
                self.forced.extend([s["output_start"]] + tokenizer.encode(str(result)) + [s["output_end"]])
            self.expr = []
        elif self.in_python:
            self.expr.append(token)
        if len(self.out) >= self.limit:
            self.done, self.finish_reason = True, "length"


@torch.inference_mode()
def reference_generate(model, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
    """Yield max_tokens sampled ids after the prompt `tokens` (ints), without a KV cache (the
    reference for the batched decoding here): temperature 0 = greedy; else softmax(logits / temperature)
    over the top_k (or all) of the last position, torch.multinomial with a `seed`ed generator."""
    device = model.get_device()
    rng = None
    if temperature > 0:
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
    for _ in range(max_tokens):
        logits = model(ids)[:, -1, :]
        if temperature > 0:
            cand_ids = None
            if top_k is not None and 0 < top_k < logits.size(-1):
                logits, cand_ids = torch.topk(logits, top_k, dim=-1)
            probs = F.softmax(logits / temperature, dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            if cand_ids is not None:
                next_id = cand_ids.gather(1, next_id)
        else:
            next_id = torch.argmax(logits, dim=-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
        yield next_id.item()
