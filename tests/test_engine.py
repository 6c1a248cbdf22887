"""nanochat.engine against the no-cache reference GPT.generate, plus sampling, seeds, stop tokens
and the calculator tool's state machine."""
import pytest
import torch

from helpers import Scripted, Wrapped, make_model
from nanochat.engine import BatchDecoder, Engine, Sequence, reference_generate, sample


@pytest.fixture(scope="module")
def model(tokenizer):
    m = make_model(tokenizer.get_vocab_size())
    with torch.no_grad():
        # a strong smear and backout (init has smear_lambda = 0): the cached decode must carry
        # each row's previous token through padded prefill, forks, row moves and compiled steps
        m.smear_lambda.fill_(1.0)
        m.backout_lambda.fill_(0.4)
    return m


def test_the_model_smears(model, tokenizer, prompts):
    """The fixture's smear is strong enough to change greedy tokens (else the equivalence tests
    below could not see a cache that lost the previous token)."""
    ids = prompts[1]
    with torch.no_grad():
        on = model(torch.tensor([ids])).argmax(-1)
        model.smear_lambda.zero_()
        off = model(torch.tensor([ids])).argmax(-1)
        model.smear_lambda.fill_(1.0)
    assert (on != off).any()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["Hello there", "The quick brown fox jumps over the lazy dog and", "a", "What is 12*13? Let me think",
             "Once upon a time, in a land far away, there lived a"]
    out = [tokenizer.encode(t, prepend="<|bos|>") for t in texts]
    out.append(tokenizer.render_for_completion({"messages": [{"role": "user", "content": "Hi!"}]}))
    return out


def stop_ids(tokenizer):
    return {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}


def drain(dec):
    """Step a BatchDecoder until every sequence in it has finished."""
    while True:
        dec.remove_done()
        if not dec.seqs:
            return
        dec.step()


def check_against_reference(model, tokenizer, prompt, result, max_tokens):
    """result = prompt + generated (stop token dropped): equal to the reference's first tokens,
    and if it ended early, the reference's next token is a stop token."""
    ref = list(reference_generate(model, prompt, max_tokens, temperature=0))
    gen = result[len(prompt):]
    assert result[:len(prompt)] == prompt
    assert gen == ref[:len(gen)]
    if len(gen) < max_tokens:
        assert ref[len(gen)] in stop_ids(tokenizer)


def test_greedy_equals_reference(model, tokenizer, prompts):
    engine = Engine(model, tokenizer)
    for prompt in prompts:
        results, masks = engine.generate_batch(prompt, num_samples=1, max_tokens=24, temperature=0)
        check_against_reference(model, tokenizer, prompt, results[0], 24)
        assert all(m == 1 for m in masks[0][len(prompt):])


def test_fork_greedy_samples_identical(model, tokenizer, prompts):
    engine = Engine(model, tokenizer)
    results, _ = engine.generate_batch(prompts[1], num_samples=3, max_tokens=16, temperature=0)
    assert results[0] == results[1] == results[2]
    check_against_reference(model, tokenizer, prompts[1], results[0], 16)


def test_many_prompts_of_different_lengths(model, tokenizer, prompts):
    """Batched right-padded prefill + continuous batching (3 rows for 6 prompts) still gives the
    reference's greedy output for every prompt."""
    engine = Engine(model, tokenizer)
    seen = []
    results, masks = engine.generate_many(prompts, max_tokens=20, temperature=0, batch_size=3,
                                          callback=lambda i, t, m: seen.append(i))
    assert len(results) == len(prompts)
    for prompt, result, mask in zip(prompts, results, masks):
        check_against_reference(model, tokenizer, prompt, result, 20)
        assert len(mask) == len(result)
    assert set(seen) == set(range(len(prompts)))


