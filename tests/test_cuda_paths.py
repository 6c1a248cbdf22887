"""The CUDA code paths, exercised on CPU wherever torch allows it: activations in the compute
dtype (bf16 under autocast, which the CPU also has), one compiled graph for the forward with the
FlexAttention path forced (with and without activation checkpointing), no recompile per
sequence length in evaluation, GQA never sent to SDPA's math fallback, `--device-batch-size auto`
agreed by every rank (real 2-process gloo), the GPU peak-FLOPs table, the block-mask cache filled
before the first compiled call (one compile, not two), the CUDA allocator's expandable segments
and the garbage collector frozen after the first training step."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.nn.attention import flex_attention as flex
from torch.overrides import TorchFunctionMode

import nanochat.attention as attn
from nanochat.common import autocast_ctx, get_compute_dtype, peak_flops_of, set_cuda_alloc_conf
from nanochat.engine import BatchDecoder, Sequence
from nanochat.gpt import GPT, GPTConfig
from nanochat.training import is_out_of_memory, largest_fitting

V = 256


def make_model(n_layer=4, window_pattern="SSSL", sequence_len=128, **kw):
    cfg = GPTConfig(sequence_len=sequence_len, vocab_size=V, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=128,
                    window_pattern=window_pattern, short_window=32, **kw)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():  # non-zero output projections and gates, so every path carries signal
        for name, p in model.named_parameters():
            if p.dim() == 2 and "wte" not in name and "value_embeds" not in name:
                p.normal_(0.0, 0.02)
    return model


class Recorder(TorchFunctionMode):
    """Records the dtypes going into SDPA, rms_norm and linear, and SDPA's GQA/mask arguments."""

    def __init__(self):
        super().__init__()
        self.sdpa, self.norms, self.linears = [], [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.sdpa.append(dict(dtypes=(args[0].dtype, args[1].dtype, args[2].dtype),
                                  gqa=kwargs.get("enable_gqa", False), mask=kwargs.get("attn_mask") is not None))
        elif func is F.rms_norm:
            self.norms.append(args[0].dtype)
        elif func is F.linear:
            self.linears.append(args[0].dtype)
        return func(*args, **kwargs)


@pytest.fixture
def bf16(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    assert get_compute_dtype("cpu") == torch.bfloat16


@pytest.fixture
def forced_flex(monkeypatch):
    """The CUDA window path on CPU: FlexAttention block masks and the (eager, forward-only) kernel,
    recording the dtypes it is called with."""
    calls = []

    def recording_flex(q, k, v, **kw):
        calls.append((q.dtype, k.dtype, v.dtype))
        return flex.flex_attention(q, k, v, **kw)
    monkeypatch.setattr(attn, "use_flex", lambda device: True)
    monkeypatch.setattr(attn, "_flex_fn", recording_flex)
    monkeypatch.setattr(attn, "_block_masks", {})
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    return calls


def test_bf16_compute_keeps_attention_and_residual_in_bf16(bf16):
    """Training forward + loss with grads (SDPA paths), then evaluation logits: q, k, v of every
    attention call, every norm input and every matmul input are bf16; logits and loss are fp32."""
    model = make_model()
    idx = torch.randint(0, V, (2, 64))
    rec = Recorder()
    with rec, autocast_ctx(torch.device("cpu")):
        loss = model(idx, targets=idx)
        loss.backward()
        with torch.no_grad():
            logits = model(idx)
    assert len(rec.sdpa) == 2 * 4 and rec.norms and rec.linears  # forward twice, 4 layers
    assert all(c["dtypes"] == (torch.bfloat16,) * 3 for c in rec.sdpa), rec.sdpa
    assert set(rec.norms) == {torch.bfloat16} and set(rec.linears) == {torch.bfloat16}
    assert loss.dtype == torch.float32 and logits.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_bf16_flex_path_gets_bf16(bf16, forced_flex):
    model = make_model().eval()
    with torch.no_grad(), autocast_ctx(torch.device("cpu")):
        model(torch.randint(0, V, (2, 64)))
    assert len(forced_flex) == 3  # the three S layers go through FlexAttention
    assert set(forced_flex) == {(torch.bfloat16,) * 3}


def test_bf16_kv_cache_decode_and_gqa_without_the_math_fallback(bf16, tokenizer):
    """Prefill and decode through the KV cache (bool masks): q, k, v bf16 and the cache itself
    bf16 (no fp32 copy of it per step), and with n_kv_head < n_head no SDPA call combines a mask
    with enable_gqa (CUDA has only the math kernel for that)."""
    cfg = GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2,
                    n_embd=128, window_pattern="SL", short_window=8)
    model = GPT(cfg)
    model.init_weights()
    model.eval()
    dec = BatchDecoder(model, tokenizer, batch_size=3)
    assert all(t.dtype == torch.bfloat16 for t in dec.cache.k + dec.cache.v)
    rec = Recorder()
    with rec:
        dec.add([Sequence(tokenizer.encode(t, prepend="<|bos|>"), 6, temperature=0) for t in ("a b", "hello there", "x")])
        for _ in range(4):
            dec.step()
    assert rec.sdpa and all(c["mask"] for c in rec.sdpa)
    assert all(c["dtypes"] == (torch.bfloat16,) * 3 for c in rec.sdpa), rec.sdpa
    assert not any(c["gqa"] for c in rec.sdpa)


def test_gqa_with_a_mask_equals_full_heads():
    """The kv-head repeat that replaces enable_gqa under a mask computes the same attention."""
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True
    got = attn.attention(q, k, v, mask)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_forward_is_one_graph_with_the_flex_path(forced_flex, checkpointing):
    """torch._dynamo.explain of the forward with the flex path forced (forward only: CPU flex has
    no backward, so the weights do not require grad): the masks are built inside the graph and
    reused, never behind a graph break; activation checkpointing does not split the graph."""
    model = make_model().requires_grad_(False)
    model.checkpoint_activations = checkpointing
    explained = torch._dynamo.explain(model)(torch.randint(0, V, (2, 128)))
    assert explained.graph_count <= 2 and explained.graph_break_count <= 1, explained.break_reasons


def test_evaluation_lengths_do_not_recompile_flex_each_time(forced_flex, monkeypatch):
    """Evaluation feeds the window kernel a new sequence length almost every call (CORE, chat
    tasks, RL). The compiled kernel (compile_flex, here with the eager backend) must compile a
    few times, not once per length (past dynamo's limit of 8 torch silently falls back), and give
    the dense path's numbers."""
    model = make_model(n_layer=2, window_pattern="SL", sequence_len=256).eval()
    monkeypatch.setattr(attn, "_flex_fn", attn.compile_flex(backend="eager"))
    counters.clear()
    lengths = list(range(40, 240, 10))
    with torch.no_grad():
        outs = {T: model(torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(T))) for T in lengths}
    compiled = counters["frames"]["ok"]
    assert 1 <= compiled <= 3, dict(counters["frames"])
    monkeypatch.setattr(attn, "use_flex", lambda device: False)
    with torch.no_grad():
        T = lengths[-1]
        dense = model(torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(T)))
    torch.testing.assert_close(outs[T], dense, rtol=1e-4, atol=1e-4)


