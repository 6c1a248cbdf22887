"""One command that checks nanochat's CUDA paths on a fresh GPU machine and prints one PASS/FAIL
table with numbers (docs/benchmarks.md, "GPU check"). Meant to finish within ~8 minutes on one
H100/H200; with --device-type cpu it runs the same checks at tiny sizes in seconds (CI does).

    python bench/gpu_check.py                        # the GPU (needs NANOCHAT_DATA for the serve check)
    python bench/gpu_check.py --device-type cpu      # tiny, CPU
    python bench/gpu_check.py --only train,decode --out check.json

Checks: dtypes (bf16 activations: q, k, v, norms, matmuls; fp32 logits), graphs (one graph for
the compiled forward with and without activation checkpointing; evaluation lengths do not
recompile FlexAttention each time), flex (sliding-window FlexAttention equals the masked dense
path and is faster than full causal attention), train (d12 and d20, ~20 compiled steps: tok/s,
MFU, peak memory), autobatch (the largest micro-batch that fits, as `--device-batch-size auto`
finds it), memory (what activation checkpointing and the fused loss save), decode (tok/s at
batch 1/8/32, eager and compiled with CUDA graphs, no cudagraph skips), serve (`serve --compile`
answers a real request on 127.0.0.1), fp8 (`--fp8`: one layer's FP8 GEMMs equal their emulation,
d12 tok/s with and without FP8, losses close; SKIP on a GPU without FP8 tensor cores). Exit code 1
if any check fails.
"""
import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import traceback
import warnings

import requests
import torch
import torch.nn.functional as F
import uvicorn
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import flex_attention
from torch.overrides import TorchFunctionMode

import nanochat.attention as attn
from nanochat import fp8
from nanochat.common import autocast_ctx, get_peak_flops, synchronize
from nanochat.dataset import iter_texts
from nanochat.engine import BatchDecoder, Sequence
from nanochat.gpt import GPT, GPTConfig
from nanochat.server import create_app
from nanochat.stages.train_base import AUTO_BATCH_CANDIDATES, cuda_batch_fits
from nanochat.tokenizer import Tokenizer, capped_texts
from nanochat.scaling import model_dims
from nanochat.training import largest_fitting

from infer import SpecialsOnly  # bench/infer.py's stand-in tokenizer (this folder is on sys.path)

CHECKS = ("dtypes", "graphs", "flex", "train", "autobatch", "memory", "decode", "serve", "fp8")


def sizes(cuda):
    """Shapes per check: real ones on a GPU, tiny ones on a CPU."""
    if cuda:
        return dict(depth=12, head_dim=128, T=2048, B=16, vocab=32768, train=((12, 32), (20, 32)), steps=20,
                    decode_depth=12, decode_batches=(1, 8, 32), prompt=256, new=128, flex_T=2048, flex_w=512)
    return dict(depth=2, head_dim=32, T=128, B=2, vocab=512, train=((2, 4),), steps=4,
                decode_depth=2, decode_batches=(1, 4), prompt=16, new=8, flex_T=256, flex_w=64)


def build(depth, head_dim, T, vocab, device, window="SSSL", n_kv_head=None):
    dim, heads = model_dims(depth, 64, head_dim)
    config = GPTConfig(sequence_len=T, vocab_size=vocab, n_layer=depth, n_head=heads,
                       n_kv_head=n_kv_head or heads, n_embd=dim, window_pattern=window)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    return model


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
    return statistics.median(times)


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


# ---------------------------------------------------------------------------
# The checks: each returns (ok, {numbers}); an exception is a FAIL with its message