@pytest.mark.parametrize("bucket", [1, 10**9])
def test_static_cache_decode_equals_reference(model, tokenizer, prompts, bucket):
    """Decode with the host-side kv_len (bucket 1: exact length; huge bucket: every step attends
    over the whole cache, static shapes as a CUDA graph needs) and last-position-only prefill
    logits: greedy output equals GPT.generate for prompts of different lengths in one batch."""
    dec = BatchDecoder(model, tokenizer, len(prompts), max_len=max(len(p) for p in prompts) + 16)
    dec.kv_bucket = bucket
    dec.specials["stop"] = set()  # run every row the full 16 tokens
    seqs = [Sequence(p, max_tokens=16, temperature=0) for p in prompts]
    calls = []
    real_forward = model.forward

    def spy(idx, *a, **kw):
        calls.append((idx.shape, kw.get("kv_len"), kw.get("logits_positions")))
        return real_forward(idx, *a, **kw)
    model.forward = spy
    try:
        dec.add(seqs)
        while dec.seqs:
            dec.step()
            dec.remove_done()
    finally:
        del model.forward
    for seq in seqs:
        assert seq.out == list(reference_generate(model, seq.prompt, 16, temperature=0))
    assert all(kv is not None and pos is not None for _, kv, pos in calls)  # never the synced path
    if bucket > 1:
        assert {kv for shape, kv, _ in calls if shape[1] == 1} == {dec.max_len}


def test_mixed_settings_in_one_batch(model, tokenizer, prompts):
    """Greedy rows stay exact while sampled rows share their forward passes, and each sampled row
    obeys its own settings: every token of the top-k row is among the 5 likeliest, every token of
    the top-p row inside its nucleus (at its temperature), per the no-cache reference logits."""
    def run():
        dec = BatchDecoder(model, tokenizer, batch_size=4, seed=3)
        seqs = [Sequence(prompts[0], 12, temperature=0), Sequence(prompts[1], 12, temperature=1.0, top_k=5),
                Sequence(prompts[3], 12, temperature=0), Sequence(prompts[4], 12, temperature=0.7, top_p=0.9)]
        dec.add(seqs)
        drain(dec)
        return seqs
    seqs = run()
    for seq in (seqs[0], seqs[2]):
        check_against_reference(model, tokenizer, seq.prompt, seq.prompt + seq.out, 12)
    greedy = {i: list(reference_generate(model, seqs[i].prompt, 12, temperature=0)) for i in (1, 3)}
    with torch.no_grad():
        for i, check in ((1, "top_k"), (3, "top_p")):
            seq = seqs[i]
            assert len(seq.out) == 12 or seq.finish_reason == "stop"
            for n, tok in enumerate(seq.out):
                logits = model(torch.tensor([seq.prompt + seq.out[:n]]))[0, -1]
                if check == "top_k":
                    assert tok in torch.topk(logits, 5).indices.tolist(), (n, tok)
                else:
                    probs = torch.softmax(logits / 0.7, dim=-1)
                    likelier = probs[probs > probs[tok]].sum()  # the mass of the tokens ranked above it
                    assert likelier < 0.9, (n, tok, float(likelier))
            assert seq.out != greedy[i][:len(seq.out)]  # really sampled, not greedy
    assert [s.out for s in run()] == [s.out for s in seqs]  # the decoder's seed fixes every row


def test_seeds(model, tokenizer, prompts):
    engine = Engine(model, tokenizer)
    a, _ = engine.generate_batch(prompts[0], num_samples=2, max_tokens=30, temperature=1.0, seed=1)
    b, _ = engine.generate_batch(prompts[0], num_samples=2, max_tokens=30, temperature=1.0, seed=1)
    c, _ = engine.generate_batch(prompts[0], num_samples=2, max_tokens=30, temperature=1.0, seed=2)
    assert a == b
    assert a != c
    assert a[0] != a[1]  # forked rows draw different samples


def test_sampling_matches_reference_with_same_seed(model, tokenizer, prompts):
    """One sample consumes the generator exactly like GPT.generate (same top-k and temperature)."""
    engine = Engine(model, tokenizer)
    prompt = prompts[2]
    ref = list(reference_generate(model, prompt, 15, temperature=0.9, top_k=20, seed=7))
    results, _ = engine.generate_batch(prompt, max_tokens=15, temperature=0.9, top_k=20, seed=7)
    gen = results[0][len(prompt):]
    assert gen == ref[:len(gen)]


