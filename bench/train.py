"""Training throughput: tok/s, MFU (when the device's peak is known) and peak memory of full
training steps (forward, backward, MuonAdamW step) of a model of the given shape. Prints JSON.

    python -m bench.train --depth 12 --max-seq-len 2048 --device-batch-size 32       # one GPU
    python -m bench.train --depth 4 --max-seq-len 512 --device-batch-size 8 \\
        --total-batch-size 4096 --threads 2                                           # CPU

Random tokens stand in for data (the loader is measured by bench/dataloader.py, if present, and
overlaps with compute anyway). The first --warmup steps (compilation, allocator warm-up) are
excluded from the figures. --threads sets torch's intra-op threads (default: torch's own choice).
"""
import argparse
import json
import os
import platform
import resource
import statistics
import time

import torch

from nanochat.common import get_compute_dtype, get_peak_flops, synchronize
from nanochat.gpt import GPT, GPTConfig
from nanochat.hparams import model_dims
from nanochat.training import clear_grads


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--total-batch-size", type=int, default=-1, help="tokens per step (default: one micro-batch)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--window-pattern", default=None, help="default: SSSL on CUDA, L elsewhere")
    p.add_argument("--steps", type=int, default=10, help="measured steps")
    p.add_argument("--warmup", type=int, default=3, help="steps run before measuring")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on CUDA)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--device-type", default="", choices=["", "cpu", "cuda", "mps"])
    args = p.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device_type = args.device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_type)
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")
    dtype = get_compute_dtype(device_type)
    T, B = args.max_seq_len, args.device_batch_size
    total = args.total_batch_size if args.total_batch_size > 0 else B * T
    if total % (B * T):
        raise SystemExit(f"--total-batch-size {total} is not a multiple of {B} x {T}")
    accum = total // (B * T)
    dim, n_head = model_dims(args.depth, args.aspect_ratio, args.head_dim)
    window = args.window_pattern or ("SSSL" if device_type == "cuda" else "L")
    config = GPTConfig(sequence_len=T, vocab_size=args.vocab_size, n_layer=args.depth, n_head=n_head,
                       n_kv_head=n_head, n_embd=dim, window_pattern=window)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    model.checkpoint_activations = args.activation_checkpointing
    use_compile = args.compile if args.compile is not None else device_type == "cuda"
    # --compile also compiles the optimizer's update functions (as nanochat train base does)
    optimizer = model.setup_optimizer(weight_decay=0.1, compile=use_compile)
    flops_per_token = model.estimate_flops()
    fwd = torch.compile(model, dynamic=False) if use_compile else model
    g = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(0, args.vocab_size, (B, T + 1), device=device, generator=g) for _ in range(accum)]

    def step():
        for batch in batches:
            with torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32):
                loss = fwd(batch[:, :-1], batch[:, 1:])
            (loss / accum).backward()
        optimizer.step()
        clear_grads(model)  # as the training stages do
        return loss

    for _ in range(args.warmup):
        step()
    synchronize(device)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    dt = statistics.median(times)
    tok_per_sec = total / dt
    peak = get_peak_flops(device)
    if device_type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**20
        mem_kind = "cuda max allocated"
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        mem_kind = "process peak RSS"
    out = {
        "depth": args.depth, "model_dim": dim, "n_head": n_head, "max_seq_len": T, "device_batch_size": B,
        "total_batch_size": total, "grad_accum": accum, "vocab_size": args.vocab_size, "window_pattern": window,
        "params": sum(p.numel() for p in model.parameters()), "flops_per_token": flops_per_token,
        "device": torch.cuda.get_device_name(device) if device_type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "compile": use_compile,
        "activation_checkpointing": args.activation_checkpointing,
        "steps": args.steps, "warmup": args.warmup, "step_time_median_s": dt,
        "step_time_min_s": min(times), "tok_per_sec": tok_per_sec, "tok_per_sec_best_step": total / min(times),
        # CPU seconds this process used per step: on a shared machine, wall time includes waiting
        "cpu_time_per_step_s": statistics.median(cpu_times),
        "load_average_1min": os.getloadavg()[0],
        "mfu": flops_per_token * tok_per_sec / peak if peak else None,
        "peak_memory_mib": peak_mem, "memory_kind": mem_kind, "final_loss": float(loss),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
