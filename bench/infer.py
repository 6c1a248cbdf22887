"""Inference benchmark: time to first token, time per output token and tokens/s of the engine's
batched decoding (static KV cache, batched prefill) at batch sizes 1, 8, 32, eager or with
--compile (the compiled decode step; its compile time is reported, not timed). Prints JSON.

    python bench/infer.py --depth 4 --threads 2                       # CPU, seconds
    python bench/infer.py --depth 20 --max-seq-len 2048 --prompt-len 512 --new-tokens 256   # GPU
    python bench/infer.py -i sft                                       # a trained checkpoint

Random weights by default (speed does not depend on what the weights are); stop tokens are
ignored so that every row generates exactly --new-tokens tokens. TTFT = prefill of the prompts
+ sampling the first token of every row; TPOT = mean time of one decode step (all rows advance
by one token); tok/s = rows / TPOT. --reference also times GPT.generate (no cache) at batch 1.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from nanochat.common import autodetect_device_type, get_compute_dtype, synchronize
from nanochat.engine import BatchDecoder, Sequence, reference_generate
from nanochat.gpt import GPT, GPTConfig


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
    if args.source:
        from nanochat.models import load_model
        model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag,
                                         dtype=get_compute_dtype(device.type))  # as chat and serve load it
        return model, tokenizer
    dim = -(-args.depth * args.aspect_ratio // args.head_dim) * args.head_dim
    cfg = GPTConfig(sequence_len=args.max_seq_len, vocab_size=args.vocab_size, n_layer=args.depth,
                    n_head=dim // args.head_dim, n_kv_head=dim // args.head_dim, n_embd=dim,
                    window_pattern=args.window_pattern or ("SSSL" if device.type == "cuda" else "L"))
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights()
    model.freeze(get_compute_dtype(device.type))  # as chat and serve load it (checkpoint.build_model)
    return model, SpecialsOnly(args.vocab_size)


def run(model, tokenizer, batch, args, device):
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
    step_times = []
    while True:
        dec.remove_done()
        if not dec.seqs:
            break
        t0 = time.perf_counter()
        dec.step()
        synchronize(device)
        step_times.append(time.perf_counter() - t0)
    steady = step_times[args.warmup:] or step_times
    tpot = statistics.mean(steady)
    return {"batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "compile_warmup_s": round(warmup_s, 2) if args.compile else None,
            "ttft_ms": round(ttft * 1e3, 2), "tpot_ms": round(tpot * 1e3, 3),
            "tpot_p90_ms": round(sorted(steady)[int(0.9 * (len(steady) - 1))] * 1e3, 3),
            "decode_tok_per_s": round(batch / tpot, 1),
            "end_to_end_tok_per_s": round(batch * args.new_tokens / (ttft + sum(step_times)), 1)}


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
    p.add_argument("--reference", action="store_true", help="also time GPT.generate (no KV cache) at batch 1")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device_type or autodetect_device_type())
    torch.set_grad_enabled(False)
    model, tokenizer = build(args, device)
    run(model, tokenizer, 1, argparse.Namespace(**{**vars(args), "new_tokens": 8, "compile": False}), device)  # warm-up
    results = [run(model, tokenizer, int(b), args, device) for b in args.batch_sizes.split(",")]
    out = {
        "bench": "infer", "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(),
        "cpus": os.cpu_count(), "device": torch.cuda.get_device_name() if device.type == "cuda" else device.type,
        "threads": torch.get_num_threads(), "dtype": str(get_compute_dtype(device.type)).replace("torch.", ""),
        "model": {"source": args.source or "random", "n_layer": model.config.n_layer, "n_embd": model.config.n_embd,
                  "vocab_size": model.config.vocab_size,
                  "params_M": round(sum(q.numel() for q in model.parameters()) / 1e6, 1)},
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
