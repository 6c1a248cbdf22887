"""The first-GPU check of nanochat's CUDA paths, in two parts that each fit one device call
(docs/benchmarks.md, "GPU"). Run it through bench/gpu_check.sh, which supplies what the GPU
image lacks; directly it needs nanochat importable and NANOCHAT_DATA for `train_base`:

    python bench/gpu_check.py --part 1 [--out DIR] [--only learn,decode]
    python bench/gpu_check.py --part 2 --device-type cpu     # the same checks, tiny, on CPU

Part 1, correctness at small sizes: env, dtypes, graphs, flex, learn, compiled, fp8, decode,
sharded_optim. Part 2, the real shapes: speedrun (d24, SSSL, --fp8, auto batch, compiled; tok/s,
MFU, peak memory; the batch that fits and the one that does not) and train_base (a real
`nanochat train base` run with a save and an exact --resume). Each check prints one line as it
finishes, and the part's JSON (so far) is rewritten to DIR/partN.json after every check.

Without --device-type cpu the check needs CUDA: with no GPU visible it stops at once (exit 1).
On CPU (--device-type cpu) every check runs at tiny sizes, compiles with the aot_eager backend
(tracing and autograd, no code generation) and runs FlexAttention forward only (CPU has no
FlexAttention backward); exit code 1 if any check fails.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import flex_attention
from torch.overrides import TorchFunctionMode

import nanochat.attention as attn
from nanochat import fp8
from nanochat.autobatch import estimated_batch, estimated_bytes, fits_measured, optimizer_state_bytes, probe_order
from nanochat.common import autocast_ctx, gc_restore, gc_step, get_peak_flops, set_cuda_alloc_conf, synchronize
from nanochat.engine import BatchDecoder, Sequence
from nanochat.gpt import GPT, GPTConfig
from nanochat.training import largest_fitting

from bench.infer import SpecialsOnly  # its stand-in tokenizer

PARTS = {1: ("env", "dtypes", "graphs", "flex", "learn", "compiled", "fp8", "decode", "sharded_optim"),
         2: ("speedrun", "train_base")}
CANDIDATES = (256, 128, 64, 32, 16, 8, 4, 2, 1)  # train base's --device-batch-size auto candidates


def sizes(cuda):
    """Shapes per check: real ones on a GPU, tiny ones on a CPU."""
    if cuda:
        return dict(cuda=True, backend="inductor", dtype_depth=4, T=512, vocab=8192, head_dim=128,
                    flex_T=2048, flex_w=512,
                    copy=dict(vocab=256, half=128, B=32, steps=300, depth=4, dim=256, heads=2),
                    compare=dict(depth=2, dim=256, heads=2, T=256, vocab=2048, B=16),
                    decode_rows=4, speedrun=dict(depth=24, T=2048, vocab=32768, steps=8, head_dim=128),
                    shard_depth=24, train_base=["--depth", "2", "--max-seq-len", "256", "--device-batch-size", "8",
                                                "--total-batch-size", "4096", "--eval-tokens", "4096"])
    return dict(cuda=False, backend="aot_eager", dtype_depth=2, T=128, vocab=512, head_dim=32,
                flex_T=256, flex_w=64,
                copy=dict(vocab=16, half=8, B=16, steps=60, depth=2, dim=64, heads=2),
                compare=dict(depth=2, dim=128, heads=2, T=64, vocab=256, B=4),
                decode_rows=3, speedrun=dict(depth=2, T=64, vocab=256, steps=3, head_dim=32),
                shard_depth=24, train_base=["--depth", "1", "--max-seq-len", "64", "--device-batch-size", "2",
                                            "--total-batch-size", "256", "--eval-tokens", "256", "--device-type", "cpu"])


def make_model(device, depth, dim, heads, T, vocab, window="SSSL", kv_heads=None, short_window=0, signal=False, seed=0):
    """A GPT built on the meta device, materialized on `device` and initialized. signal=True
    also draws the zero-initialized output projections and gates (so every path carries signal
    and has a gradient to compare at step 0)."""
    config = GPTConfig(sequence_len=T, vocab_size=vocab, n_layer=depth, n_head=heads, n_kv_head=kv_heads or heads,
                       n_embd=dim, window_pattern=window, short_window=short_window)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    if signal:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and "wte" not in name and "value_embeds" not in name:
                    p.normal_(0.0, 0.02)
    return model


def compiled(fn, s, **kw):
    return torch.compile(fn, dynamic=False, backend=s["backend"], **kw)


def rel_err(a, b):
    """|a - b| / |b| over whole tensors (fp32); nan when either holds a nan or an inf."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def grads_rel_err(model_a, model_b):
    """The relative error of all gradients together, and of the worst matrix (>= 2-D) alone."""
    pairs = [(pa.grad, pb.grad) for pa, pb in zip(model_a.parameters(), model_b.parameters()) if pb.grad is not None]
    flat_a = torch.cat([a.float().flatten() for a, _ in pairs])
    flat_b = torch.cat([b.float().flatten() for _, b in pairs])
    worst = max(rel_err(a, b) for a, b in pairs if b.dim() >= 2 and b.norm() > 0)
    return rel_err(flat_a, flat_b), worst


