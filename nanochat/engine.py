"""Fast generation: a preallocated KV cache, batched prefill and decoding, sampling, tool use.

Three layers, each usable on its own:
- `sample(logits, ...)` and `Sequence` (nanochat/sampling.py): sampling with per-row settings,
  and one sequence being generated with the calculator tool's state machine.
- `BatchDecoder`: a static KV cache of `batch_size` rows that sequences join (their prompts are
  prefilled together, right-padded, in one forward) and leave (the last row is copied into the
  freed one, so the active rows stay 0..n-1). Each `step()` decodes one token for every active
  row in one forward. The server's continuous batching and the `Engine` below both run on it.
  With `compile=True` the decode step is torch.compile'd with static shapes (CUDA graphs on
  CUDA): see `BatchDecoder.__init__`.

`Engine(model, tokenizer)` is the user-facing API: `generate` streams (token_column,
mask_column) for K samples of one prompt (prefilled once, then forked into K rows),
`generate_batch` returns them whole, and `generate_many` runs many different prompts.
"""
from collections import deque

import torch

from nanochat.common import get_compute_dtype
from nanochat.sampling import Sequence, reference_generate, sample

# Upper bound on (rows x padded prompt length) prefilled in one forward. Only the last prompt
# position of each row goes through lm_head (logits_positions), so this bounds the activations.
PREFILL_TOKEN_BUDGET = 8192
# Decode attends over the first kv_len cache positions, kv_len known on the host (no device sync).
# On CUDA it is rounded up to a multiple of this, so consecutive steps share shapes (fewer
# distinct kernels / compiled graphs); on CPU the exact length is cheapest. A BatchDecoder's
# `kv_bucket` >= max_len makes every decode step attend over the whole cache (static shapes).
KV_LEN_BUCKET_CUDA = 256


# ---------------------------------------------------------------------------
# Continuous batching over a static KV cache