def test_top_k_and_top_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=g).repeat(2000, 1)
    top5 = set(torch.topk(logits[0], 5).indices.tolist())
    ids = sample(logits, 1.0, top_k=5, generator=g)
    assert set(ids.tolist()) == top5  # only the top 5, and (2000 draws) all of them
    # top-p: probabilities 0.5, 0.3, 0.15, 0.05 -> p=0.7 keeps the first two only
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(2000, 1)
    ids = sample(logits, 1.0, top_p=0.7, generator=g)
    assert set(ids.tolist()) == {0, 1}
    assert set(sample(logits, 1.0, generator=g).tolist()) == {0, 1, 2, 3}
    # temperature 0 and top_k=1 are greedy; per-row settings mix
    logits = torch.randn(4, 30, generator=g)
    assert sample(logits, 0.0).tolist() == logits.argmax(-1).tolist()
    assert sample(logits, 1.0, top_k=1, generator=g).tolist() == logits.argmax(-1).tolist()
    mixed = sample(logits, [0.0, 1.0, 0.0, 1.0], top_k=[None, 1, None, None], generator=g)
    assert mixed[:3].tolist() == logits.argmax(-1)[:3].tolist()


def test_top_k_sampling_distribution_and_per_row_k():
    """The top-k fast path (only the k candidates are sampled) draws from the softmax of the k
    largest logits at the row's temperature, with each row's own k, and agrees with the mixed
    path (a row without top-k in the batch) on which tokens can come out."""
    g = torch.Generator().manual_seed(1)
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
    logits = row.repeat(6000, 1)
    ids = sample(logits, 0.5, top_k=3, generator=g)
    want = torch.softmax(torch.tensor([3.0, 2.0, 1.0]) / 0.5, dim=0)       # ids 5, 0, 1
    freq = torch.bincount(ids, minlength=6).float() / len(ids)
    assert freq[[5, 0, 1]].tolist() == pytest.approx(want.tolist(), abs=0.02)
    assert freq[[2, 3, 4]].sum() == 0
    # per-row k: row 0 keeps 1 (greedy), row 1 keeps 4, in one fast-path call
    both = torch.stack([row, row]).repeat(3000, 1)
    ids = sample(both, 1.0, top_k=[1, 4] * 3000, generator=g).view(3000, 2)
    assert set(ids[:, 0].tolist()) == {5}
    assert set(ids[:, 1].tolist()) == {5, 0, 1, 2}
    # a row without top-k (mixed path) still sees the whole vocabulary, the top-k row its k
    ids = sample(both, 1.0, top_k=[2, None] * 3000, generator=g).view(3000, 2)
    assert set(ids[:, 0].tolist()) == {5, 0}
    assert set(ids[:, 1].tolist()) == set(range(6))
    # top-k then top-p on the sorted candidates: probs of the 3 kept ~ .67/.24/.09 -> p=0.8 keeps 2
    ids = sample(logits, 1.0, top_k=3, top_p=0.8, generator=g)
    assert set(ids.tolist()) == {5, 0}


# ---------------------------------------------------------------------------
# Tool use and stop tokens, with a scripted model (helpers.Scripted)

def run_script(model, tokenizer, prompt, script, max_tokens=40):
    engine = Engine(Scripted(model, len(prompt), script), tokenizer)
    cols = list(engine.generate(prompt, max_tokens=max_tokens, temperature=0))
    results, masks = engine.generate_batch(prompt, max_tokens=max_tokens, temperature=0)
    return cols, results[0][len(prompt):], masks[0][len(prompt):]


def test_calculator_output_is_forced_with_mask_zero(model, tokenizer):
    sp = tokenizer.encode_special
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "1+2?"}]})
    call = [sp("<|python_start|>")] + tokenizer.encode("1+2") + [sp("<|python_end|>")]
    forced = [sp("<|output_start|>")] + tokenizer.encode("3") + [sp("<|output_end|>")]
    answer = tokenizer.encode(" It is 3.")
    # the script's entries at the forced positions are junk (0): the engine must override them
    script = call + [0] * len(forced) + answer + [sp("<|assistant_end|>")]
    cols, out, masks = run_script(model, tokenizer, prompt, script)
    assert out == call + forced + answer
    assert masks == [1] * len(call) + [0] * len(forced) + [1] * len(answer)
    assert cols[-1] == ([sp("<|assistant_end|>")], [1])  # the stop token is yielded, then it ends
    assert len(cols) == len(script)