class Recorder(TorchFunctionMode):
    """The dtypes going into SDPA, rms_norm and linear."""

    def __init__(self):
        super().__init__()
        self.seen = {"sdpa": set(), "rms_norm": set(), "linear": set()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.seen["sdpa"].update(a.dtype for a in args[:3])
        elif func is F.rms_norm:
            self.seen["rms_norm"].add(args[0].dtype)
        elif func is F.linear:
            self.seen["linear"].add(args[0].dtype)
        return func(*args, **(kwargs or {}))


def forced_flex(device):
    """On CPU, route windows through FlexAttention (uncompiled: forward only) as CUDA does;
    returns what to restore."""
    saved = (attn.use_flex, attn._flex_fn, dict(attn._block_masks))
    if device.type != "cuda":
        attn.use_flex, attn._flex_fn = (lambda d: True), flex_attention
    return saved


def restore_flex(saved):
    attn.use_flex, attn._flex_fn = saved[0], saved[1]
    attn._block_masks.clear()
    attn._block_masks.update(saved[2])


# ---------------------------------------------------------------------------
# Part 1: each check returns (ok, {numbers}); ok None = SKIP; an exception is a FAIL


def check_env(device, s):
    """What the machine is: device, memory, compute capability, torch/Triton/CUDA versions, the
    allocator configuration, whether FP8 runs. Fails on CUDA without bf16."""
    out = {"torch": torch.__version__, "python": sys.version.split()[0], "alloc_conf": set_cuda_alloc_conf(),
           "fp8": fp8.unsupported_reason(device) or "supported"}
    if device.type != "cuda":
        return True, out
    props = torch.cuda.get_device_properties(device)
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    out.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
               memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
               peak_tflops=(get_peak_flops(device) or 0) / 1e12)
    return torch.cuda.is_bf16_supported(), out