class BatchDecoder:
    """Active sequences live in cache rows 0..n-1 (row i holds self.seqs[i]). Nothing is
    allocated per step except what the model's forward allocates itself: the cache and the
    input-token buffer are created once."""

    def __init__(self, model, tokenizer, batch_size, max_len=None, seed=42, compile=False):
        """compile=True: decode steps run a torch.compile'd forward with static shapes: the rows
        are padded up to a power of two (at most batch_size; padded rows are free rows, decoded
        and ignored) and attention always spans the whole cache (kv_len = max_len, keys beyond a
        row's length masked), so there is one compiled graph per row bucket, compiled on first
        use. On CUDA the mode is "reduce-overhead" (CUDA graphs: one launch per step, the cache
        tensors marked as static addresses); elsewhere the default mode (fused elementwise
        kernels). Prefill stays eager (its shapes vary with every prompt)."""
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_len = max_len or model.config.sequence_len
        self.device = model.get_device()
        # weights stay fp32; on CUDA the matmuls run in bf16 under autocast (like training does)
        self.dtype = get_compute_dtype(self.device.type)
        self.cache = model.new_kv_cache(batch_size, self.max_len)
        self.inputs = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        # a decode step's logits_positions: (row r, its one new position) for rows 0..n-1
        self.step_positions = (torch.arange(batch_size, device=self.device),
                               torch.zeros(batch_size, dtype=torch.long, device=self.device))
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        enc = tokenizer.encode_special
        self.specials = {
            "stop": tokenizer.stop_ids(),
            "python_start": enc("<|python_start|>"), "python_end": enc("<|python_end|>"),
            "output_start": enc("<|output_start|>"), "output_end": enc("<|output_end|>"),
        }
        self.seqs = []
        self.lens = [0] * batch_size  # tokens in each cache row, mirrored on the host
        self.kv_bucket = KV_LEN_BUCKET_CUDA if self.device.type == "cuda" else 1
        self.compiled = None
        if compile:
            self.views = {}  # row bucket -> (inputs, KVCache) views of rows 0..bucket-1, the same objects every step
            # one graph per row bucket: past dynamo's recompile limit a bucket would silently run
            # eager, so make room for ours (plus what the process compiled before)
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, 8 + len(self.row_buckets()))
            self.compiled = torch.compile(model, dynamic=False,
                                          mode="reduce-overhead" if self.device.type == "cuda" else None)

    def _forward(self, ids, cache, kv_len, positions=None, model=None):
        with torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return (self.model if model is None else model)(ids, kv_cache=cache, kv_len=kv_len, logits_positions=positions)

    def _compiled_step(self, n):
        """Logits (n, V) of one decode step through the compiled forward, over a power-of-two
        bucket of rows. The padded rows are free: their length is reset to 0 so that the token
        written there stays inside the cache (add() resets and prefills them when they are used)."""
        bucket = min(1 << (n - 1).bit_length(), self.batch_size)
        if bucket not in self.views:
            view = self.cache.narrow(0, bucket)
            inputs = self.inputs[:bucket]
            positions = tuple(t[:bucket] for t in self.step_positions)
            if self.device.type == "cuda":
                # CUDA graphs read and write these in place instead of copying them every replay
                for t in view.tensors() + [inputs, *positions]:
                    torch._dynamo.mark_static_address(t)
            self.views[bucket] = (inputs, view, positions)
        if bucket > n:
            self.cache.lengths[n:bucket].zero_()
        inputs, view, positions = self.views[bucket]
        logits = self._forward(inputs, view, self.max_len, positions=positions, model=self.compiled)
        # CUDA graphs reuse their output buffer on the next replay: keep our own copy
        return logits[:n].clone()

    def _kv_len(self, needed):
        return min(-(-needed // self.kv_bucket) * self.kv_bucket, self.max_len)

    def row_buckets(self):
        """The row counts the compiled decode step runs at: powers of two, then batch_size."""
        out, b = [], 1
        while b < self.batch_size:
            out.append(b)
            b *= 2
        return out + [self.batch_size]

    @torch.inference_mode()
    def warmup(self, repeats=3):
        """Compile (and on CUDA record the graphs of) every row bucket now rather than on the
        first requests. Only while no sequence is active: the rows it decodes are free.
        With CUDA graphs, call it from the thread that will decode (graphs are per thread)."""
        if self.compiled is None:
            return
        if self.seqs:
            raise RuntimeError("warmup() needs an empty decoder")
        self.cache.reset()
        for bucket in self.row_buckets():
            for _ in range(repeats):
                self._compiled_step(bucket)
        self.cache.reset()

    def _copy_row(self, src, dst):
        self.cache.copy_row(src, dst)
        self.lens[dst] = self.lens[src]

    def free(self):
        return self.batch_size - len(self.seqs)

    def _settings(self, seqs):
        return ([s.temperature for s in seqs], [s.top_k for s in seqs], [s.top_p for s in seqs])

    def _sample(self, seqs, logits):
        """One sampled id per sequence, or the exception of a row that cannot be sampled (NaN
        logits): it never takes the other rows down with it. Sequences with their own seed are
        sampled one by one with their own generator; the others together with the shared one,
        and one at a time only if that fails (sample() checks before it draws, so the failed
        attempt consumed nothing)."""
        out = [None] * len(seqs)

        def one(i, generator):
            q = seqs[i]
            try:
                out[i] = int(sample(logits[i:i + 1], q.temperature, q.top_k, q.top_p, generator=generator)[0])
            except Exception as e:
                out[i] = e
        for i, q in enumerate(seqs):
            if q.generator is not None:
                one(i, q.generator)
        shared = [i for i, q in enumerate(seqs) if q.generator is None]
        if shared:
            t, k, p = self._settings([seqs[i] for i in shared])
            rows = logits if len(shared) == len(seqs) else logits[shared]
            try:
                for i, tok in zip(shared, sample(rows, t, k, p, generator=self.generator).tolist()):
                    out[i] = tok
            except Exception:
                for i in shared:
                    one(i, self.generator)
        return out

    def _advance(self, seqs, logits):
        """Sample one token per sequence from logits (len(seqs), V), apply forced tool tokens,
        update the sequences. Returns [(seq, token, mask)]. A row that cannot be sampled ends
        alone, with finish_reason "error" and the reason in seq.error (its token is then <|bos|>,
        a stop token, so it carries no text)."""
        bos = self.tokenizer.get_bos_token_id()
        produced = []
        for seq, s in zip(seqs, self._sample(seqs, logits)):
            if isinstance(s, Exception):
                seq.done, seq.finish_reason, seq.error = True, "error", f"sampling failed: {type(s).__name__}: {s}"
                produced.append((seq, bos, 0))
                continue
            token, mask = seq.choose(s)
            seq.accept(token, mask, self.tokenizer)
            produced.append((seq, token, mask))
        return produced

    def _prefill(self, prompts, row):
        """Prefill prompts (shortest first) into cache rows row.. together, right-padded (a row's
        padding lies beyond its length, so it is never attended to and is overwritten by the next
        tokens). Returns the logits of each prompt's last token."""
        T = len(prompts[-1])
        ids = torch.zeros(len(prompts), T, dtype=torch.long)
        for r, u in enumerate(prompts):
            ids[r, :len(u)] = torch.tensor(u)
        view = self.cache.narrow(row, len(prompts))
        view.reset()
        lengths = torch.tensor([len(u) for u in prompts], device=self.device)
        # logits of each row's last prompt token only
        rows = torch.arange(len(prompts), device=self.device)
        picked = self._forward(ids.to(self.device), view, T, positions=(rows, lengths - 1))
        view.lengths.copy_(lengths)  # undo the padding
        for r, u in enumerate(prompts):
            self.lens[row + r] = len(u)
        return picked

    @torch.inference_mode()
    def add(self, new):
        """Prefill new sequences into free rows and sample their first tokens. Identical prompts
        are prefilled once and the row is forked; different prompts are right-padded and
        prefilled together (a row's padding lies beyond its length, so it is never attended to
        and is overwritten by the next tokens). Returns [(seq, token, mask)] of the first tokens."""
        if len(new) > self.free():
            raise ValueError(f"{len(new)} sequences do not fit in {self.free()} free rows")
        for seq in new:
            if len(seq.prompt) >= self.max_len:
                raise ValueError(f"prompt of {len(seq.prompt)} tokens does not fit the cache ({self.max_len})")
            room = self.max_len - len(seq.prompt)
            seq.limit = room if seq.max_tokens is None else min(seq.max_tokens, room)
            seq._init_tools(self.specials)
            if seq.seed is not None and seq.generator is None:
                seq.generator = torch.Generator(device=self.device)
                seq.generator.manual_seed(seq.seed)
        # unique prompts first, shortest first (so padded groups waste little), then their copies;
        # seeded sequences last, each prefilled alone (see step)
        groups = {}
        for seq in new:
            if seq.seed is None:
                groups.setdefault(tuple(seq.prompt), []).append(seq)
        uniques = sorted(groups, key=len)
        seeded = [s for s in new if s.seed is not None]
        first_row = len(self.seqs)
        order = [groups[u][0] for u in uniques] + [s for u in uniques for s in groups[u][1:]]
        self.seqs.extend(order + seeded)
        last_logits = {}
        i = 0
        while i < len(uniques):
            # grow the group while its padded size stays within the budget (always at least one)
            j = i + 1
            while j < len(uniques) and (j + 1 - i) * len(uniques[j]) <= PREFILL_TOKEN_BUDGET:
                j += 1
            for r, row_logits in enumerate(self._prefill(uniques[i:j], first_row + i)):
                last_logits[uniques[i + r]] = row_logits
            i = j
        # copies of a prompt: fork its prefilled row
        row_of = {tuple(s.prompt): first_row + n for n, s in enumerate(order[:len(uniques)])}
        for n, seq in enumerate(order[len(uniques):], start=first_row + len(uniques)):
            self._copy_row(row_of[tuple(seq.prompt)], n)
        rows = [last_logits[tuple(s.prompt)] for s in order]
        rows += [self._prefill([s.prompt], first_row + len(order) + n)[0] for n, s in enumerate(seeded)]
        order += seeded
        produced = self._advance(order, torch.stack(rows))
        for n, (seq, token, _) in enumerate(produced, start=first_row):
            self.inputs[n, 0] = token
        return produced

    @torch.inference_mode()
    def step(self):
        """Decode one token for every active sequence (finished ones should be removed first)."""
        n = len(self.seqs)
        if n == 0:
            return []
        alone = [r for r, s in enumerate(self.seqs) if s.seed is not None]
        if len(alone) == n:
            logits = None
        elif self.compiled is not None:
            logits = self._compiled_step(n)
        else:
            kv_len = self._kv_len(max(self.lens[:n]) + 1)
            positions = tuple(t[:n] for t in self.step_positions)
            logits = self._forward(self.inputs[:n], self.cache.narrow(0, n), kv_len, positions=positions)
        if alone:
            # A seeded row's logits come from a forward of that row alone: floating-point sums
            # depend on the batch's shape (last bits), and a sampled token can flip on them.
            # Its key/value written by the batched step (if any) is overwritten at the same place.
            own = []
            for r in alone:
                if logits is not None:
                    self.cache.lengths[r] -= 1
                own.append(self._forward(self.inputs[r:r + 1], self.cache.narrow(r, 1),
                                         self._kv_len(self.lens[r] + 1), positions=tuple(t[:1] for t in self.step_positions))[0])
            if logits is None:
                logits = torch.stack(own)
            else:
                logits[alone] = torch.stack(own).to(logits.dtype)
        for r in range(n):
            self.lens[r] += 1
        produced = self._advance(self.seqs, logits)
        self.inputs[:n, 0].copy_(torch.tensor([tok for _, tok, _ in produced]), non_blocking=True)
        return produced

    def remove(self, seq):
        """Free a sequence's row: the last active row moves into it (rows stay contiguous)."""
        i = self.seqs.index(seq)
        last = len(self.seqs) - 1
        if i != last:
            self._copy_row(last, i)
            self.inputs[i].copy_(self.inputs[last])
            self.seqs[i] = self.seqs[last]
        self.seqs.pop()

    def remove_done(self):
        for seq in [s for s in self.seqs if s.done]:
            self.remove(seq)


# ---------------------------------------------------------------------------
# The user-facing API

# The prompts whose greedy continuations `train base` and `eval base` show
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def greedy_samples(model, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens=16):
    """Each prompt followed by its greedy continuation (reference_generate, up to a <|bos|>)."""
    bos = tokenizer.get_bos_token_id()
    samples = []
    for prompt in prompts:
        out = []
        for tok in reference_generate(model, tokenizer.encode(prompt, prepend=bos), max_tokens, temperature=0.0):
            if tok == bos:
                break
            out.append(tok)
        samples.append(prompt + tokenizer.decode(out))
    return samples

class Engine:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def _max_len(self, prompt_len, max_tokens):
        # the cache only needs room for this request (the last sampled token is never fed back)
        if max_tokens is None:
            return self.model.config.sequence_len
        return prompt_len + max_tokens

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42):
        """Yield (token_column, mask_column), lists of num_samples entries, once per step. The
        prompt is prefilled once and forked into num_samples rows. A row's stop token
        (<|assistant_end|> or <|bos|>) is yielded once; after that the row's entries are
        <|bos|> with mask 0 (padding) until every row is done or max_tokens is reached.
        max_tokens None = until the model's context (config.sequence_len) is full. A row whose
        sampling failed (NaN logits) raises RuntimeError: all rows share one prompt and model."""
        tokens = list(tokens)
        dec = BatchDecoder(self.model, self.tokenizer, num_samples,
                           max_len=self._max_len(len(tokens), max_tokens), seed=seed)
        seqs = [Sequence(tokens, max_tokens, temperature, top_k, top_p, owner=i) for i in range(num_samples)]
        pad = self.tokenizer.get_bos_token_id()
        produced = dec.add(seqs)
        while True:
            col, masks = [pad] * num_samples, [0] * num_samples
            for seq, token, mask in produced:
                if seq.error:
                    raise RuntimeError(seq.error)
                col[seq.owner], masks[seq.owner] = token, mask
            yield col, masks
            dec.remove_done()  # finished rows leave, the others keep decoding in fewer rows
            if not dec.seqs:
                return
            produced = dec.step()

    def generate_batch(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42,
                       keep_stop=False):
        """(results, masks): num_samples token lists, each the prompt followed by the generated
        tokens without the stop token (with it, when sampled, if keep_stop: RL trains on it);
        masks are 0 on the prompt and on forced tool tokens."""
        tokens = list(tokens)
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        stop = self.tokenizer.stop_ids()
        for col, mcol in self.generate(tokens, num_samples, max_tokens, temperature, top_k, top_p, seed):
            for i, (tok, m) in enumerate(zip(col, mcol)):
                if done[i]:
                    continue
                if tok in stop:
                    done[i] = True
                    if not (keep_stop and m):  # mask 0: the padding of a row that ran out of tokens
                        continue
                results[i].append(tok)
                masks[i].append(m)
            if all(done):
                break
        return results, masks

    @torch.inference_mode()
    def generate_many(self, prompts, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42,
                      batch_size=32, callback=None):
        """Continue many different prompts (of any lengths) with continuous batching: up to
        batch_size rows decode together and a finished row is refilled with the next waiting
        prompt. Returns (results, masks) in the order of `prompts`, like generate_batch (one
        sample each). callback(index, token, mask), if given, sees every emitted token. A row
        whose sampling fails ends there (its result is what it had generated); the others go on."""
        prompts = [list(p) for p in prompts]
        if not prompts:
            return [], []
        longest = max(len(p) for p in prompts)
        max_len = self.model.config.sequence_len if max_tokens is None else longest + max_tokens
        dec = BatchDecoder(self.model, self.tokenizer, min(batch_size, len(prompts)), max_len=max_len, seed=seed)
        waiting = deque(Sequence(p, max_tokens, temperature, top_k, top_p, owner=i) for i, p in enumerate(prompts))
        finished = []
        while waiting or dec.seqs:
            produced = []
            if waiting and dec.free():
                produced += dec.add([waiting.popleft() for _ in range(min(dec.free(), len(waiting)))])
                finished += [s for s in dec.seqs if s.done]
                dec.remove_done()  # a row must not be stepped after its sequence ended
            if dec.seqs:
                produced += dec.step()
                finished += [s for s in dec.seqs if s.done]
                dec.remove_done()
            if callback is not None:
                for seq, token, mask in produced:
                    callback(seq.owner, token, mask)
        finished.sort(key=lambda s: s.owner)
        results = [s.prompt + s.out for s in finished]
        masks = [[0] * len(s.prompt) + s.masks for s in finished]
        return results, masks
