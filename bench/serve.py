"""Server benchmark: aggregate tokens/s and request latency (p50/p90/p99) for 1, 4 and 16
concurrent clients of `nanochat serve`'s continuous batching. Prints JSON.

    python -m bench.serve --depth 4                             # CPU (the server gets cores - 1 threads)
    python -m bench.serve --depth 12 --max-batch 32             # GPU
    python -m bench.serve -i sft                                # a trained checkpoint

The bench starts the server itself, in a child process on 127.0.0.1 (a free port), with
random weights unless -i names a checkpoint source, and with stop tokens ignored so that every
reply is exactly --max-tokens long (random weights would otherwise stop at random). Each client
sends --requests-per-client streaming requests to /v1/chat/completions, one after the other.
Tokenizer: $NANOCHAT_BASE_DIR/tokenizer if it exists, else one trained here on this
repository's own text (a fresh GPU machine has neither data nor a tokenizer).
"""
import argparse
import glob
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from bench.common import machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_or_train_tokenizer(vocab_size):
    from nanochat.tokenizer import Tokenizer, get_tokenizer, tokenizer_dir
    if os.path.exists(os.path.join(tokenizer_dir(), "merges.tiktoken")):
        return get_tokenizer()
    texts = []
    for path in sorted(glob.glob(os.path.join(REPO, "**", "*.py"), recursive=True) +
                       glob.glob(os.path.join(REPO, "**", "*.md"), recursive=True)):
        if ".venv" not in path:
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
    return Tokenizer.train(iter(texts), vocab_size)