def test_prompt_ending_inside_python_block(model, tokenizer):
    sp = tokenizer.encode_special
    prompt = (tokenizer.render_for_completion({"messages": [{"role": "user", "content": "6*7?"}]})
              + [sp("<|python_start|>")] + tokenizer.encode("6*7"))
    forced = [sp("<|output_start|>")] + tokenizer.encode("42") + [sp("<|output_end|>")]
    script = [sp("<|python_end|>")] + [0] * len(forced) + [sp("<|assistant_end|>")]
    _, out, masks = run_script(model, tokenizer, prompt, script)
    assert out == [sp("<|python_end|>")] + forced
    assert masks == [1] + [0] * len(forced)


def test_calculator_without_result_forces_nothing(model, tokenizer):
    sp = tokenizer.encode_special
    prompt = tokenizer.encode("x", prepend="<|bos|>")
    call = [sp("<|python_start|>")] + tokenizer.encode("__import__('os')") + [sp("<|python_end|>")]
    script = call + tokenizer.encode(" done") + [sp("<|bos|>")]
    _, out, masks = run_script(model, tokenizer, prompt, script)
    assert out == call + tokenizer.encode(" done")
    assert all(m == 1 for m in masks)


def test_stop_tokens_and_length(model, tokenizer):
    sp = tokenizer.encode_special
    prompt = tokenizer.encode("hello", prepend="<|bos|>")
    words = tokenizer.encode(" one two three four five six")
    # <|bos|> stops too
    cols, out, _ = run_script(model, tokenizer, prompt, words[:3] + [sp("<|bos|>")] + words)
    assert out == words[:3] and len(cols) == 4
    # no stop token: max_tokens ends it
    cols, out, _ = run_script(model, tokenizer, prompt, words + words + words, max_tokens=5)
    assert out == (words * 3)[:5] and len(cols) == 5
    # rows that stop early are padded with <|bos|>, mask 0, while the others go on
    dec_prompt = prompt
    engine = Engine(Scripted(model, len(dec_prompt), words[:2] + [sp("<|assistant_end|>")]), tokenizer)
    cols = list(engine.generate(dec_prompt, num_samples=2, max_tokens=10, temperature=0))
    assert [c[0] for c in cols] == [[w, w] for w in words[:2]] + [[sp("<|assistant_end|>")] * 2]


def test_cache_full_ends_with_length(model, tokenizer):
    engine = Engine(make_model(tokenizer.get_vocab_size(), seed=1, sequence_len=24), tokenizer)
    prompt = tokenizer.encode("The quick brown fox", prepend="<|bos|>")
    results, _ = engine.generate_batch(prompt, max_tokens=None, temperature=0)
    assert len(results[0]) <= 24


def test_frozen_model_decodes_like_the_trainable_one(model, tokenizer, prompts):
    """A frozen CPU model (GPT.freeze: transposed weights, stacked q/k/v, as every eval-phase load)
    generates the same greedy tokens as the model it came from: prompts of different lengths in
    one batch, rows refilled as others finish (batch_size 2 for 5 prompts), and 2-row and 1-row
    steps along the way."""
    import copy
    frozen = copy.deepcopy(model).freeze()
    assert frozen.blocks[0].attn.qkv_weight is not None and frozen.lm_head.weight.stride(0) == 1
    want, _ = Engine(model, tokenizer).generate_many(prompts, max_tokens=12, temperature=0, batch_size=2)
    got, _ = Engine(frozen, tokenizer).generate_many(prompts, max_tokens=12, temperature=0, batch_size=2)
    assert got == want and all(len(r) > len(p) for r, p in zip(got, prompts))


@pytest.mark.slow
def test_compiled_decode_of_a_frozen_model(model, tokenizer, prompts):
    """Under torch.compile the frozen model's stacked q/k/v is not used (three products on its
    views): the same greedy tokens as eager."""
    import copy
    frozen = copy.deepcopy(model).freeze()

    def run(compile):
        dec = BatchDecoder(frozen, tokenizer, 2, max_len=64, compile=compile)
        dec.specials["stop"] = set()
        seqs = [Sequence(prompts[i], max_tokens=10, temperature=0) for i in (0, 1)]
        dec.add(seqs)
        while dec.seqs:
            dec.step()
            dec.remove_done()
        return [s.out for s in seqs]
    assert run(True) == run(False)


# ---------------------------------------------------------------------------
# The compiled decode step (torch.compile on CPU here; CUDA graphs on CUDA)

