"""How much a second Python thread slows the engine's CPU decode step: the server's situation,
where the scheduler thread decodes while the event-loop thread encodes and writes the streams.
Prints JSON: the median `BatchDecoder.step` time in ms at 1 and --rows rows, with no other
thread, with one that does short bursts of Python work between short sleeps (like an event loop
serving streams), and with one that never sleeps.

    python -m bench.decode_gil [--depth 4] [--rows 16] [--threads 1] [--switch-interval 0.005]

A random d4 (width 256, vocab --vocab-size: a tokenizer trained on this repository's text, as
bench/serve.py does), frozen as `nanochat serve` loads it, top-k 50 sampling, stop tokens ignored.
Every torch call releases the GIL and must take it back; while the other thread holds it, the
decode thread waits (docs/benchmarks.md, "Server").
"""
import argparse
import json
import statistics
import sys
import threading
import time

import torch

from bench.common import machine, random_model
from bench.serve import get_or_train_tokenizer
from nanochat.engine import BatchDecoder, Sequence
from nanochat.gpt import GPTConfig


def python_work(stop, pause_s):
    """Encode JSON like an event loop building SSE chunks; sleep pause_s between bursts (0: never)."""
    chunk = {"id": "x", "choices": [{"index": 0, "delta": {"content": "word "}, "finish_reason": None}]}
    while not stop.is_set():
        for _ in range(20):
            json.dumps(chunk)
        if pause_s:
            time.sleep(pause_s)


def step_ms(model, tokenizer, rows, steps):
    dec = BatchDecoder(model, tokenizer, rows, max_len=512)
    dec.specials["stop"] = set()
    prompt = tokenizer.encode("Tell me a long story about a lighthouse.", prepend=tokenizer.get_bos_token_id())
    dec.add([Sequence(prompt, max_tokens=400, temperature=1.0, top_k=50) for _ in range(rows)])
    for _ in range(5):
        dec.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        dec.step()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 2)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval (default: Python's)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    tokenizer = get_or_train_tokenizer(args.vocab_size)
    cfg = GPTConfig(sequence_len=512, vocab_size=tokenizer.get_vocab_size(), n_layer=args.depth, n_head=2,
                    n_kv_head=2, n_embd=64 * args.depth, window_pattern="L")
    model = random_model(cfg, "cpu")
    out = {"machine": machine(), "threads": args.threads,
           "switch_interval_s": sys.getswitchinterval(), "rows": args.rows, "step_ms": {}}
    for name, pause in (("alone", None), ("with_bursty_python_thread", 0.0005), ("with_busy_python_thread", 0)):
        stop = threading.Event()
        worker = None
        if pause is not None:
            worker = threading.Thread(target=python_work, args=(stop, pause), daemon=True)
            worker.start()
        out["step_ms"][name] = {str(r): step_ms(model, tokenizer, r, args.steps) for r in (1, args.rows)}
        stop.set()
        if worker is not None:
            worker.join()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