def build(args):
    """(model, tokenizer, device) as the server gets them: a checkpoint (-i) or random weights,
    in the --weights format (its default resolved for the device, as `nanochat serve` does)."""
    import torch

    from nanochat.common import autodetect_device_type
    from nanochat.quant import prepare_for_inference, weights_choice
    device = torch.device(args.device_type or autodetect_device_type())
    if device.type == "cpu":  # the same default as `nanochat serve --threads`
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) - 1))
    weights = weights_choice(args.weights, device.type)[0]
    if args.source:
        from nanochat.models import load_model
        model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, weights=weights)
    else:
        from nanochat.gpt import GPT, GPTConfig
        tokenizer = get_or_train_tokenizer(args.vocab_size)
        dim = -(-args.depth * args.aspect_ratio // args.head_dim) * args.head_dim
        cfg = GPTConfig(sequence_len=args.max_seq_len, vocab_size=tokenizer.get_vocab_size(), n_layer=args.depth,
                        n_head=dim // args.head_dim, n_kv_head=dim // args.head_dim, n_embd=dim,
                        window_pattern="SSSL" if device.type == "cuda" else "L")
        with torch.device("meta"):
            model = GPT(cfg)
        model.to_empty(device=device)
        model.init_weights()
        prepare_for_inference(model, weights, device.type)  # as `nanochat serve` loads it (models.build_model)
    return model, tokenizer, device, weights


def prompt_tokens(tokenizer, i):
    """The tokens the server prefills for request i (the chat template of one user message)."""
    conv = {"messages": [{"role": "user", "content": request_text(i)}]}
    return tokenizer.render_for_completion(conv)


def request_text(i):
    return f"Request {i}: tell me a long story about a lighthouse."


def engine_only(args):
    """The child process of --engine-baseline: the same model, weights and threads as the server,
    and the server's own decoder (a BatchDecoder of --max-batch rows, stop tokens ignored), given
    rows = the largest client count at once: the batch a server round has at best, without HTTP,
    the event loop or the scheduler thread. Median of 3 timed rounds after a warm-up. Prints JSON."""
    import torch

    from nanochat.engine import BatchDecoder
    from nanochat.sampling import Sequence
    model, tokenizer, device, weights = build(args)
    rows = max(int(c) for c in args.clients.split(","))
    prompts = [prompt_tokens(tokenizer, c * 1000) for c in range(rows)]
    dec = BatchDecoder(model, tokenizer, batch_size=max(args.max_batch, rows), seed=0)
    dec.specials["stop"] = set()  # fixed-length replies, as the bench's server
    rates = []
    with torch.inference_mode():
        for rep in range(4):  # the first round warms up
            t0 = time.perf_counter()
            seqs = [Sequence(p, args.max_tokens, 1.0, 50, None, owner=i) for i, p in enumerate(prompts)]
            dec.add(seqs)
            while dec.seqs:
                dec.remove_done()
                if dec.seqs:
                    dec.step()
            dt = time.perf_counter() - t0
            if rep:
                rates.append(sum(len(q.out) for q in seqs) / dt)
    print(json.dumps({"rows": rows, "weights": weights, "threads": torch.get_num_threads(),
                      "engine_tok_per_s_all": [round(r, 1) for r in rates],
                      "engine_tok_per_s": round(statistics.median(rates), 1)}), flush=True)


def serve(args):
    """The child process: build the model, start uvicorn."""
    import torch
    import uvicorn

    from nanochat.server import create_app
    model, tokenizer, device, weights = build(args)
    app = create_app(model, tokenizer, max_batch=args.max_batch, model_name="bench", compile=args.compile)
    if not args.source or args.ignore_stop:
        app.state.scheduler.decoder.specials["stop"] = set()  # fixed-length replies
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"ready": True, "params_M": round(params / 1e6, 1), "n_layer": model.config.n_layer,
                      "n_embd": model.config.n_embd, "vocab_size": model.config.vocab_size,
                      "device": torch.cuda.get_device_name() if device.type == "cuda" else device.type,
                      "threads": torch.get_num_threads(), "weights": weights}), flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def one_request(url, i, max_tokens):
    """Stream one request; return (latency_s, ttft_s, completion_tokens)."""
    import requests
    body = {"messages": [{"role": "user", "content": request_text(i)}],
            "max_tokens": max_tokens, "temperature": 1.0, "top_k": 50, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif ttft is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
    return time.perf_counter() - t0, ttft, tokens


def process_cpu_s(pid):
    """CPU seconds (user + system, all threads) of process pid so far, from /proc (None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def decoded_rows(stats):
    """Rows decoded over all steps so far, from /stats' rows-per-step histogram."""
    return sum(int(rows) * steps for rows, steps in stats["rows_per_step_histogram"].items())


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def load(url, clients, requests_per_client, max_tokens):
    results, errors = [], []

    def client(c):
        for k in range(requests_per_client):
            try:
                results.append(one_request(url, c * 1000 + k, max_tokens))
            except Exception as e:
                errors.append(repr(e))

    t0, cpu0 = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    lat = [r[0] for r in results]
    ttft = [r[1] for r in results if r[1] is not None]
    tokens = sum(r[2] for r in results)
    return {"clients": clients, "requests": len(results), "errors": len(errors), "wall_s": round(wall, 3),
            "clients_cpu_s": round(cpu, 3),  # this process's CPU time: the clients compete with the server for cores
            "completion_tokens": tokens, "aggregate_tok_per_s": round(tokens / wall, 1),
            "latency_p50_s": round(percentile(lat, 50), 3), "latency_p90_s": round(percentile(lat, 90), 3),
            "latency_p99_s": round(percentile(lat, 99), 3),
            "ttft_p50_s": round(percentile(ttft, 50), 3) if ttft else None,
            "per_request_tok_per_s_p50": round(statistics.median(r[2] / r[0] for r in results), 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", default=None)
    p.add_argument("--model-tag", default=None)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=4096, help="only when a tokenizer is trained here")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="CPU: the server's torch threads (default: cores - 1)")
    p.add_argument("--device-type", default="")
    p.add_argument("--compile", action="store_true", help="serve with the compiled decode step (waits until ready)")
    p.add_argument("--ignore-stop", action="store_true", help="with -i: fixed-length replies anyway")
    p.add_argument("--weights", default=None, choices=("fp32", "bf16", "int8"),
                   help="the server's weight format (default: `nanochat serve`'s default for the device)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each client count (the JSON gives their median)")
    p.add_argument("--engine-baseline", action="store_true",
                   help="also time the server's decoder alone at the largest client count (same model, weights and "
                        "threads; median of 3) and report the server's aggregate as a share of it")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)  # the engine-baseline child
    p.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_only:
        return serve(args)
    if args.engine_only:
        return engine_only(args)
    own = [a for a in (sys.argv[1:] if argv is None else list(argv)) if a != "--engine-baseline"]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "bench.serve", "--serve-only", "--port", str(port)] + own
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        import requests
        info = json.loads(child.stdout.readline() or "{}")
        if not info.get("ready"):
            raise SystemExit("the server process failed to start")
        while True:
            try:
                if requests.get(url + "/health", timeout=2).json()["ready"]:
                    break
                time.sleep(0.5)
            except requests.ConnectionError:
                if child.poll() is not None:
                    raise SystemExit("the server process died")
                time.sleep(0.2)
        load(url, 1, 1, 8)  # warm-up
        runs = []
        for c in [c for c in args.clients.split(",") for _ in range(args.repeats)]:
            before, server_cpu = requests.get(url + "/stats", timeout=10).json(), process_cpu_s(child.pid)
            runs.append(load(url, int(c), args.requests_per_client, args.max_tokens))
            after = requests.get(url + "/stats", timeout=10).json()
            if server_cpu is not None:
                runs[-1]["server_cpu_s"] = round(process_cpu_s(child.pid) - server_cpu, 3)
            # how the scheduler thread spent the run's wall time (the rest: idle, or waiting for the GIL)
            for k in ("prefill_s", "decode_s"):
                runs[-1]["scheduler_" + k] = round(after[k] - before[k], 3)
            steps = after["decode_steps"] - before["decode_steps"]
            rows = decoded_rows(after) - decoded_rows(before)
            runs[-1]["decode_steps"] = steps
            runs[-1]["mean_rows_per_step"] = round(rows / max(steps, 1), 2)
        stats = requests.get(url + "/stats", timeout=10).json()
    finally:
        child.terminate()
        child.wait(timeout=30)
    engine = None
    if args.engine_baseline:  # after the server has exited: the two never share the cores
        r = subprocess.run([sys.executable, "-m", "bench.serve", "--engine-only"] + own, capture_output=True, text=True,
                           cwd=REPO)
        if r.returncode:
            raise SystemExit(f"the engine baseline failed:\n{r.stderr[-3000:]}")
        engine = json.loads(r.stdout.strip().splitlines()[-1])
    medians = {}
    for r in runs:
        medians.setdefault(r["clients"], []).append(r["aggregate_tok_per_s"])
    medians = {c: statistics.median(v) for c, v in medians.items()}
    base = medians[runs[0]["clients"]]
    out = {
        "bench": "serve", "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
        "cpus": os.cpu_count(), "server": {k: v for k, v in info.items() if k != "ready"},
        "max_batch": args.max_batch, "max_tokens": args.max_tokens,
        "command": "python -m bench.serve " + " ".join(sys.argv[1:] if argv is None else argv),
        "runs": runs,
        "aggregate_tok_per_s_median": {str(c): v for c, v in medians.items()},
        "speedup_vs_first": {str(c): round(v / base, 2) for c, v in medians.items()},
        "server_mean_rows_per_step": stats["mean_rows_per_step"], "server_max_rows_per_step": stats["max_rows_per_step"],
    }
    if engine:
        top = max(medians)
        out["engine"] = engine
        out["server_vs_engine"] = round(medians[top] / engine["engine_tok_per_s"], 3)  # at the largest client count
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