def check_dtypes(device, s):
    """bf16 compute (NANOCHAT_DTYPE=bfloat16 on CPU): every attention input, norm input and matmul
    input is bf16, window layers included (FlexAttention: forced on CPU), logits are fp32."""
    os.environ["NANOCHAT_DTYPE"] = "bfloat16"  # what CUDA uses anyway; the CPU can do bf16 too
    model = build(s["depth"] + 2, s["head_dim"], s["T"], s["vocab"], device, n_kv_head=1)
    flex_dtypes = set()
    real = attn._flex_attention() if device.type == "cuda" else flex_attention
    forced = device.type != "cuda"

    def recording(q, k, v, **kw):
        flex_dtypes.update((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kw)
    saved = (attn.use_flex, attn._flex_fn)
    attn._flex_fn = recording
    if forced:
        attn.use_flex = lambda d: True
    rec = Recorder()
    try:
        with rec, autocast_ctx(device), torch.no_grad():
            logits = model(torch.randint(0, s["vocab"], (2, s["T"]), device=device))
    finally:
        attn.use_flex, attn._flex_fn = saved
    bf16 = {torch.bfloat16}
    ok = rec.seen["sdpa"] == bf16 and flex_dtypes == bf16 and rec.seen["rms_norm"] == bf16 \
        and rec.seen["linear"] == bf16 and logits.dtype == torch.float32
    return ok, {k: sorted(str(d).replace("torch.", "") for d in v) for k, v in
                dict(rec.seen, flex=flex_dtypes, logits={logits.dtype}).items()}


def check_graphs(device, s):
    """torch._dynamo.explain of the forward (windows through FlexAttention) with and without
    activation checkpointing: at most 2 graphs; 10 evaluation lengths compile the window kernel
    at most 3 times."""
    out = {}
    saved = (attn.use_flex, attn._flex_fn)
    if device.type != "cuda":  # the CUDA window path, forward only (CPU flex has no backward)
        attn.use_flex, attn._flex_fn = (lambda d: True), flex_attention
    try:
        for ckpt in (False, True):
            model = build(s["depth"] + 2, s["head_dim"], s["T"], s["vocab"], device)
            model.checkpoint_activations = ckpt
            if device.type != "cuda":
                model.requires_grad_(False)
            idx = torch.randint(0, s["vocab"], (2, s["T"]), device=device)
            with autocast_ctx(device):
                ex = torch._dynamo.explain(model)(idx, idx)
            out["graphs" + ("_ckpt" if ckpt else "")] = ex.graph_count
            out["breaks" + ("_ckpt" if ckpt else "")] = ex.graph_break_count
        attn._flex_fn = attn.compile_flex(backend="inductor" if device.type == "cuda" else "eager")
        model = build(s["depth"], s["head_dim"], s["T"], s["vocab"], device).eval()
        counters.clear()
        with torch.no_grad(), autocast_ctx(device):
            for T in range(s["T"] // 4, s["T"], max(1, s["T"] // 16))[:10]:
                model(torch.randint(0, s["vocab"], (3, T), device=device))
        out["eval_length_compiles"] = counters["frames"]["ok"]
    finally:
        attn.use_flex, attn._flex_fn = saved
    ok = out["graphs"] <= 2 and out["graphs_ckpt"] <= 2 and 1 <= out["eval_length_compiles"] <= 3
    return ok, out


def check_flex(device, s):
    """A sliding window through FlexAttention equals the dense masked path; on CUDA it is also
    faster than full causal attention (flash) at the same length."""
    T, w, H, D = s["flex_T"], s["flex_w"], 8, s["head_dim"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(4, H, T, D, device=device, dtype=dtype) for _ in range(3))
    block = attn.sliding_window_block_mask(T, w, device)
    i = torch.arange(T, device=device)
    dense_mask = ((i[:, None] - i[None, :]) >= 0) & ((i[:, None] - i[None, :]) < w)
    kernel = attn._flex_attention() if device.type == "cuda" else flex_attention
    got = kernel(q, k, v, block_mask=block)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)
    err = (got.float() - want.float()).abs().max().item()
    out = {"max_abs_diff": err, "T": T, "window": w}
    ok = err < (2e-2 if dtype == torch.bfloat16 else 1e-4)
    if device.type == "cuda":
        out["window_ms"] = 1000 * timed(lambda: kernel(q, k, v, block_mask=block), device)
        out["full_causal_ms"] = 1000 * timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device)
        ok = ok and out["window_ms"] < out["full_causal_ms"]
    return ok, out


def check_train(device, s):
    """~20 compiled training steps each at d12 and d20 (CPU: a few eager steps of a tiny model):
    the loss is finite and falls; tok/s, MFU and peak memory."""
    out = {f"d{depth}": train_steps(device, s, depth, B) for depth, B in s["train"]}
    return all(r["last_loss"] < r["first_loss"] for r in out.values()), out


