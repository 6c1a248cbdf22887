"""Web chat and HTTP API: one model shared by many clients through continuous batching.

    GET  /                      the chat page (ui.html)
    GET  /static/...            the page's vendored libraries (nanochat/static, README.md there)
    GET  /health                {"status": "ok", ...}
    GET  /stats                 active/queued requests, tokens generated, uptime, rows per step
    POST /chat/completions      nanochat's own protocol (SSE: data: {"token": ...} ... data: {"done": true})
    POST /v1/chat/completions   OpenAI's chat completions API (JSON, or SSE chunks + data: [DONE])
    GET  /v1/models             the one model served
    GET  /metrics               Prometheus metrics (vLLM's names, docs/serving.md)

With an API key (create_app(api_key=...), `nanochat serve --api-key`), every route but /,
/static/..., /health and /metrics needs `Authorization: Bearer KEY` (401 otherwise).

A single scheduler thread (nanochat/scheduler.py) owns the model and a KV cache of `max_batch`
rows and runs continuous batching. The HTTP side is asyncio: each request gets an asyncio.Queue
that the scheduler thread feeds.

One request never hurts another: bad input is a 400 (never a 500), a body is bounded in size and
in the time it may take to arrive, the queue is bounded (503 + Retry-After when full), a client
that disconnects (streaming or not) frees its row at the next step, and a sequence whose sampling
fails ends alone (docs/serving.md, "Guarantees"). The request limits and checks:
nanochat/serve_request.py.
"""
import asyncio
import codecs
import hashlib
import hmac
import json
import os
import time
import uuid
from contextlib import aclosing, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from nanochat.serve_metrics import CONTENT_TYPE_LATEST, Metrics
from nanochat.serve_request import BODY_TIMEOUT_S, MAX_BODY_BYTES, BadRequest, read_body, validate_request
from nanochat.scheduler import DEFAULT_MAX_QUEUE, Job, Scheduler

RETRY_AFTER_S = 2              # what a refused client is told to wait


# ---------------------------------------------------------------------------
# Streaming text

