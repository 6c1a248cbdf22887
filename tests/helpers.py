"""Helpers shared by the test modules (never a test module importing another): tiny models, a
scripted model, and real local servers (uvicorn and a file server on 127.0.0.1)."""
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import requests
import torch
import torch.nn as nn
import torch.nn.functional as F
import uvicorn

from nanochat.gpt import GPT, GPTConfig


def make_model(vocab_size, seed=0, sequence_len=128):
    """A tiny GPT with large random weights: its logits are far apart, so greedy decoding is not
    decided by rounding noise (a freshly initialised GPT has near-equal logits)."""
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                    n_embd=64, window_pattern="SL", short_window=8)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.4)
    return model.eval()


# A scripted model. The real GPT runs underneath (so the KV cache is exercised), but its logits
# are overridden so that generated position i is script[i]: tests of the engine's state machine,
# the server and the UI, not of the model.

class Wrapped(torch.nn.Module):
    """A real GPT inside, with what the engine asks of a model besides forward(): subclasses
    change forward() to script, poison or break it."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    def get_device(self):
        return self.inner.get_device()

    def new_kv_cache(self, *args, **kwargs):
        return self.inner.new_kv_cache(*args, **kwargs)


class Scripted(Wrapped):
    def __init__(self, model, prompt_len, script):
        super().__init__(model)
        self.prompt_len = prompt_len
        self.script = script

    def forward(self, idx, kv_cache=None, kv_len=None, logits_positions=None):
        before = kv_cache.lengths.clone()
        self.inner(idx, kv_cache=kv_cache, kv_len=kv_len)  # fills the cache like the real model
        B, T = idx.shape
        pos = [T - 1] * B if logits_positions is None else logits_positions[1].tolist()
        logits = torch.zeros(B, self.config.vocab_size)
        for b in range(B):
            g = int(before[b]) + pos[b] + 1 - self.prompt_len  # index of the token these logits predict
            logits[b, self.script[max(0, min(g, len(self.script) - 1))]] = 100.0
        return logits if logits_positions is not None else logits[:, None].expand(B, T, -1)


def select_positions(logits, logits_positions):
    """What GPT.forward returns for `logits_positions`, from a stub's full (B, T, V) logits."""
    if logits_positions is None:
        return logits
    rows, positions = logits_positions
    return logits[rows, positions]


class BigramStub(nn.Module):
    """logits[b, t] = table[idx[b, t]]: a fixed random table, so every loss is known."""

    def __init__(self, vocab_size, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab_size, vocab_size, generator=g))

    def forward(self, idx, targets=None, loss_reduction="mean"):
        logits = self.table[idx]
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(targets.shape) if loss_reduction == "none" else loss


class OracleLM(nn.Module):
    """A causal stub: after any prefix of one of the `preferred` token sequences it puts a logit
    of 20 on that sequence's next token (0 elsewhere); after any other prefix every token is
    equally likely. So a preferred continuation costs ~0 nats per token, anything else ~log V."""

    def __init__(self, vocab_size, preferred, sequence_len=256):
        super().__init__()
        self.config = SimpleNamespace(sequence_len=sequence_len)
        self.vocab_size = vocab_size
        self.preferred = [list(seq) for seq in preferred]
        self.dummy = nn.Parameter(torch.zeros(()))
        self.next = {}
        for seq in preferred:
            for i in range(len(seq) - 1):
                self.next[tuple(seq[:i + 1])] = seq[i + 1]
        self.rows_seen = []  # batch sizes of the forwards, to check batching

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", logits_positions=None):
        B, T = idx.shape
        self.rows_seen.append(B)
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            row = idx[b].tolist()
            for t in range(T):
                nxt = self.next.get(tuple(row[:t + 1]))
                if nxt is not None:
                    logits[b, t, nxt] = 20.0
        return select_positions(logits, logits_positions)


class LiveServer:
    """uvicorn in a thread, on a socket bound here first (a free port with no race)."""

    def __init__(self, app):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stats(self):
        return requests.get(self.url + "/stats", timeout=10).json()

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


class FileServer:
    """A real HTTP server on 127.0.0.1 serving `files` ({name: bytes}) under `url`. modes: name ->
    list of behaviours for successive requests ('ok', '503', '404', 'truncate', 'stall'); the last
    one repeats. Unlisted names are served 'ok' when they exist, else 404."""

    def __init__(self, files):
        self.files, self.modes, self.hits = files, {}, {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                n = outer.hits.get(name, 0)
                outer.hits[name] = n + 1
                plan = outer.modes.get(name, ["ok"])
                mode = plan[min(n, len(plan) - 1)]
                body = outer.files.get(name)
                if body is None or mode == "404":
                    self.send_response(404)
                    self.send_header("Content-Length", "9")
                    self.end_headers()
                    self.wfile.write(b"not found")
                    return
                if mode == "503":
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if mode == "stall":
                    time.sleep(2.0)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode == "truncate":  # promise the whole file, send half, hang up
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/datasets/x/resolve/main"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
