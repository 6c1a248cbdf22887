"""A chat request, checked before it reaches the model: its body read within bounds of size and
time (read_body) and its messages and settings validated (validate_request); every way it can be
wrong is a BadRequest, which nanochat/server.py answers with its HTTP status and a JSON error."""
import asyncio

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
