"""Tokenizer benchmark: training time on N characters, encode throughput (1 thread, all threads),
bytes per token. Prints JSON.

    python -m bench.tokenizer --train-chars 50000000 --vocab-size 8192
"""
import argparse
import json
import os
import time

from nanochat.dataset import iter_texts
from nanochat.tokenizer import Tokenizer, capped_texts
from bench.common import machine


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--train-chars", type=int, default=50_000_000)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--encode-chars", type=int, default=20_000_000, help="characters of val text to encode")
    args = p.parse_args()

    t0 = time.time()
    tok = Tokenizer.train(capped_texts(iter_texts("train"), args.train_chars, 10_000), args.vocab_size)
    train_s = time.time() - t0

    docs = list(capped_texts(iter_texts("val"), args.encode_chars, 10**9))
    nbytes = sum(len(d.encode()) for d in docs)
    results = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        t0 = time.time()
        ids = tok.encode(docs, num_threads=threads)
        dt = time.time() - t0
        results[f"encode_MB_per_s_{threads}_threads"] = round(nbytes / dt / 1e6, 2)
    ntok = sum(len(x) for x in ids)
    print(json.dumps({
        "bench": "tokenizer", "machine": machine(),
        "cpus": os.cpu_count(), "vocab_size": args.vocab_size, "train_chars": args.train_chars,
        "train_seconds": round(train_s, 2), "encode_bytes": nbytes, **results,
        "bytes_per_token_val": round(nbytes / ntok, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
