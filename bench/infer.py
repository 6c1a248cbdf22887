"""Inference benchmark: time to first token, time per output token and tokens/s of the engine's
batched decoding (static KV cache, batched prefill) at batch sizes 1, 8, 32, eager or with
--compile (the compiled decode step; its compile time is reported, not timed), and how close
decoding comes to the memory-bandwidth limit. Prints JSON.

    python bench/infer.py --depth 4 --threads 2                       # CPU, seconds
    python bench/infer.py --depth 20 --weights int8 --batch-sizes 1,8 # a d20-shaped model in int8
    python bench/infer.py --depth 20 --max-seq-len 2048 --prompt-len 512 --new-tokens 256   # GPU
    python bench/infer.py -i sft                                       # a trained checkpoint

Random weights by default (speed does not depend on what the weights are); stop tokens are
ignored so that every row generates exactly --new-tokens tokens. TTFT = prefill of the prompts
+ sampling the first token of every row; TPOT = mean time of one decode step (all rows advance
by one token); tok/s = rows / TPOT. --reference also times engine.reference_generate (no cache) at batch 1.

Bandwidth: `bytes_per_step` is what one decode step must read: every matrix and lm_head in full
(as stored: fp32, bf16, or int8 plus per-row scales), only the looked-up rows of the token
embedding (the current and, for the smear, the previous token) and of the value embeddings,
and the KV cache up to the step's attention span (the mean over the timed steps). `mbu` =
bytes_per_step / TPOT over `bandwidth_gbs`: on CPU a measured copy (torch `copy_` of a buffer
far larger than the caches, with the benchmark's threads; read + write bytes, best of 5), on a
known GPU the data-sheet peak. Prefill: `prefill_flops` (2 per matmul weight per token, lm_head
only on each row's last position, attention 4 x head_dim x n_head per (query, key) pair of the
causal prompt) and `prefill_mfu` against the GPU's data-sheet bf16 peak, or on CPU against a
measured 2048^3 matmul in the compute dtype (best of 3).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from nanochat.common import autodetect_device_type, get_peak_flops, synchronize
from nanochat.engine import BatchDecoder, Sequence, reference_generate
from nanochat.gpt import GPT, GPTConfig
from nanochat.quant import WEIGHT_FORMATS, describe_weights, prepare_for_inference, weight_bytes, weights_choice

# Data-sheet memory bandwidth, GB/s. First match wins: a name that holds another comes first.
GPU_PEAK_BANDWIDTH_GBS = [
    ("gh200", 4000), ("h200 nvl", 4800), ("h200", 4800), ("h100 nvl", 3900), ("h100 pcie", 2000),
    ("h100", 3350), ("h800", 3350), ("b200", 8000), ("a100-sxm4-80gb", 2039), ("a100 80gb", 2039),
    ("a100-pcie-80gb", 1935), ("a100", 1555), ("l40s", 864), ("l40", 864), ("l4", 300), ("a10g", 600),
    ("a10", 600), ("a6000", 768), ("5090", 1792), ("4090", 1008), ("3090", 936),
]


class SpecialsOnly:
    """Enough of a tokenizer for the engine when no trained tokenizer exists (fresh GPU box):
    the special-token ids sit at the top of the vocabulary, as in nanochat.tokenizer."""
    NAMES = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
             "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

    def __init__(self, vocab_size):
        self.ids = {n: vocab_size - len(self.NAMES) + i for i, n in enumerate(self.NAMES)}

    def encode_special(self, name):
        return self.ids[name]

    def get_bos_token_id(self):
        return self.ids["<|bos|>"]

    def stop_ids(self):
        return {self.ids["<|assistant_end|>"], self.ids["<|bos|>"]}

    def decode(self, ids):
        return ""  # the calculator then returns None: no tool output is forced

    def encode(self, text):
        return []


def build(args, device):
    """(model, tokenizer, parameter count) with the weights in --weights, as chat and serve load them."""
    if args.source:
        from nanochat.models import load_model
        model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag,
                                         weights=args.weights)
        return model, tokenizer, model.n_params
    dim = -(-args.depth * args.aspect_ratio // args.head_dim) * args.head_dim
    cfg = GPTConfig(sequence_len=args.max_seq_len, vocab_size=args.vocab_size, n_layer=args.depth,
                    n_head=dim // args.head_dim, n_kv_head=dim // args.head_dim, n_embd=dim,
                    window_pattern=args.window_pattern or ("SSSL" if device.type == "cuda" else "L"))
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights()
    n_params = sum(q.numel() for q in model.parameters())
    prepare_for_inference(model, args.weights, device.type)
    return model, SpecialsOnly(args.vocab_size), n_params


def decode_bytes(model, batch, kv_len, kv_element_size):
    """Bytes one decode step of `batch` rows reads (see the module docstring)."""
    c = model.config
    tables = [model.wte] + list(model.value_embeds.values())
    table_bytes = sum(weight_bytes(t) for t in tables)
    matrices = weight_bytes(model) - table_bytes
    rows_per_token = weight_bytes(model.wte) * 2 + sum(weight_bytes(t) for t in tables[1:])
    rows = batch * rows_per_token / c.vocab_size
    kv = batch * c.n_layer * 2 * c.n_kv_head * (c.n_embd // c.n_head) * kv_len * kv_element_size
    return {"matrices": matrices, "embedding_rows": round(rows), "kv_cache": round(kv),
            "total": round(matrices + rows + kv)}


def prefill_flops(model, prompt_lens):
    """Forward FLOPs of prefilling these prompts (lm_head on each one's last position only)."""
    c = model.config
    head = c.vocab_size * c.n_embd
    body = sum(m.in_features * m.out_features for name, m in model.named_modules()
               if hasattr(m, "in_features") and not name.startswith("lm_head"))
    attn = sum(4 * (c.n_embd // c.n_head) * c.n_head * t * (t + 1) // 2 * c.n_layer for t in prompt_lens)
    return sum(2 * body * t + 2 * head for t in prompt_lens) + attn


def copy_bandwidth_gbs(device, mib=512, repeats=5):
    """Read + write GB/s of a `copy_` between two buffers of `mib` MiB (far beyond any cache), best of `repeats`."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def machine_bandwidth(device, threads, mib=512):
    """(GB/s, how it was obtained)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, gbs in GPU_PEAK_BANDWIDTH_GBS:
            if key in name:
                return gbs, f"data-sheet peak of the {key}"
    gbs = copy_bandwidth_gbs(device, mib)
    return round(gbs, 1), (f"measured: torch copy_ of a {mib} MiB fp32 buffer into another, {threads} threads, "
                           f"read + write bytes, best of 5")


def matmul_flops(device, dtype, n=2048, repeats=3):
    """FLOP/s of an n x n x n matmul in dtype, best of `repeats` (the CPU's practical peak)."""
    a = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, a)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def run(model, tokenizer, batch, args, device, bandwidth=1.0, peak_flops=None):
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(batch)
    # different prompts per row (of slightly different lengths) so the prefill is really batched
    prompts = [torch.randint(0, vocab - 16, (args.prompt_len - (i % 8),), generator=g).tolist() for i in range(batch)]
    dec = BatchDecoder(model, tokenizer, batch, max_len=args.prompt_len + args.new_tokens + 1, compile=args.compile)
    dec.specials["stop"] = set()  # benchmark: every row runs the full length
    t0 = time.perf_counter()
    dec.warmup()  # --compile: compile every row bucket now, not inside the timed steps
    warmup_s = time.perf_counter() - t0
    seqs = [Sequence(p, max_tokens=args.new_tokens, temperature=args.temperature, top_k=args.top_k) for p in prompts]
    synchronize(device)
    t0 = time.perf_counter()
    dec.add(seqs)
    synchronize(device)
    ttft = time.perf_counter() - t0
    step_times, kv_lens = [], []
    while True:
        dec.remove_done()
        if not dec.seqs:
            break
        kv_lens.append(dec.max_len if args.compile else dec._kv_len(max(dec.lens[:len(dec.seqs)]) + 1))
        t0 = time.perf_counter()
        dec.step()
        synchronize(device)
        step_times.append(time.perf_counter() - t0)
    steady = step_times[args.warmup:] or step_times
    tpot = statistics.mean(steady)
    kv_len = statistics.mean(kv_lens[len(kv_lens) - len(steady):])
    moved = decode_bytes(model, batch, kv_len, dec.cache.k[0].element_size())
    flops = prefill_flops(model, [len(p) for p in prompts])
    return {"batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "compile_warmup_s": round(warmup_s, 2) if args.compile else None,
            "ttft_ms": round(ttft * 1e3, 2), "tpot_ms": round(tpot * 1e3, 3),
            "tpot_p90_ms": round(sorted(steady)[int(0.9 * (len(steady) - 1))] * 1e3, 3),
            "decode_tok_per_s": round(batch / tpot, 1),
            "end_to_end_tok_per_s": round(batch * args.new_tokens / (ttft + sum(step_times)), 1),
            "bytes_per_step": moved["total"], "bytes_per_step_parts": moved,
            "bytes_per_token": round(moved["total"] / batch),
            "achieved_gbs": round(moved["total"] / tpot / 1e9, 2),
            "mbu": round(moved["total"] / tpot / 1e9 / bandwidth, 3),
            "prefill_flops": flops, "prefill_tflops_per_s": round(flops / ttft / 1e12, 4),
            "prefill_mfu": round(flops / ttft / peak_flops, 4) if peak_flops else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", default=None, help="load this checkpoint source instead of random weights")
    p.add_argument("--model-tag", default=None)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--window-pattern", default=None, help="default: SSSL on CUDA, L elsewhere")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3, help="decode steps left out of TPOT")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--device-type", default="")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on CUDA)")
    p.add_argument("--reference", action="store_true", help="also time engine.reference_generate (no KV cache) at batch 1")
    p.add_argument("--weights", default=None, choices=WEIGHT_FORMATS,
                   help="weight format (default: bf16 where the compute-dtype probe picks bf16, else fp32)")
    p.add_argument("--copy-mib", type=int, default=512, help="CPU bandwidth: MiB copied (far beyond the caches)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device_type or autodetect_device_type())
    torch.set_grad_enabled(False)
    weights, dtype, _ = weights_choice(args.weights, device.type)
    print(f"bench/infer.py: {describe_weights(args.weights, device.type)}", file=sys.stderr)
    model, tokenizer, n_params = build(args, device)
    bandwidth, bandwidth_how = machine_bandwidth(device, torch.get_num_threads(), args.copy_mib)
    peak, peak_how = get_peak_flops(device), "data-sheet bf16 peak"
    if peak is None:
        peak, peak_how = matmul_flops(device, dtype), f"measured 2048^3 {str(dtype).replace('torch.', '')} matmul"
    run(model, tokenizer, 1, argparse.Namespace(**{**vars(args), "new_tokens": 8, "compile": False}), device)  # warm-up
    results = [run(model, tokenizer, int(b), args, device, bandwidth, peak) for b in args.batch_sizes.split(",")]
    out = {
        "bench": "infer", "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(),
        "cpus": os.cpu_count(), "device": torch.cuda.get_device_name() if device.type == "cuda" else device.type,
        "threads": torch.get_num_threads(), "weights": weights, "dtype": str(dtype).replace("torch.", ""),
        "bandwidth_gbs": bandwidth, "bandwidth_how": bandwidth_how,
        "peak_flops": peak, "peak_flops_how": peak_how,
        "model": {"source": args.source or "random", "n_layer": model.config.n_layer, "n_embd": model.config.n_embd,
                  "vocab_size": model.config.vocab_size, "params_M": round(n_params / 1e6, 1),
                  "weight_bytes": weight_bytes(model)},
        "command": "python bench/infer.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "results": results,
    }
    if args.reference:
        prompt = list(range(args.prompt_len))
        synchronize(device)
        t0 = time.perf_counter()
        n = sum(1 for _ in reference_generate(model, prompt, args.new_tokens, temperature=args.temperature, top_k=args.top_k))
        synchronize(device)
        out["reference_no_cache_tok_per_s_batch1"] = round(n / (time.perf_counter() - t0), 1)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