def train_steps(device, s, depth, B, use_fp8=False):
    cuda = device.type == "cuda"
    model = build(depth, s["head_dim"], s["T"], s["vocab"], device)
    if use_fp8:
        fp8.convert_to_fp8(model)
    optimizer = model.setup_optimizer(weight_decay=0.1, compile=cuda or None)
    fwd = torch.compile(model, dynamic=False) if cuda else model
    g = torch.Generator(device=device).manual_seed(depth)
    data = torch.randint(0, min(1000, s["vocab"]), (B, s["T"] + 1), device=device, generator=g)  # few ids: learnable

    def step():
        with autocast_ctx(device):
            loss = fwd(data[:, :-1], data[:, 1:])
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss.detach()
    first = float(step())  # includes compilation
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(s["steps"] - 1):
        last = step()
    synchronize(device)
    dt = (time.perf_counter() - t0) / (s["steps"] - 1)
    tok_s = B * s["T"] / dt
    peak = get_peak_flops(device)
    last = float(last)  # nan compares False: a nan loss fails the check
    result = {"tok_per_sec": round(tok_s), "step_ms": round(1000 * dt, 1), "first_loss": first, "last_loss": last,
              "batch": B, "mfu": round(model.estimate_flops() * tok_s / peak, 4) if peak else None,
              "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None}
    if cuda:
        torch.cuda.empty_cache()
    return result


def check_fp8(device, s):
    """--fp8 (nanochat/fp8.py): one layer's three FP8 GEMMs (torch._scaled_mm) equal their fp32
    emulation; then the train check's d12 run with and without FP8, same init and data (CPU: the
    tiny model, eager, on the CPU's reference _scaled_mm): tok/s of each and the losses stay
    close. No speed-up is required: upstream measured FP8 slower than bf16 at d12 and 1.17x at d26."""
    if device.type == "cuda" and fp8.unsupported_reason(device):
        return None, {"reason": fp8.unsupported_reason(device)}
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(256, 512, device=device, generator=g).to(dtype).requires_grad_()
    layer = fp8.FP8Linear(512, 384, bias=False, device=device)
    dy = (torch.randn(256, 384, device=device, generator=g) * 1e-3).to(dtype)
    y = layer(x)
    y.backward(dy)
    want = fp8.reference_linear(x.detach(), layer.weight.detach(), dy)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()
    errs = [rel(got, ref) for got, ref in zip((y.detach(), x.grad, layer.weight.grad), want)]
    depth, B = s["train"][0]
    plain, fast = train_steps(device, s, depth, B), train_steps(device, s, depth, B, use_fp8=True)
    out = {"vs_emulation_rel_err": [round(e, 5) for e in errs], "depth": depth,
           "tok_per_sec": plain["tok_per_sec"], "fp8_tok_per_sec": fast["tok_per_sec"],
           "speedup": round(fast["tok_per_sec"] / plain["tok_per_sec"], 3),
           "first_loss": [plain["first_loss"], fast["first_loss"]], "last_loss": [plain["last_loss"], fast["last_loss"]],
           "peak_memory_gib": [plain["peak_memory_gib"], fast["peak_memory_gib"]]}
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16 output rounding, fast accumulation
    ok = all(e < tol for e in errs) and fast["last_loss"] < fast["first_loss"] \
        and abs(fast["first_loss"] - plain["first_loss"]) < 0.01 * plain["first_loss"] \
        and abs(fast["last_loss"] - plain["last_loss"]) < 0.03 * plain["last_loss"]
    return ok, out


def check_autobatch(device, s):
    """`--device-batch-size auto` at d20 and the real context: the largest power of two whose
    forward + backward fits (CUDA only)."""
    if device.type != "cuda":
        return None, {"reason": "probes GPU memory"}
    depth = s["train"][-1][0]
    model = build(depth, s["head_dim"], s["T"], s["vocab"], device)
    t0 = time.perf_counter()
    B = largest_fitting(AUTO_BATCH_CANDIDATES, cuda_batch_fits(model, s["T"], s["vocab"], device), device)
    out = {"depth": depth, "T": s["T"], "device_batch_size": B, "seconds": round(time.perf_counter() - t0, 1)}
    return B is not None and B >= 1, out


def check_memory(device, s):
    """Peak memory of one forward + backward at d12: plain, with activation checkpointing, and
    with the plain loss (full fp32 logits) instead of the fused one (CUDA only)."""
    if device.type != "cuda":
        return None, {"reason": "peak memory is measured by the CUDA allocator"}
    model = build(s["depth"], s["head_dim"], s["T"], s["vocab"], device)
    idx = torch.randint(0, s["vocab"], (s["B"], s["T"]), device=device)

    def peak(ckpt=False, plain_loss=False):
        model.checkpoint_activations = ckpt
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        with autocast_ctx(device):
            if plain_loss:
                loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
            else:
                loss = model(idx, idx)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated(device) / 2**30
    base, ckpt, plain = peak(), peak(ckpt=True), peak(plain_loss=True)
    out = {"fwd_bwd_gib": round(base, 2), "checkpointing_gib": round(ckpt, 2), "plain_loss_gib": round(plain, 2),
           "saved_by_checkpointing_gib": round(base - ckpt, 2), "saved_by_fused_loss_gib": round(plain - base, 2)}
    return ckpt < base and base < plain, out


def check_decode(device, s, tokenizer=None):
    """Decode tok/s at each batch size, eager and compiled (CUDA graphs on CUDA); no
    "skipping cudagraphs" (inductor's skip counter stays 0)."""
    model = build(s["decode_depth"], s["head_dim"], s["prompt"] + s["new"] + 1, s["vocab"], device).eval()
    tokenizer = tokenizer or SpecialsOnly(s["vocab"])
    out = {}
    counters.clear()
    for compile in ([False, True] if device.type == "cuda" else [False]):
        for b in s["decode_batches"]:
            dec = BatchDecoder(model, tokenizer, b, max_len=s["prompt"] + s["new"] + 1, compile=compile)
            dec.specials["stop"] = set()  # every row runs the full length: one row bucket, one graph
            g = torch.Generator().manual_seed(b)
            prompts = [torch.randint(0, s["vocab"] - 16, (s["prompt"],), generator=g).tolist() for _ in range(b)]
            dec.add([Sequence(p, max_tokens=s["new"], temperature=0) for p in prompts])
            for _ in range(3):  # compile and warm up (CUDA graphs record on the first calls)
                dec.step()
            synchronize(device)
            t0, steps = time.perf_counter(), 0
            while dec.seqs and not any(q.done for q in dec.seqs):
                dec.step()
                steps += 1
            synchronize(device)
            out[f"{'compiled' if compile else 'eager'}_b{b}_tok_per_sec"] = round(b * steps / (time.perf_counter() - t0))
    out["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    return out["cudagraph_skips"] == 0 and all(v > 0 for k, v in out.items() if k.endswith("tok_per_sec")), out


def check_serve(device, s, data_dir=None):
    """A real server on 127.0.0.1 (compiled decode on CUDA, as `nanochat serve --compile`) answers
    an OpenAI-style request once /health says ready. The tokenizer is trained here on a little of
    the pretraining data."""
    texts = capped_texts(iter_texts("train", data_dir=data_dir), 2_000_000, 10_000)
    tokenizer = Tokenizer.train(texts, 2048)
    model = build(s["decode_depth"], s["head_dim"], 512, tokenizer.get_vocab_size(), device).eval()
    app = create_app(model, tokenizer, max_batch=4, compile=device.type == "cuda")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 300
        while not server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        t0 = time.time()
        while not requests.get(url + "/health", timeout=10).json().get("ready"):
            assert time.time() < deadline, "the server never became ready"
            time.sleep(0.2)
        ready_s = time.time() - t0
        r = requests.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "x", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16, "temperature": 0})
        body = r.json()
        n = body.get("usage", {}).get("completion_tokens", 0)
        stats = requests.get(url + "/stats", timeout=10).json()
        return r.status_code == 200 and n > 0, {"status": r.status_code, "completion_tokens": n,
                                               "ready_after_s": round(ready_s, 1), "compiled": stats.get("compiled")}
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device-type", default="", choices=["", "cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma list of checks (default all: {','.join(CHECKS)})")
    p.add_argument("--data", default=None, help="data root for the serve check's tokenizer (default $NANOCHAT_DATA)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device_type or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise SystemExit(f"unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")
    s = sizes(device.type == "cuda")
    if device.type != "cuda":  # the CPU checks run FlexAttention uncompiled on purpose (forward only)
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    os.environ.setdefault("NANOCHAT_BASE_DIR", tempfile.mkdtemp(prefix="gpu-check-"))
    env_dtype = os.environ.get("NANOCHAT_DTYPE")
    results = []
    t_start = time.time()
    for name in names:
        t0 = time.time()
        try:
            fn = globals()[f"check_{name}"]
            ok, numbers = fn(device, s, args.data) if name == "serve" else fn(device, s)
            status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        except Exception as e:  # a check that crashes is a failure with its reason, the others still run
            status, numbers = "FAIL", {"error": f"{type(e).__name__}: {e}", "where": traceback.format_exc(limit=-2)}
        finally:
            if env_dtype is None:
                os.environ.pop("NANOCHAT_DTYPE", None)
            else:
                os.environ["NANOCHAT_DTYPE"] = env_dtype
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the check's models are gone: give their memory back before the next one
        results.append({"check": name, "status": status, "seconds": round(time.time() - t0, 1), "numbers": numbers})
        print(f"{status:<4} {name:<10} {results[-1]['seconds']:>6.1f}s  {json.dumps(numbers, default=str)}", flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    summary = {"device": device_name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
               "seconds": round(time.time() - t_start, 1), "results": results}
    print()
    print(f"| check | status | seconds | numbers |   ({device_name}, torch {torch.__version__})")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['check']} | {r['status']} | {r['seconds']} | {json.dumps(r['numbers'], default=str)[:300]} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1, default=str)
    count = {k: sum(r["status"] == k for r in results) for k in ("PASS", "SKIP", "FAIL")}
    failed = [r["check"] for r in results if r["status"] == "FAIL"]
    print(f"\ngpu_check: {count['PASS']} PASS, {count['SKIP']} SKIP, {count['FAIL']} FAIL" + (f" ({', '.join(failed)})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