def test_largest_fitting_single_process():
    assert largest_fitting([8, 4, 2, 1], lambda b: b <= 4, "cpu") == 4
    assert largest_fitting([8, 4], lambda b: False, "cpu") is None

    def oom_above_2(b):
        if b > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return True
    assert largest_fitting([8, 4, 2, 1], oom_above_2, "cpu") == 2
    assert is_out_of_memory(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED: out of memory"))
    with pytest.raises(ValueError):  # not an OOM: a real bug must not be swallowed
        largest_fitting([8], lambda b: (_ for _ in ()).throw(ValueError("bug")), "cpu")


WORKER = textwrap.dedent('''
    import json, os, sys, torch
    from nanochat.common import compute_cleanup, compute_init
    from nanochat.training import largest_fitting
    _, rank, _, _, device = compute_init("cpu")
    tried = []
    def fits(b):
        tried.append(b)
        if rank == 1 and b > 4:  # rank 1's memory is smaller: its probe fails (OOM) earlier
            raise torch.OutOfMemoryError("CUDA out of memory")
        return b <= 16
    chosen = largest_fitting([64, 32, 16, 8, 4, 2, 1], fits, device)
    never = largest_fitting([4, 2, 1], lambda b: rank == 0, device)  # rank 1 fits nothing
    json.dump({"chosen": chosen, "never": never, "tried": tried}, open(os.path.join(sys.argv[1], f"r{rank}.json"), "w"))
    compute_cleanup()
''')


def test_auto_batch_size_is_agreed_by_every_rank(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    out = [json.load(open(tmp_path / f"r{rank}.json")) for rank in range(2)]
    assert out[0]["chosen"] == out[1]["chosen"] == 4   # rank 0 alone would have taken 16
    assert out[0]["never"] is None and out[1]["never"] is None
    assert out[0]["tried"] == out[1]["tried"] == [64, 32, 16, 8, 4]  # in lockstep


@pytest.mark.parametrize("name,key,tflops", [
    ("NVIDIA H100 80GB HBM3", "h100", 989), ("NVIDIA H100 NVL", "h100 nvl", 835), ("NVIDIA H100 PCIe", "h100 pcie", 756),
    ("NVIDIA H200", "h200", 989), ("NVIDIA H200 NVL", "h200 nvl", 835), ("NVIDIA GH200 480GB", "gh200", 989),
    ("NVIDIA H20", "h20", 148), ("NVIDIA A100-SXM4-80GB", "a100", 312), ("NVIDIA A10G", "a10g", 70),
    ("NVIDIA L40S", "l40s", 362), ("NVIDIA L4", "l4", 121), ("NVIDIA B200", "b200", 2250), ("Tesla T4", "t4", 65),
    ("Some Future GPU", None, None),
])
def test_peak_flops_table(name, key, tflops):
    got_key, flops = peak_flops_of(name)
    assert got_key == key and (flops is None if tflops is None else round(flops / 1e12) == tflops)


def test_warm_window_masks_saves_the_second_compile(forced_flex):
    """A compiled forward that finds the block-mask cache empty fills it inside its graph, and the
    next call compiles the model again; with the masks built first it compiles once."""
    compiles = {}
    for warm in (False, True):
        attn._block_masks.clear()
        model = make_model().requires_grad_(False).eval()
        if warm:
            attn.warm_window_masks(model.config.layer_windows(), 128, "cpu")
            assert len(attn._block_masks) == 1  # S windows; the L layers need no mask
        torch._dynamo.reset()
        counters.clear()
        fwd = torch.compile(model, backend="eager", dynamic=False)
        for _ in range(3):
            fwd(torch.randint(0, V, (2, 128)))
        compiles[warm] = counters["frames"]["ok"]
    assert compiles == {False: 2, True: 1}


def test_cuda_alloc_conf_is_set_unless_the_user_set_one():
    env = {}
    assert set_cuda_alloc_conf(env) == "expandable_segments:True" == env["PYTORCH_CUDA_ALLOC_CONF"]
    env = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    assert set_cuda_alloc_conf(env) == "max_split_size_mb:128" and len(env) == 1
    env = {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}  # torch's newer name counts too
    assert set_cuda_alloc_conf(env) == "expandable_segments:False" and "PYTORCH_CUDA_ALLOC_CONF" not in env


def test_the_allocator_reads_it_in_a_fresh_process():
    """compute_init sets it before CUDA starts: a process that imports torch and calls it sees the
    variable (the CUDA allocator reads it at its first allocation)."""
    code = ("import os; from nanochat.common import set_cuda_alloc_conf; set_cuda_alloc_conf(); "
            "print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "expandable_segments:True", r.stderr


def test_gc_step_freezes_after_the_first_step_and_collects_every_5000():
    import gc

    import nanochat.common as common
    assert gc.isenabled()
    before = gc.get_freeze_count()  # not always 0: something in a long test session froze objects too
    try:
        common.gc_step(0)
        assert gc.isenabled() and gc.get_freeze_count() == before
        common.gc_step(1)
        assert not gc.isenabled() and gc.get_freeze_count() > before  # everything alive now is out of the scans
        frozen = gc.get_freeze_count()

        class Node:
            pass
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle: only a collection frees it
        import weakref
        ref = weakref.ref(a)
        del a, b
        for _ in range(2000):  # plenty of allocations: automatic collection would have run
            [Node() for _ in range(10)]
        assert ref() is not None
        common.gc_step(4999)
        assert ref() is not None
        common.gc_step(common.GC_COLLECT_EVERY)
        assert ref() is None and gc.get_freeze_count() == frozen
    finally:
        common.gc_restore()
    assert gc.isenabled() and gc.get_freeze_count() == 0


@pytest.mark.parametrize("chunk_rows", [None, 48])
def test_compiled_training_loss_has_the_eager_gradients(chunk_rows):
    """The fused loss (a torch.autograd.Function) traced by dynamo gives the eager loss and
    gradients. On torch 2.11 (the GPU image's) a Function returning a tensor it had updated in
    place got all-zero gradients under torch.compile: nothing trained. One or several chunks."""
    models = [make_model(n_layer=2) for _ in range(2)]
    for m in models:
        m.loss_chunk_rows = chunk_rows
    idx = torch.randint(0, V, (2, 64), generator=torch.Generator().manual_seed(0))
    losses = [fn(idx, idx).float() for fn in (models[0], torch.compile(models[1], backend="eager", dynamic=False))]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0])
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)
    assert models[1].lm_head.weight.grad.norm() > 0


def test_compute_cleanup_turns_the_collector_back_on():
    """Every stage's `finally` calls compute_cleanup: a training loop that froze the collector and
    then failed leaves the process (a test session, say) collecting again."""
    import gc

    import nanochat.common as common
    common.gc_step(1)
    assert not gc.isenabled()
    common.compute_cleanup()
    assert gc.isenabled() and gc.get_freeze_count() == 0