@pytest.mark.slow
def test_compiled_decode_equals_eager(model, tokenizer, prompts):
    """BatchDecoder(compile=True) pads the rows to a power-of-two bucket and attends over the
    whole cache; its logits equal the eager step's within float tolerance, and with rows joining
    and leaving (buckets 1, 2 and 3 of a 3-row cache) greedy decoding gives the same tokens."""
    def run(compile):
        dec = BatchDecoder(model, tokenizer, 3, max_len=72, compile=compile)
        dec.specials["stop"] = set()
        seqs = [Sequence(prompts[i], max_tokens=m, temperature=0) for i, m in ((1, 14), (0, 5), (4, 20))]
        dec.add(seqs[:2])
        for i in range(30):
            dec.remove_done()
            if i == 3:
                dec.add([seqs[2]])
            if not dec.seqs:
                break
            dec.step()
        return dec, [s.out for s in seqs]

    from torch._dynamo.utils import counters
    eager_dec, eager = run(False)
    graphs = counters["stats"]["unique_graphs"]
    compiled_dec, compiled = run(True)
    assert counters["stats"]["unique_graphs"] >= graphs + 3  # really compiled: one graph per bucket
    assert compiled == eager
    assert [len(o) for o in compiled] == [14, 5, 20]
    assert sorted(compiled_dec.views) == [1, 2, 3]  # every bucket was used

    # one step's logits, from the same cache state: eager over the exact kv_len vs compiled
    dec = compiled_dec
    dec.add([Sequence(prompts[2], max_tokens=8, temperature=0), Sequence(prompts[3], max_tokens=8, temperature=0)])
    lengths = dec.cache.lengths.clone()
    with torch.inference_mode():
        want = dec._forward(dec.inputs[:2], dec.cache.narrow(0, 2), max(dec.lens[:2]) + 1,
                            positions=tuple(t[:2] for t in dec.step_positions))
        dec.cache.lengths.copy_(lengths)  # undo the eager step (it rewrites the same positions)
        got = dec._compiled_step(2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert dec.cache.lengths[:2].tolist() == (lengths[:2] + 1).tolist()
    assert dec.row_buckets() == [1, 2, 3]
    dec.seqs.clear()
    dec.warmup(repeats=1)  # every bucket again, on free rows; the cache is left empty
    assert dec.cache.lengths.tolist() == [0, 0, 0]


def test_seeded_sequence_is_independent_of_its_batch(model, tokenizer, prompts):
    """A Sequence with its own seed samples from its own generator: its output is the same
    whether it decodes alone or next to other sequences (seeded or not), and the seed matters."""
    def run(seqs):
        dec = BatchDecoder(model, tokenizer, len(seqs), max_len=96, seed=0)
        dec.specials["stop"] = set()
        dec.add(seqs)
        drain(dec)
        return [s.out for s in seqs]

    def seeded(seed, i=1):
        return Sequence(prompts[i], max_tokens=16, temperature=2.0, top_k=50, seed=seed)
    alone = run([seeded(123)])[0]
    mixed = run([Sequence(prompts[0], 16, temperature=2.0), seeded(123), seeded(7, 3),
                 Sequence(prompts[4], 9, temperature=2.0)])[1]
    assert mixed == alone and len(alone) == 16
    assert len({tuple(run([seeded(s)])[0]) for s in range(1, 6)}) > 1  # different seeds, different text


# ---------------------------------------------------------------------------
# Sampling settings at their extremes, and a row that cannot be sampled

def test_tiny_temperature_and_top_p_are_greedy_not_nan():
    """A temperature too small for float32 (1e-300, 1e-39) or a top_p that underflows to 0 used
    to reach torch.multinomial as NaN probabilities and raise; they mean greedy and are served
    as such, alone, mixed with normal rows, and on the top-k fast path."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 64, generator=g) * 30
    greedy = logits.argmax(-1).tolist()
    for t in (1e-300, 1e-39, 5e-324):
        assert sample(logits, t, generator=g).tolist() == greedy
        assert sample(logits, t, top_k=10, generator=g).tolist() == greedy
    assert sample(logits, 1.0, top_p=1e-300, generator=g).tolist() == greedy
    assert sample(logits, 1.0, top_k=10, top_p=1e-45, generator=g).tolist() == greedy
    mixed = sample(logits, [1e-300, 1.0, 1e-39, 1.0, 0.0, 2.0], top_p=[None, 1e-300, None, None, None, None],
                   generator=g).tolist()
    assert [mixed[i] for i in (0, 1, 2, 4)] == [greedy[i] for i in (0, 1, 2, 4)]
    # a just-representable temperature still samples without overflowing to NaN
    ids = sample(logits, 2e-38, generator=g)
    assert ids.tolist() == greedy


def test_settings_that_cannot_be_honoured_are_refused():
    for bad in [dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=-1.0),
                dict(temperature=1.0, top_p=0.0), dict(temperature=1.0, top_p=1.5),
                dict(temperature=1.0, top_k=-2), dict(temperature=1.0, top_k=2.5)]:
        with pytest.raises(ValueError):
            Sequence([1, 2, 3], **bad)


class Poisoned(Wrapped):
    """The real model, except that the logits predicting position `at_len` of a row (the token
    that would make it at_len tokens long) are NaN: that row cannot be sampled."""

    def __init__(self, model, at_len):
        super().__init__(model)
        self.at_len = at_len

    def forward(self, idx, kv_cache=None, kv_len=None, logits_positions=None):
        before = kv_cache.lengths.clone()
        logits = self.inner(idx, kv_cache=kv_cache, kv_len=kv_len, logits_positions=logits_positions).clone()
        B, T = idx.shape
        pos = logits_positions[1].tolist()
        for b in range(B):
            if int(before[b]) + pos[b] + 1 == self.at_len:
                logits[b] = float("nan")
        return logits


def test_a_row_that_cannot_be_sampled_ends_alone(model, tokenizer, prompts):
    """Four rows sampling together; one reaches a position whose logits are NaN: that row ends
    with finish_reason "error", the three others decode on exactly as they would without it."""
    long_prompt = prompts[4]
    poison_at = len(long_prompt) + 3  # the long row's 4th token
    short = [p for p in prompts if len(p) + 12 < poison_at][:3]
    assert len(short) == 3

    def run(model_, with_long):
        dec = BatchDecoder(model_, tokenizer, 4, max_len=96, seed=0)
        dec.specials["stop"] = set()
        seqs = [Sequence(p, max_tokens=12, temperature=1.0, seed=10 + i) for i, p in enumerate(short)]
        bad = Sequence(long_prompt, max_tokens=12, temperature=1.0, top_k=20)
        dec.add(seqs + ([bad] if with_long else []))
        drain(dec)
        return seqs, bad

    seqs, bad = run(Poisoned(model, poison_at), True)
    assert bad.finish_reason == "error" and "NaN" in bad.error and len(bad.out) == 3
    assert all(s.finish_reason == "length" and s.error is None and len(s.out) == 12 for s in seqs)
    clean, _ = run(model, False)
    assert [s.out for s in seqs] == [s.out for s in clean]


class BatchShaped(Wrapped):
    """The real GPT, with the batch's shape made visible in its logits: a real model's logits of
    a row differ in the last bits with the number of rows and the attention span (measured:
    ~2e-6 on CPU, more in bf16), enough to flip a sampled token now and then. Here it always does."""

    def forward(self, idx, kv_cache=None, kv_len=None, logits_positions=None):
        logits = self.inner(idx, kv_cache=kv_cache, kv_len=kv_len, logits_positions=logits_positions)
        return logits + 3.0 * torch.sin(torch.arange(logits.size(-1)) * (idx.size(0) + 0.01 * (kv_len or 0)))


def test_a_seeded_row_does_not_depend_on_its_batch(model, tokenizer, prompts):
    """A sequence with a seed is prefilled and decoded alone, so neither the other rows nor the
    attention span they need reach its logits: the same seed gives the same tokens alone, sharing
    its prefill, or joining rows that are already decoding."""
    shaped = BatchShaped(model)

    def run(others, join_later):
        dec = BatchDecoder(shaped, tokenizer, batch_size=8, seed=5)
        seeded = Sequence(prompts[0], max_tokens=25, temperature=1.0, seed=1234)
        rest = [Sequence(p, max_tokens=40, temperature=1.0) for p in (prompts * 3)[1:others + 1]]
        if join_later and rest:
            dec.add(rest)
            dec.step()
            dec.add([seeded])
        else:
            dec.add([seeded] + rest)
        while not seeded.done:
            dec.step()
            dec.remove_done()
        return seeded.out
    alone = run(0, False)
    assert run(5, False) == alone
    assert run(5, True) == alone
    assert run(0, False) == alone
