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
fails ends alone (docs/serving.md, "Guarantees").
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
from nanochat.scheduler import DEFAULT_MAX_QUEUE, Job, Scheduler


# Request limits (each one answered with HTTP 400 and a JSON error)
MAX_MESSAGES = 500             # messages in one request
MAX_MESSAGE_CHARS = 8000       # characters in one message
MAX_CONVERSATION_CHARS = 32000 # characters in all messages together
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200  # 0 = no top-k filtering
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4096
DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_MAX_TOKENS = 0.8, 50, 512
ROLES = ("system", "user", "assistant")
MAX_BODY_BYTES = 1 << 20       # a request body (the longest valid conversation is ~200 KB of JSON)
MAX_DRAIN_BYTES = 16 << 20     # of a body too large, read and dropped so the client sees the 413
BODY_TIMEOUT_S = 10.0          # seconds the whole body may take to arrive (then 408, connection closed)
RETRY_AFTER_S = 2              # what a refused client is told to wait


class BadRequest(Exception):
    """Answered with HTTP `status` (400 unless said otherwise) and the message as a JSON error."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------
# Validation

def _number(body, key, lo, hi, default, integer=False):
    if key not in body or body[key] is None:
        return default
    v = body[key]
    # bool is an int subclass in Python; `"temperature": true` is a client bug, not 1.0. JSON ints
    # can be far larger than a float: compare them as ints (float(v) would overflow), and a
    # float must be whole to stand for an integer (NaN and infinity are not).
    if isinstance(v, bool) or not isinstance(v, (int, float)) or \
            (integer and isinstance(v, float) and not v.is_integer()):
        raise BadRequest(f"'{key}' must be {'an integer' if integer else 'a number'} in [{lo}, {hi}], "
                         f"got {_short(v)}")
    if not (lo <= v <= hi):  # NaN compares false: refused too
        raise BadRequest(f"'{key}' must be in [{lo}, {hi}], got {_short(v)}")
    return int(v) if integer else float(v)


def _short(v):
    text = repr(v)
    return text if len(text) <= 40 else text[:20] + "..." + f" ({len(text)} characters)"


def _content_text(i, content):
    """A message's text. OpenAI clients may send a list of parts; only text parts are accepted."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"messages[{i}].content: only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise BadRequest(f"messages[{i}].content must be a string")


def validate_request(body, tokenizer, context_len):
    """Check a chat request body; return (prompt token ids, settings dict). Raises BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    if len(messages) > MAX_MESSAGES:
        raise BadRequest(f"too many messages: {len(messages)} > {MAX_MESSAGES}")
    clean, total = [], 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content'")
        role = msg.get("role")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        text = _content_text(i, msg.get("content"))
        if len(text) > MAX_MESSAGE_CHARS:
            raise BadRequest(f"messages[{i}] is too long: {len(text)} > {MAX_MESSAGE_CHARS} characters")
        total += len(text)
        clean.append({"role": role, "content": text})
    if total > MAX_CONVERSATION_CHARS:
        raise BadRequest(f"conversation too long: {total} > {MAX_CONVERSATION_CHARS} characters")
    # order: an optional system message first, then user/assistant alternating, ending with user
    turns = clean[1:] if clean[0]["role"] == "system" else clean
    if not turns:
        raise BadRequest("a system message must be followed by a user message")
    for i, msg in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != want:
            raise BadRequest(f"messages must be: an optional system message, then user and assistant "
                             f"alternating, starting with user; message {i + len(clean) - len(turns)} "
                             f"is {msg['role']!r} where {want!r} was expected")
    if turns[-1]["role"] != "user":
        raise BadRequest("the last message must be from the user")
    settings = {
        "temperature": _number(body, "temperature", MIN_TEMPERATURE, MAX_TEMPERATURE, DEFAULT_TEMPERATURE),
        "top_k": _number(body, "top_k", MIN_TOP_K, MAX_TOP_K, DEFAULT_TOP_K, integer=True),
        "top_p": _number(body, "top_p", 0.0, 1.0, None),
        "max_tokens": _number(body, "max_tokens", MIN_MAX_TOKENS, MAX_MAX_TOKENS, None, integer=True),
        "seed": _number(body, "seed", -2**63, 2**63 - 1, None, integer=True),
        "stream": body.get("stream", False),
    }
    # OpenAI's newer name for the same thing: checked even when max_tokens is given
    newer = _number(body, "max_completion_tokens", MIN_MAX_TOKENS, MAX_MAX_TOKENS, None, integer=True)
    if settings["max_tokens"] is None:
        settings["max_tokens"] = DEFAULT_MAX_TOKENS if newer is None else newer
    if not isinstance(settings["stream"], bool):
        raise BadRequest("'stream' must be true or false")
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise BadRequest(f"'stream_options.include_usage' must be true or false, got {_short(include_usage)}")
    settings["include_usage"] = bool(include_usage)
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):  # `true` == 1 in Python, but is no count
        raise BadRequest(f"only n=1 is supported, got {_short(n)}")
    if settings["top_p"] == 0.0:
        raise BadRequest("'top_p' must be in (0, 1]")
    try:
        prompt = tokenizer.render_for_completion({"messages": clean})
    except ValueError as e:  # the tokenizer's own checks (should agree with the ones above)
        raise BadRequest(str(e))
    if len(prompt) >= context_len:
        raise BadRequest(f"conversation too long: {len(prompt)} tokens, the model's context is {context_len}")
    # the reply may use whatever context is left
    settings["max_tokens"] = min(settings["max_tokens"], context_len - len(prompt))
    return prompt, settings


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


async def read_body(request, max_bytes=MAX_BODY_BYTES, timeout=BODY_TIMEOUT_S, max_drain=MAX_DRAIN_BYTES):
    """The request body, at most max_bytes (413 otherwise, known from Content-Length or while
    reading a chunked body), arriving within `timeout` seconds (408 otherwise: a client that
    announces more than it sends must not hold the connection). Of a body too large, up to
    max_drain more bytes are read and dropped within the same time before the 413 goes out:
    closing a socket with unread data in it makes the kernel send a reset, and the client would
    see "connection reset" instead of the answer."""
    declared = request.headers.get("content-length")
    too_large = None
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        too_large = f"request body too large: {declared} bytes > {max_bytes}"

    async def receive_all():
        nonlocal too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes and too_large is None:
                too_large = f"request body too large: more than {max_bytes} bytes"
            if too_large is None:
                chunks.append(chunk)
            elif size > max_bytes + max_drain:
                break  # not worth reading further: the connection closes after the 413
        return b"".join(chunks)
    try:
        raw = await asyncio.wait_for(receive_all(), timeout)
    except asyncio.TimeoutError:
        if too_large is None:
            raise BadRequest(f"the request body did not arrive within {timeout:g} s", status=408)
    if too_large is not None:
        raise BadRequest(too_large, status=413)
    return raw


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