def check_dtypes(device, s):
    """bf16 compute (NANOCHAT_DTYPE=bfloat16 on CPU): every attention input, norm input and matmul
    input is bf16, window layers included (FlexAttention), logits are fp32."""
    os.environ["NANOCHAT_DTYPE"] = "bfloat16"  # what CUDA uses anyway; the CPU can do bf16 too
    model = make_model(device, s["dtype_depth"] + 2, 2 * s["head_dim"], 2, s["T"], s["vocab"], kv_heads=1)
    flex_dtypes = set()
    saved = forced_flex(device)
    real = attn._flex_fn if device.type != "cuda" else attn._flex_attention()

    def recording(q, k, v, **kw):
        flex_dtypes.update((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kw)
    attn._flex_fn = recording
    rec = Recorder()
    try:
        with rec, autocast_ctx(device), torch.no_grad():
            logits = model.eval()(torch.randint(0, s["vocab"], (2, s["T"]), device=device))
    finally:
        restore_flex(saved)
    bf16 = {torch.bfloat16}
    ok = rec.seen["sdpa"] == bf16 and flex_dtypes == bf16 and rec.seen["rms_norm"] == bf16 \
        and rec.seen["linear"] == bf16 and logits.dtype == torch.float32
    return ok, {k: sorted(str(d).replace("torch.", "") for d in v) for k, v in
                dict(rec.seen, flex=flex_dtypes, logits={logits.dtype}).items()}


def check_graphs(device, s):
    """The forward with the window path (FlexAttention) is one graph with and without activation
    checkpointing (torch._dynamo.explain); a model compiled after warm_window_masks compiles once
    over its first calls (an empty mask cache cost a second compile); 10 evaluation lengths
    compile the eval-time window kernel at most 3 times."""
    out = {}
    saved = forced_flex(device)
    try:
        for ckpt in (False, True):
            model = make_model(device, s["dtype_depth"] + 2, 2 * s["head_dim"], 2, s["T"], s["vocab"])
            model.checkpoint_activations = ckpt
            model.requires_grad_(device.type == "cuda")  # CPU FlexAttention has no backward
            idx = torch.randint(0, s["vocab"], (2, s["T"]), device=device)
            with autocast_ctx(device):
                ex = torch._dynamo.explain(model)(idx, idx)
            out["graphs" + ("_ckpt" if ckpt else "")] = ex.graph_count
            out["breaks" + ("_ckpt" if ckpt else "")] = ex.graph_break_count
        attn._block_masks.clear()
        model = make_model(device, s["dtype_depth"], 2 * s["head_dim"], 2, s["T"], s["vocab"]).eval()
        attn.warm_window_masks(model.config.layer_windows(), s["T"], device)
        torch._dynamo.reset()
        counters.clear()
        fwd = torch.compile(model, dynamic=False, backend="eager")  # counting compiles: no code needed
        with torch.no_grad(), autocast_ctx(device):
            for _ in range(3):
                fwd(torch.randint(0, s["vocab"], (2, s["T"]), device=device))
        out["warm_mask_compiles"] = counters["frames"]["ok"]
        attn._flex_fn = attn.compile_flex(backend="inductor" if device.type == "cuda" else "eager")
        counters.clear()
        with torch.no_grad(), autocast_ctx(device):
            for T in range(s["T"] // 4, s["T"], max(1, s["T"] // 16))[:10]:
                model(torch.randint(0, s["vocab"], (3, T), device=device))
        out["eval_length_compiles"] = counters["frames"]["ok"]
    finally:
        restore_flex(saved)
    ok = out["graphs"] <= 2 and out["graphs_ckpt"] <= 2 and out["warm_mask_compiles"] == 1 \
        and 1 <= out["eval_length_compiles"] <= 3
    return ok, out


def check_flex(device, s):
    """Sliding-window FlexAttention (nanochat's block mask, GQA) against SDPA with a dense mask
    built here: the forward, and on CUDA the backward (dq, dk, dv) too, within bf16 rounding
    (relative error < 2e-2; fp32 on CPU: < 1e-4). On CUDA the window must also be faster than
    full causal attention (flash) at the same length, or the windows buy nothing."""
    T, w, H, Hkv, D = s["flex_T"], s["flex_w"], 8, 4, s["head_dim"]
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(2, H, T, D, device=device, dtype=dtype, generator=g).requires_grad_(cuda)
    k, v = (torch.randn(2, Hkv, T, D, device=device, dtype=dtype, generator=g).requires_grad_(cuda) for _ in range(2))
    i = torch.arange(T, device=device)
    dense_mask = ((i[:, None] - i[None, :]) >= 0) & ((i[:, None] - i[None, :]) < w)
    attn._block_masks.pop((T, w, str(device)), None)
    block = attn.sliding_window_block_mask(T, w, device)
    kernel = attn._flex_attention() if cuda else flex_attention
    got = kernel(q, k, v, block_mask=block, enable_gqa=True)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1),
                                          attn_mask=dense_mask)
    tol = 2e-2 if cuda else 1e-4
    errs = {"out": rel_err(got, want)}
    if cuda:
        dy = torch.randn_like(got)
        grads_got = torch.autograd.grad(got, (q, k, v), dy)
        grads_want = torch.autograd.grad(want, (q, k, v), dy)
        errs.update({f"d{n}": rel_err(a, b) for n, a, b in zip("qkv", grads_got, grads_want)})
    out = {"rel_err": {k: round(e, 6) for k, e in errs.items()}, "T": T, "window": w, "tolerance": tol,
           "backward": "checked" if cuda else "not on CPU (no FlexAttention backward)"}
    ok = all(e < tol for e in errs.values())  # a nan fails
    if cuda:
        with torch.no_grad():
            out["window_ms"] = round(1000 * timed(lambda: kernel(q, k, v, block_mask=block, enable_gqa=True), device), 3)
            kf, vf = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
            out["full_causal_ms"] = round(1000 * timed(lambda: F.scaled_dot_product_attention(q, kf, vf, is_causal=True), device), 3)
        ok = ok and out["window_ms"] < out["full_causal_ms"]
    return ok, out