class TextStream:
    """Token ids -> text pieces that never split a UTF-8 character: the bytes of an incomplete
    character are held back until the token(s) completing it arrive."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token):
        return self.decoder.decode(self.tokenizer.decode_bytes([token]))

    def flush(self):
        return self.decoder.decode(b"", final=True)


def _sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error(status, message, kind="invalid_request_error", headers=None):
    # the OpenAI error shape, which the openai client turns into a BadRequestError with this message
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


def _refusal(e):
    """The response for a BadRequest: 408 and 413 also close the connection (the rest of that
    body may still be on its way), a full queue says when to come back."""
    headers = None
    if e.status in (408, 413):
        headers = {"Connection": "close"}
    elif e.status == 503:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
    kind = "server_error" if e.status >= 500 else "invalid_request_error"
    return _error(e.status, str(e), kind=kind, headers=headers)


# ---------------------------------------------------------------------------
# The app

# Routes anyone may reach when an API key is set: the page itself and its libraries (it asks for
# the key), the health check of load balancers, and the metrics scraper (as vLLM does)
OPEN_PATHS = ("/", "/health", "/metrics")
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def key_matches(header, api_key):
    """Whether an Authorization header value is `Bearer <api_key>`, compared in constant time
    (the time taken says nothing about how much of a guess was right)."""
    scheme, _, given = (header or "").partition(" ")
    # digests of equal length: neither the content nor the length of the key shows in the timing
    # header values arrive as latin-1 text (one character per byte): back to their bytes, which
    # a client sends as the UTF-8 of the key
    ok = hmac.compare_digest(hashlib.sha256(given.strip().encode("latin-1", "replace")).digest(),
                             hashlib.sha256(api_key.strip().encode("utf-8")).digest())
    return ok and scheme.lower() == "bearer"


def create_app(model, tokenizer, max_batch=8, model_name="nanochat", token_delay=0.0, seed=42, compile=False,
               max_queue=DEFAULT_MAX_QUEUE, max_body_bytes=MAX_BODY_BYTES, body_timeout=BODY_TIMEOUT_S,
               api_key=None):
    """The FastAPI app. The scheduler thread starts with the app and stops with it. compile:
    torch.compile the decode step (engine.BatchDecoder); /health says "ready" once it is warm.
    max_queue: requests that may wait for a row (more get 503); max_body_bytes / body_timeout:
    the largest request body and the seconds it may take to arrive (413 / 408). api_key: when
    set, every route outside OPEN_PATHS answers 401 without `Authorization: Bearer <api_key>`."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty")
    context_len = model.config.sequence_len
    metrics = Metrics(model_name)
    scheduler = Scheduler(model, tokenizer, max_batch=max_batch, seed=seed, token_delay=token_delay,
                          compile=compile, max_queue=max_queue, metrics=metrics)
    created = int(time.time())
    ui_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ui.html")


    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.shutdown()

    app = FastAPI(title="nanochat", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = scheduler

    if api_key is not None:
        @app.middleware("http")
        async def require_key(request, call_next):
            path = request.url.path
            if path in OPEN_PATHS or path.startswith("/static/") or key_matches(request.headers.get("authorization"), api_key):
                return await call_next(request)
            # the OpenAI error shape; the client raises AuthenticationError on it
            return _error(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                          kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})

    async def parse(request):
        """(prompt, settings) of a chat request, or BadRequest (400, 408, 413): every way a body
        can be wrong is the client's error, never a 500."""
        raw = await read_body(request, max_body_bytes, body_timeout)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:  # also ints too long to convert
            raise BadRequest(f"malformed JSON: {e}")
        except RecursionError:
            raise BadRequest("malformed JSON: nested too deeply")
        return validate_request(body, tokenizer, context_len)

    async def accept(request):
        """(job, None) for a valid request, queued before any response is started; (None, the
        error response) for a bad one (400/408/413) or when the queue is full (503)."""
        try:
            prompt, settings = await parse(request)
        except BadRequest as e:
            return None, _refusal(e)
        job = Job(prompt, settings, asyncio.get_running_loop())
        if not scheduler.submit(job):
            return None, _refusal(BadRequest(f"the server is busy ({scheduler.max_queue} requests waiting): "
                                             f"retry in {RETRY_AFTER_S} s", status=503))
        return job, None

    async def watch_disconnect(request, job):
        # the body has been read, so the next ASGI message is the client going away (uvicorn
        # also sends it once the response is complete, when it no longer matters)
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancelled.set()
        job.events.put_nowait(("cancelled", None))

    async def follow(job, request):
        """Yield lists of the job's events: ("token", id) ... then ("done", reason) or
        ("error", msg) last, or ("cancelled", None) when the client went away. A list holds every
        event already waiting (one, unless this coroutine fell behind the scheduler), so that a
        late stream catches up in one write."""
        watcher = asyncio.create_task(watch_disconnect(request, job))
        try:
            while True:
                items = [await job.events.get()]
                while not job.events.empty():
                    items.append(job.events.get_nowait())
                yield items
                if items[-1][0] in ("done", "error", "cancelled"):
                    return
        finally:
            # runs when the reply ends, and also when the client disconnects (the watcher, or the
            # streaming response cancelling its iterator): the scheduler frees the row at its next step
            watcher.cancel()
            job.cancelled.set()

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.api_route("/", methods=["GET", "HEAD"])
    async def index():
        with open(ui_path, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok", "model": model_name, "max_batch": max_batch, "context_len": context_len,
                "ready": scheduler.ready.is_set()}

    @app.get("/stats")
    async def stats():
        return scheduler.stats()

    @app.get("/metrics")
    async def prometheus():
        page = metrics.render(scheduler.active, len(scheduler.waiting), max_batch)
        return Response(page, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "nanochat"}]}

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        job, refused = await accept(request)
        if refused:
            return refused

        async def events():
            text = TextStream(tokenizer)
            async for items in follow(job, request):
                out = []
                for kind, value in items:
                    if kind == "token":
                        piece = text.push(value)
                        if piece:
                            out.append(_sse({"token": piece}))
                    elif kind == "done":
                        tail = text.flush()
                        if tail:
                            out.append(_sse({"token": tail}))
                        out.append(_sse({"done": True, "finish_reason": value}))
                    elif kind == "error":
                        out.append(_sse({"error": value}))
                if out:
                    yield "".join(out)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(request: Request):
        job, refused = await accept(request)
        if refused:
            return refused
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        now = int(time.time())

        def usage(n):
            return {"prompt_tokens": len(job.prompt), "completion_tokens": n, "total_tokens": len(job.prompt) + n}

        if not job.settings["stream"]:
            tokens, reason = [], None
            async with aclosing(follow(job, request)) as events:  # closed (row freed) on every return
                async for items in events:
                    for kind, value in items:
                        if kind == "token":
                            tokens.append(value)
                        elif kind == "done":
                            reason = value
                        elif kind == "error":
                            return _error(500, value, kind="server_error")
                        else:  # cancelled: nobody is listening any more
                            return _error(499, "client closed the request")
            return {
                "id": cid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": tokenizer.decode(tokens)},
                             "finish_reason": reason, "logprobs": None}],
                "usage": usage(len(tokens)),
            }

        include_usage = job.settings["include_usage"]

        def chunk(delta, reason=None):
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]})

        async def events():
            text = TextStream(tokenizer)
            n = 0
            yield chunk({"role": "assistant", "content": ""})
            async for items in follow(job, request):
                out, content = [], ""  # the pieces of the tokens that arrived together: one chunk
                for kind, value in items:
                    if kind == "token":
                        n += 1
                        content += text.push(value)
                    elif kind == "done":
                        content += text.flush()
                        if content:
                            out.append(chunk({"content": content}))
                            content = ""
                        out.append(chunk({}, reason=value))
                        if include_usage:
                            out.append(_sse({"id": cid, "object": "chat.completion.chunk", "created": now,
                                             "model": model_name, "choices": [], "usage": usage(n)}))
                    elif kind == "error":
                        if content:
                            out.append(chunk({"content": content}))
                            content = ""
                        out.append(_sse({"error": {"message": value, "type": "server_error"}}))
                if content:
                    out.append(chunk({"content": content}))
                if out:
                    yield "".join(out)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
