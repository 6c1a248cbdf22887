"""F.linear on CPU with the weight as stored by nn.Linear (out, in) vs stored transposed (the
transpose of a contiguous (in, out) matrix: nanochat.inference_layout), at the row counts of
decode and evaluation. Prints JSON: microseconds per call (the best of --rounds interleaved
rounds) and the speedup of the transposed layout, per matrix and row count.

    python -m bench.linear_layout [--width 256] [--vocab 32768] [--threads 1] [--rounds 7]

The matrices are a d4 model's at the given width: the stacked q/k/v (3C x C), c_proj (C x C),
c_fc (4C x C), the MLP's c_proj (C x 4C) and lm_head (vocab x C), fp32.
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from bench.common import machine


def per_call_us(fn, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--rows", default="1,2,4,8,16,64,512,4096")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    C = args.width
    shapes = {"qkv": (3 * C, C), "attn.c_proj": (C, C), "c_fc": (4 * C, C), "mlp.c_proj": (C, 4 * C),
              "lm_head": (args.vocab, C)}
    out = {"machine": machine(), "threads": args.threads, "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M"), "results": []}
    with torch.inference_mode():
        for name, (n_out, n_in) in shapes.items():
            w = torch.randn(n_out, n_in)
            wt = w.t().contiguous().t()
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, n_in)
                if not torch.allclose(F.linear(x, w), F.linear(x, wt), rtol=1e-4, atol=1e-4):
                    raise SystemExit(f"{name} at {rows} rows: the two layouts disagree")
                flops = 2 * rows * n_in * n_out
                calls = max(3, min(500, int(2e8 / flops)))
                best = {"stored": float("inf"), "transposed": float("inf")}
                for _ in range(args.rounds):  # interleaved: machine drift hits both alike
                    best["stored"] = min(best["stored"], per_call_us(lambda: F.linear(x, w), calls))
                    best["transposed"] = min(best["transposed"], per_call_us(lambda: F.linear(x, wt), calls))
                out["results"].append({"matrix": name, "shape": [n_out, n_in], "rows": rows,
                                       "stored_us": round(best["stored"], 1),
                                       "transposed_us": round(best["transposed"], 1),
                                       "speedup": round(best["stored"] / best["transposed"], 2)})
                print(json.dumps(out["results"][-1]), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