def timed(fn, device, repeats=10):
    """Median seconds of fn() after two warm-up calls."""
    for _ in range(2):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_batch(c, generator, device):
    """Copy sequences: `half` random tokens, then the same tokens again. Only the second half is
    scored (targets -1 elsewhere): its next token is the token `half` positions back, which
    only attention can fetch; from the current token alone it is uniform (loss ln V)."""
    x = torch.randint(0, c["vocab"], (c["B"], c["half"]), generator=generator)
    seq = torch.cat([x, x, x[:, :1]], dim=1)
    inputs, targets = seq[:, :-1].clone(), seq[:, 1:].clone()
    targets[:, :c["half"] - 1] = -1
    return inputs.to(device), targets.to(device)


_copy_model = {}  # the model `learn` trained, for `decode`


def check_learn(device, s):
    """Training learns what only attention can learn: on copy sequences (copy_batch) the scored
    loss starts at ln V, which is also the best the embeddings and head alone can reach, and must
    end below half of it. The training model is compiled on CUDA (windows through FlexAttention,
    the copy distance beyond the short window: the long layers must do it)."""
    c = s["copy"]
    T = 2 * c["half"]
    model = make_model(device, c["depth"], c["dim"], c["heads"], T, c["vocab"], window="SSSL" if s["cuda"] else "SL")
    attn.warm_window_masks(model.config.layer_windows(), T, device)
    fwd = compiled(model, s) if s["cuda"] else model
    optimizer = model.setup_optimizer(unembedding_lr=0.02, embedding_lr=0.3, matrix_lr=0.02, compile=False)
    g = torch.Generator().manual_seed(0)
    losses = []
    t0 = time.perf_counter()
    for _ in range(c["steps"]):
        x, y = copy_batch(c, g, device)
        with autocast_ctx(device):
            loss = fwd(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    losses = [float(x) for x in losses]
    floor = math.log(c["vocab"])
    _copy_model.update(model=model.eval(), config=c)
    out = {"floor_ln_vocab": round(floor, 3), "first_loss": round(losses[0], 3), "last_loss": round(losses[-1], 4),
           "steps": c["steps"], "seconds": round(time.perf_counter() - t0, 1)}
    return losses[-1] < 0.5 * floor, out


def check_compiled(device, s):
    """The compiled training forward + backward against the eager one, same weights and batch:
    loss within 1e-2 relative and all gradients within 3e-2 (relative error of their whole
    vector; the worst single matrix within 1e-1), in bf16 and with --fp8 (bf16 rounding,
    fused differently in the compiled kernels; on CPU fp32, aot_eager)."""
    c = s["compare"]
    out, ok = {}, True
    for mode in ("bf16", "fp8"):
        if mode == "fp8" and s["cuda"] and fp8.unsupported_reason(device):
            out[mode] = "skipped: " + fp8.unsupported_reason(device)
            continue
        models = [make_model(device, c["depth"], c["dim"], c["heads"], c["T"], c["vocab"], signal=True) for _ in range(2)]
        converted = None
        if mode == "fp8":
            for m in models:
                converted = len(fp8.convert_to_fp8(m)[0])
        attn.warm_window_masks(models[0].config.layer_windows(), c["T"], device)
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, c["vocab"], (c["B"], c["T"] + 1), generator=g).to(device)
        losses = []
        for m, fn in zip(models, (models[0], compiled(models[1], s))):
            with autocast_ctx(device):
                loss = fn(x[:, :-1], x[:, 1:])
            loss.backward()
            losses.append(float(loss.detach()))
        loss_err = abs(losses[1] - losses[0]) / abs(losses[0])
        grad_err, worst = grads_rel_err(models[1], models[0])
        out[mode] = {"loss": [round(v, 5) for v in losses], "loss_rel_err": round(loss_err, 6), "fp8_layers": converted,
                     "grad_rel_err": round(grad_err, 6), "worst_matrix_rel_err": round(worst, 6)}
        ok = ok and loss_err < 1e-2 and grad_err < 3e-2 and worst < 1e-1 and converted != 0  # a nan fails
    out["tolerances"] = {"loss": 1e-2, "grads": 3e-2, "worst_matrix": 1e-1}
    return ok, out


