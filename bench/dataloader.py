"""Benchmark the pretraining loader; prints one JSON object.

    python -m bench.dataloader [--B 8] [--T 2048] [--batches 40] [--util-shards 2]

- tokens_per_s: (inputs) tokens per second that PretrainLoader delivers from a cold start with
  1 and 2 tokenizer threads (reading, tokenizing and packing included);
- utilization: tokens that reach training rows / tokens loaded, over full passes of the first
  --util-shards training shards at T=512 and T=2048, for our packing and for upstream-style
  cropping (cut=False); bos_context: share of loaded tokens trained with their own document's
  start (its BOS) earlier in the same row.
Uses the tokenizer in $NANOCHAT_BASE_DIR/tokenizer and the shards in $NANOCHAT_DATA/pretrain.
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np

from nanochat.dataloader import PretrainLoader
from nanochat.dataset import list_shards
from nanochat.tokenizer import get_tokenizer


def throughput(tok, B, T, batches, threads):
    loader = PretrainLoader(tok, B, T, tokenizer_threads=threads, rank=0, world_size=1)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    dt = time.perf_counter() - t0
    loader.close()
    return B * T * batches / dt


def utilization(tok, T, folder, cut):
    loader = PretrainLoader(tok, 1, T, folder=folder, loop=False, cut=cut, tokenizer_threads=2, rank=0, world_size=1)
    bos = tok.get_bos_token_id()
    with_ctx = 0
    for x, y in loader:
        row = np.concatenate([x[0, :1].numpy(), y[0].numpy()])
        seen = np.cumsum(row == bos) > 0  # a continuation at the row start has no BOS before it
        with_ctx += int(seen.sum())
    return loader.utilization(), with_ctx / loader.packer.tokens_in


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--util-shards", type=int, default=2, help="training shards for the utilization passes")
    args = p.parse_args()
    tok = get_tokenizer()
    out = {"B": args.B, "T": args.T, "vocab_size": tok.get_vocab_size(), "cpu_count": os.cpu_count(),
           "tokens_per_s": {}, "utilization": {}, "upstream_crop_utilization": {}, "bos_context": {}}
    for threads in (1, 2):
        out["tokens_per_s"][str(threads)] = round(throughput(tok, args.B, args.T, args.batches, threads))
    # utilization over a full pass of a few real shards: link them into a folder of their own
    shards = list_shards()
    with tempfile.TemporaryDirectory() as d:
        for s in shards[:args.util_shards] + shards[-1:]:
            os.symlink(os.path.abspath(s), os.path.join(d, os.path.basename(s)))
        for T in (512, 2048):
            u, ctx = utilization(tok, T, d, cut=True)
            uc, _ = utilization(tok, T, d, cut=False)
            out["utilization"][str(T)] = round(u, 4)
            out["upstream_crop_utilization"][str(T)] = round(uc, 4)
            out["bos_context"][str(T)] = round(ctx, 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
