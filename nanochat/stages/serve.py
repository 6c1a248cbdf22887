"""nanochat serve: the web chat and an OpenAI-compatible HTTP API (docs/serving.md).

    nanochat serve [-i SOURCE] [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--max-queue 64]
                   [--api-key KEY]  (or $NANOCHAT_API_KEY)
"""
import argparse
import ipaddress
import os
import sys

import torch
import uvicorn

from nanochat.flags import add_model_flags
from nanochat.models import load_chat_model
from nanochat.common import UserError, print0
from nanochat.quant import describe_weights
from nanochat.scheduler import DEFAULT_MAX_QUEUE
from nanochat.server import create_app


def is_loopback(host):
    """Whether binding to `host` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def token_delay():
    """NANOCHAT_TOKEN_DELAY: seconds to sleep after every decode step (tests and streaming demos only)."""
    try:
        return max(0.0, float(os.environ.get("NANOCHAT_TOKEN_DELAY") or 0.0))
    except ValueError:
        raise UserError(f"NANOCHAT_TOKEN_DELAY must be a number of seconds, not {os.environ['NANOCHAT_TOKEN_DELAY']!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nanochat serve", description="Web chat UI and OpenAI-compatible API.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="rows of the KV cache = requests decoded together; more wait in a queue")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help=f"requests that may wait for a row beyond the free ones (default {DEFAULT_MAX_QUEUE}); "
                             f"more are answered 503 with Retry-After")
    parser.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: nanochat-<source>)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU only: torch threads for the model (default: one fewer than the cores, so the "
                             "HTTP side keeps a core to itself; measured in docs/benchmarks.md)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (CUDA graphs on CUDA); compiles at startup, "
                             "/health says ready when done")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on the API and the chat (default: "
                             "$NANOCHAT_API_KEY; /, /health and /metrics stay open)")
    add_model_flags(parser)  # -i and the common flags
    args = parser.parse_args(argv)
    api_key = args.api_key if args.api_key is not None else os.environ.get("NANOCHAT_API_KEY") or None
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be >= 1")
    if args.max_batch < 1:
        raise UserError("--max-batch must be >= 1")
    if args.max_queue < 0:
        raise UserError("--max-queue must be >= 0")
    if not 0 <= args.port <= 65535:
        raise UserError("--port must be in [0, 65535]")

    if api_key is None and not is_loopback(args.host):
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this machine can use "
              f"the model and the API (pass --api-key or set NANOCHAT_API_KEY)", file=sys.stderr, flush=True)

    model, tokenizer, meta, source = load_chat_model(args)
    if model.get_device().type == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) - 1))
    name = args.model_name or f"nanochat-{source}"
    app = create_app(model, tokenizer, max_batch=args.max_batch, model_name=name, token_delay=token_delay(),
                     compile=args.compile, max_queue=args.max_queue, api_key=api_key)

    threads = f", {torch.get_num_threads()} CPU threads" if model.get_device().type == "cpu" else ""
    print0(f"serving {name} (step {meta.get('step', '?')}, {describe_weights(args.weights, model.get_device().type)}) "
           f"on http://{args.host}:{args.port}/ with up to {args.max_batch} requests per batch{threads}"
           f"{', API key required' if api_key else ''}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