def check_fp8(device, s):
    """One FP8Linear layer's three GEMMs (torch._scaled_mm) against the plain fp32 matmuls of the
    same inputs, an independent reference: e4m3 keeps 3 mantissa bits and e5m2 (the gradient)
    2, so y, dx and dW stay within 1e-1 relative error; a wrong scale is off by far more. Also
    against fp8.reference_linear (quantize/dequantize, then fp32 matmuls): within 1e-2 on CUDA
    (bf16 output, fast accumulation), 1e-5 on CPU."""
    if s["cuda"] and fp8.unsupported_reason(device):
        return None, {"reason": fp8.unsupported_reason(device)}
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if s["cuda"] else torch.float32
    x = torch.randn(256, 512, device=device, generator=g).to(dtype).requires_grad_()
    layer = fp8.FP8Linear(512, 384, bias=False, device=device)
    dy = (torch.randn(256, 384, device=device, generator=g) * 1e-3).to(dtype)
    y = layer(x)
    y.backward(dy)
    got = (y.detach(), x.grad, layer.weight.grad)
    xf, wf, dyf = x.detach().float(), layer.weight.detach().float(), dy.float()
    exact = (xf @ wf.t(), dyf @ wf, dyf.t() @ xf)
    emulated = fp8.reference_linear(x.detach(), layer.weight.detach(), dy)
    vs_exact = [rel_err(a, b) for a, b in zip(got, exact)]
    vs_emulation = [rel_err(a, b) for a, b in zip(got, emulated)]
    tol = 1e-2 if s["cuda"] else 1e-5
    ok = all(e < 1e-1 for e in vs_exact) and all(e < tol for e in vs_emulation)
    return ok, {"vs_fp32_rel_err": [round(e, 5) for e in vs_exact], "vs_emulation_rel_err": [round(e, 6) for e in vs_emulation],
                "tolerances": {"vs_fp32": 1e-1, "vs_emulation": tol}}


def check_decode(device, s):
    """Greedy decoding of the copy model trained by `learn` (trained here if learn did not run),
    eager and compiled (CUDA graphs on CUDA, "reduce-overhead"; aot_eager on CPU): identical
    tokens in every row, rows of different prompt lengths, no cudagraph skips. The share of
    tokens that continue the copy is reported (it shows whether learn's model works)."""
    if "model" not in _copy_model:  # a random model's tokens hardly depend on the context: train one
        check_learn(device, s)
    c, model = _copy_model["config"], _copy_model["model"]
    T = 2 * c["half"]
    tokenizer = SpecialsOnly(c["vocab"] + len(SpecialsOnly.NAMES))  # ids above the copy vocabulary: never emitted
    g = torch.Generator().manual_seed(5)
    rows = s["decode_rows"]
    seqs = [torch.randint(0, c["vocab"], (c["half"],), generator=g).tolist() for _ in range(rows)]
    m = c["half"] - 1 - rows  # tokens per row: every row ends at the same step (no row decodes past its end)
    prompts = [q + q[:2 + r] for r, q in enumerate(seqs)]  # different lengths, part of the copy given
    want = [q[2 + r:2 + r + m] for r, q in enumerate(seqs)]
    counters.clear()
    results = {}
    for compile in (False, True):
        dec = BatchDecoder(model, tokenizer, rows, max_len=T + 1, compile=compile)
        if compile and not s["cuda"]:
            dec.compiled = compiled(model, s)  # CPU: the traced graph, without C++ code generation
        dec.specials["stop"] = set()
        batch = [Sequence(p, max_tokens=len(w), temperature=0) for p, w in zip(prompts, want)]
        with torch.inference_mode():
            dec.add(batch)
            while not all(q.done for q in batch):
                dec.step()
        results[compile] = [q.out[:len(w)] for q, w in zip(batch, want)]
    same = results[False] == results[True]
    copied = sum(a == b for r, w in zip(results[False], want) for a, b in zip(r, w)) / sum(len(w) for w in want)
    out = {"identical": same, "rows": rows, "tokens": sum(len(w) for w in want), "copy_accuracy": round(copied, 3),
           "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    if not same:
        out["eager"], out["compiled"] = results[False], results[True]
    return same and out["cudagraph_skips"] == 0, out


def check_sharded_optim(device, s):
    """The 8-way sharded optimizer step at d24 (vocab 32768, context 2048) on one device, with
    torch's fake process group (collectives that move nothing; this process is rank 3 of 8):
    every state tensor has its shard's shape, the state held equals
    autobatch.optimizer_state_bytes(model, 8), the step runs (compiled updates on CUDA). On CUDA
    the real d24 tensors: per-rank state and peak memory, compiles; on CPU the meta device
    (shapes only, the same code)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from nanochat.optim import SHARD_MIN_NUMEL
    world, rank = 8, 3
    if dist.is_initialized():
        return False, {"error": "a process group already exists"}
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        where = device if s["cuda"] else torch.device("meta")
        depth = s["shard_depth"]
        config = GPTConfig(sequence_len=2048, vocab_size=32768, n_layer=depth, n_head=depth * 64 // 128,
                           n_kv_head=depth * 64 // 128, n_embd=depth * 64)
        with torch.device("meta"):
            model = GPT(config)
        if s["cuda"]:
            model.to_empty(device=where)
            model.init_weights()
            torch.cuda.reset_peak_memory_stats(device)
        counters.clear()
        optimizer = model.setup_optimizer(compile=s["cuda"])
        for p in model.parameters():
            p.grad = torch.randn_like(p) if s["cuda"] else torch.empty_like(p)
        t0 = time.perf_counter()
        optimizer.step()
        optimizer.step()  # the second step: no new compiles
        synchronize(device)
        seconds = time.perf_counter() - t0
        held = sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t))
        want = optimizer_state_bytes(model, world)
        bad_shapes = []
        for group in optimizer.param_groups:
            ps = group["params"]
            if group["kind"] == "muon":
                got = tuple(optimizer.state[ps[0]]["momentum_buffer"].shape)
                if got != (-(-len(ps) // world), *ps[0].shape):
                    bad_shapes.append(got)
            else:
                for p in ps:
                    if not p.dim():
                        continue
                    split = p.numel() >= SHARD_MIN_NUMEL and p.size(0) % world == 0
                    got = optimizer.state[p]["exp_avg"].shape
                    if got[0] != (p.size(0) // world if split else p.size(0)):
                        bad_shapes.append(tuple(got))
        out = {"depth": depth, "world": world, "params_gib": round(sum(p.numel() * 4 for p in model.parameters()) / 2**30, 3),
               "state_gib_per_rank": round(held / 2**30, 4), "predicted_gib_per_rank": round(want / 2**30, 4),
               "bad_shapes": bad_shapes[:5], "device": str(where), "two_steps_s": round(seconds, 2)}
        if s["cuda"]:
            out["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            out["compiles"] = counters["frames"]["ok"]
        return held == want and not bad_shapes, out
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------
# Part 2


def check_speedrun(device, s):
    """The speedrun's training shape: d24, SSSL windows, --fp8, the model compiled, context 2048,
    vocabulary 32768, the micro-batch chosen as `--device-batch-size auto` would
    (autobatch: the estimate, then the compiled step measured at the candidate above it and at
    the estimate), random tokens. Checked: the chosen batch fits (its measured peak plus the
    optimizer state it has not allocated yet stays within 90% of memory) and the next larger
    candidate does not (out of memory, or over that budget); the model compiles once (mask cache
    warmed); the loss is finite. Numbers: tok/s, MFU, peak memory over a few optimizer steps.
    CPU: a tiny model, eager FP8 on the reference _scaled_mm, and the estimate checked against
    a made-up 16 MiB budget instead of measured memory."""
    c = s["speedrun"]
    heads = c["depth"] * 64 // c["head_dim"]
    model = make_model(device, c["depth"], c["depth"] * 64, heads, c["T"], c["vocab"], window="SSSL")
    fp8_note = "off"
    if not s["cuda"] or not fp8.unsupported_reason(device):
        converted, _ = fp8.convert_to_fp8(model)
        fp8_note = f"{len(converted)} layers"
    attn.warm_window_masks(model.config.layer_windows(), c["T"], device)
    fwd = compiled(model, s)
    reserve = optimizer_state_bytes(model, 1)
    out = {"depth": c["depth"], "T": c["T"], "fp8": fp8_note}
    torch._dynamo.reset()
    counters.clear()

    def step(b):
        x = torch.randint(0, c["vocab"], (b, c["T"] + 1), device=device)
        with autocast_ctx(device):
            loss = fwd(x[:, :-1], x[:, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()
    if s["cuda"]:
        total = torch.cuda.get_device_properties(device).total_memory
        estimate = estimated_batch(model, c["T"], total, CANDIDATES)
        fits = fits_measured(step, reserve, device)
        order = probe_order(CANDIDATES, estimate)
        B = largest_fitting(order, fits, device)
        bigger = [b for b in CANDIDATES if B is not None and b > B]
        too_big = bigger[-1] if bigger else None
        fits_too_big = False  # tried before B, it did not fit
        if too_big is not None and too_big not in fits.tried:  # B was the first tried: try the next larger now
            fits_too_big = largest_fitting([too_big], fits, device) is not None
        out.update(estimate=estimate, chosen=B, next_larger=too_big, next_larger_fits=fits_too_big, tried=fits.tried,
                   probe_peaks_gib={b: round(v / 2**30, 2) for b, v in fits.peaks.items()},
                   optimizer_state_gib=round(reserve / 2**30, 2), memory_gib=round(total / 2**30, 1))
        batch_ok = B is not None and B >= (estimate or 1) and not fits_too_big
    else:
        total = 16 * 2**20
        B = estimated_batch(model, c["T"], total, CANDIDATES)
        bigger = [b for b in CANDIDATES if B is not None and b > B]
        out.update(chosen=B, estimate_bytes=estimated_bytes(model, B, c["T"]) if B else None,
                   next_larger_bytes=estimated_bytes(model, bigger[-1], c["T"]) if bigger else None, budget=0.9 * total)
        batch_ok = B is not None and out["estimate_bytes"] <= 0.9 * total < (out["next_larger_bytes"] or math.inf)
    if B is None:
        return False, out
    optimizer = model.setup_optimizer(compile=s["cuda"])
    if s["cuda"]:
        torch.cuda.reset_peak_memory_stats(device)
    losses, t0 = [], None
    for i in range(c["steps"] + 1):
        if i == 1:  # the first step compiles the optimizer's updates: not timed
            synchronize(device)
            t0 = time.perf_counter()
        losses.append(step(B))
        optimizer.step()
        gc_step(i + 1)
    synchronize(device)
    gc_restore()
    dt = (time.perf_counter() - t0) / c["steps"]
    tok_s = B * c["T"] / dt
    peak = get_peak_flops(device)
    out.update(tok_per_sec=round(tok_s), step_ms=round(1000 * dt, 1), loss=[round(float(x), 4) for x in losses[::4]],
               mfu=round(model.estimate_flops() * tok_s / peak, 4) if peak else None,
               peak_memory_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if s["cuda"] else None,
               frames_compiled=counters["frames"]["ok"])
    finite = all(math.isfinite(float(x)) for x in losses)
    return batch_ok and finite, out


def check_train_base(device, s, data_dir=None):
    """A real `nanochat train base` (a subprocess, as a user runs it; compiled on CUDA): a
    tokenizer trained on the carried shard, then 6 steps saving at 3 and 6; then a copy of the
    step-3 checkpoint resumed with --resume-from-step 3 to step 6. Both exit 0 and the resumed
    run's losses at steps 4-6 equal the uninterrupted run's: exactly on CPU, within 1e-3
    relative on CUDA (atomics in attention's backward make CUDA runs differ in the last bits)."""
    base = tempfile.mkdtemp(prefix="gpu-check-base-")
    env = dict(os.environ, NANOCHAT_BASE_DIR=base, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    if data_dir:
        env["NANOCHAT_DATA"] = data_dir
    py = [sys.executable, "-m", "nanochat"]

    def run(args, timeout=240):
        r = subprocess.run(py + args, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode:
            raise RuntimeError(f"`nanochat {' '.join(args)}` exited {r.returncode}: {(r.stderr or r.stdout)[-600:]}")
        return r.stdout
    t0 = time.perf_counter()
    run(["tokenizer", "train", "--vocab-size", "2048", "--max-chars", "3000000"])
    t_tok = time.perf_counter() - t0
    flags = s["train_base"] + ["--num-iterations", "6", "--save-every", "3", "--eval-every", "-1",
                               "--core-metric-every", "-1", "--sample-every", "-1"]
    run(["train", "base"] + flags + ["--model-tag", "full"])
    t_run = time.perf_counter() - t0 - t_tok
    ckpts = os.path.join(base, "checkpoints", "base")
    shutil.copytree(os.path.join(ckpts, "full"), os.path.join(ckpts, "part"))
    run(["train", "base"] + flags + ["--model-tag", "part", "--resume-from-step", "3"])

    def losses(tag):
        rows = [json.loads(line) for line in open(os.path.join(ckpts, tag, "metrics.jsonl")) if line.strip()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}
    full, part = losses("full"), losses("part")
    steps = [4, 5, 6]
    diffs = [abs(full[k] - part[k]) / abs(full[k]) for k in steps if k in full and k in part]
    tol = 1e-3 if s["cuda"] else 0.0
    out = {"full": {k: full.get(k) for k in steps}, "resumed": {k: part.get(k) for k in steps},
           "max_rel_diff": max(diffs) if diffs else None, "tolerance": tol,
           "tokenizer_s": round(t_tok, 1), "first_run_s": round(t_run, 1)}
    shutil.rmtree(base, ignore_errors=True)
    return len(diffs) == len(steps) and max(diffs) <= tol, out


# ---------------------------------------------------------------------------


def write_json(path, summary):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1, default=str)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", type=int, choices=(1, 2), required=True)
    p.add_argument("--device-type", default="cuda", choices=["cuda", "cpu"], help="default cuda (required)")
    p.add_argument("--only", default="", help="comma list of this part's checks (default all)")
    p.add_argument("--data", default=None, help="data root for train_base (default $NANOCHAT_DATA)")
    p.add_argument("--out", default=os.environ.get("OUT") or None, help="folder for partN.json (default $OUT, if set)")
    args = p.parse_args(argv)
    names = PARTS[args.part]
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in PARTS[args.part]]
        if unknown:
            print(f"gpu_check: unknown check(s) {unknown} for part {args.part}; choose from {', '.join(PARTS[args.part])}",
                  file=sys.stderr)
            return 2
    if args.device_type == "cuda":
        set_cuda_alloc_conf()  # before the first CUDA allocation
        if not torch.cuda.is_available():
            print(f"gpu_check: no CUDA GPU visible to torch {torch.__version__}; this check is for a GPU machine "
                  f"(--device-type cpu runs its tiny CPU version)", file=sys.stderr)
            return 1
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    device = torch.device(args.device_type)
    s = sizes(device.type == "cuda")
    if device.type != "cuda":  # the CPU checks run FlexAttention uncompiled on purpose (forward only)
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    os.environ.setdefault("NANOCHAT_BASE_DIR", tempfile.mkdtemp(prefix="gpu-check-"))
    out_path = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        out_path = os.path.join(args.out, f"part{args.part}.json")
    env_dtype = os.environ.get("NANOCHAT_DTYPE")
    summary = {"part": args.part, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "seconds": 0, "results": []}
    t_start = time.time()
    for name in names:
        t0 = time.time()
        try:
            fn = globals()[f"check_{name}"]
            ok, numbers = fn(device, s, args.data) if name == "train_base" else fn(device, s)
            status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        except Exception as e:  # a check that crashes is a failure with its reason; the others still run
            status, numbers = "FAIL", {"error": f"{type(e).__name__}: {e}"[:2000], "where": traceback.format_exc(limit=-3)[-2000:]}
        finally:
            if env_dtype is None:
                os.environ.pop("NANOCHAT_DTYPE", None)
            else:
                os.environ["NANOCHAT_DTYPE"] = env_dtype
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the check's models are gone: give their memory back
        result = {"check": name, "status": status, "seconds": round(time.time() - t0, 1), "numbers": numbers}
        summary["results"].append(result)
        summary["seconds"] = round(time.time() - t_start, 1)
        print(f"{status:<4} {name:<14} {result['seconds']:>6.1f}s  {json.dumps(numbers, default=str)[:1500]}", flush=True)
        if out_path:
            write_json(out_path, summary)
    count = {k: sum(r["status"] == k for r in summary["results"]) for k in ("PASS", "SKIP", "FAIL")}
    failed = [r["check"] for r in summary["results"] if r["status"] == "FAIL"]
    print(f"gpu_check part {args.part} on {summary['device']} (torch {torch.__version__}): {count['PASS']} PASS, "
          f"{count['SKIP']} SKIP, {count['FAIL']} FAIL" + (f" ({', '.join(failed)})" if failed else "")
          + f" in {summary['seconds']:.0f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
