"""The HTTP server against a real uvicorn on 127.0.0.1: the official openai client (stream and
non-stream), raw SSE for nanochat's own protocol, continuous batching with parallel clients,
disconnects, every request limit, and UTF-8 safe streaming."""
import json
import socket
import threading
import time

import openai
import pytest
import requests

from helpers import LiveServer, Scripted, Wrapped, make_model
from nanochat.serve_request import MAX_MESSAGES
from nanochat.server import TextStream, create_app, key_matches


@pytest.fixture(scope="module")
def server(tokenizer):
    model = make_model(tokenizer.get_vocab_size(), sequence_len=256)
    # a small per-step delay so that concurrent requests really overlap on a fast machine
    live = LiveServer(create_app(model, tokenizer, max_batch=4, model_name="nanochat-test", token_delay=0.005))
    yield live
    live.close()


def user(text="Hello!"):
    return [{"role": "user", "content": text}]


def sse_events(resp):
    """The JSON payloads of an SSE response (and the literal [DONE])."""
    out = []
    for line in resp.iter_lines(decode_unicode=False):
        if not line:
            continue
        assert line.startswith(b"data: "), line
        payload = line[len(b"data: "):].decode("utf-8")  # strict: a broken character raises here
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_health_models_index(server):
    r = requests.get(server.url + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = requests.get(server.url + "/v1/models", timeout=10)
    assert r.json()["object"] == "list" and r.json()["data"][0]["id"] == "nanochat-test"
    r = requests.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"] and "<title>nanochat</title>" in r.text


def test_classic_sse_protocol(server):
    body = {"messages": user(), "temperature": 0.0, "top_k": 10, "max_tokens": 12}
    with requests.post(server.url + "/chat/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1]["done"] is True and events[-1]["finish_reason"] in ("stop", "length")
    tokens = [e["token"] for e in events[:-1]]
    assert all(isinstance(t, str) for t in tokens) and tokens
    # greedy is deterministic: the same request gives the same text
    with requests.post(server.url + "/chat/completions", json=body, stream=True, timeout=60) as r:
        again = [e["token"] for e in sse_events(r)[:-1]]
    assert "".join(again) == "".join(tokens)


def test_openai_client_non_stream_and_stream(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["nanochat-test"]
    messages = [{"role": "system", "content": "You are terse."}] + user("What is 2+2?")
    r = client.chat.completions.create(model="nanochat-test", messages=messages, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "nanochat-test"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 8
    # streaming: the same greedy text, chunk by chunk, then a final chunk with the finish reason
    stream = client.chat.completions.create(model="nanochat-test", messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_seed_gives_the_same_reply_alone_and_in_a_busy_batch(server):
    """`seed` (OpenAI's field, through the official client): a request samples from its own
    generator, so the same seed gives the same reply whether it ran alone or while other
    requests shared its batch."""
    import openai
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

    def ask(seed, text="Tell me a story"):
        r = client.chat.completions.create(model="nanochat-test", messages=user(text), max_tokens=12,
                                           temperature=1.8, seed=seed)
        return r.choices[0].message.content
    alone = ask(1234)
    started = server.stats()["total_requests"]
    others = [threading.Thread(target=ask, args=(None, f"noise {i}")) for i in range(3)]
    for t in others:
        t.start()
    _wait_for(lambda: server.stats()["total_requests"] >= started + 3, 20)  # the others are in when the seeded one joins
    busy = ask(1234)
    for t in others:
        t.join()
    assert busy == alone
    assert len({ask(s) for s in range(5)}) > 1


def test_openai_raw_stream_ends_with_done(server):
    body = {"messages": user(), "max_tokens": 5, "stream": True, "top_k": 0, "temperature": 1.0}
    with requests.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


def test_parallel_clients_share_batches(server):
    before = server.stats()
    results, errors = [None] * 8, []

    def client(i):
        try:
            body = {"messages": user(f"Tell me a story number {i}"), "max_tokens": 40, "temperature": 1.0}
            r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            results[i] = r.json()
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert all(r is not None and r["choices"][0]["finish_reason"] in ("stop", "length") for r in results)
    stats = server.stats()
    assert stats["total_requests"] - before["total_requests"] == 8
    assert stats["max_rows_per_step"] > 1  # requests were decoded together
    assert stats["max_rows_per_step"] <= 4  # never more rows than --max-batch
    assert stats["active"] == 0 and stats["queued"] == 0
    assert stats["tokens_generated"] - before["tokens_generated"] >= sum(
        r["usage"]["completion_tokens"] for r in results)


def wait_idle(server, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = server.stats()
        if s["active"] == 0 and s["queued"] == 0:
            return s
        time.sleep(0.05)
    raise AssertionError(f"server still busy: {server.stats()}")


def test_disconnect_frees_the_slot(tokenizer):
    """A model that never stops (it repeats one word) and 20 ms per step: only the client leaving
    can end the request early."""
    word = tokenizer.encode(" la")
    live = LiveServer(create_app(Scripted(make_model(tokenizer.get_vocab_size(), sequence_len=512), 0, word),
                                 tokenizer, max_batch=2, token_delay=0.02))
    try:
        body = {"messages": user("Sing"), "max_tokens": 400}
        r = requests.post(live.url + "/chat/completions", json=body, stream=True, timeout=60)
        got = 0
        for line in r.iter_lines():
            got += bool(line)
            if got == 3:
                break
        assert live.stats()["active"] == 1
        r.close()
        t0 = time.time()
        s = wait_idle(live, timeout=5)
        assert time.time() - t0 < 2  # freed within a few steps, not after the 400 tokens (8 s)
        assert s["cancelled"] == 1 and s["completed"] == 0
        assert s["tokens_generated"] < 100
        # the freed row serves the next requests
        r = requests.post(live.url + "/chat/completions", json={"messages": user(), "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and '"finish_reason": "length"' in r.text
        assert live.stats()["completed"] == 1
    finally:
        live.close()


def _raw_post(port, body, path="/v1/chat/completions"):
    """A connected socket that has sent one JSON POST (no reply read yet)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def _wait_for(cond, timeout):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_non_streaming_disconnect_cancels_the_request(tokenizer):
    """A non-streaming request whose client goes away stops generating at once (it used to run
    to max_tokens: 400 steps of 20 ms here), and its row serves the next request."""
    word = tokenizer.encode(" la")
    live = LiveServer(create_app(Scripted(make_model(tokenizer.get_vocab_size(), sequence_len=512), 0, word),
                                 tokenizer, max_batch=1, token_delay=0.02))
    try:
        sock = _raw_post(live.port, json.dumps({"messages": user("Sing"), "max_tokens": 400}).encode())
        _wait_for(lambda: live.stats()["tokens_generated"] >= 3, 10)
        sock.close()
        t0 = time.time()
        s = wait_idle(live, timeout=5)
        assert time.time() - t0 < 2
        assert s["cancelled"] == 1 and s["completed"] == 0 and s["tokens_generated"] < 100
        r = requests.post(live.url + "/v1/chat/completions", json={"messages": user(), "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    finally:
        live.close()


def test_queue_is_bounded_and_full_answers_503_with_retry_after(tokenizer):
    """One row, room for one waiting request: the third concurrent request is refused at once
    with 503 and Retry-After (the openai client sees an APIStatusError); once the others leave,
    requests are served again. Waiting requests whose clients left never hold a place."""
    import openai
    word = tokenizer.encode(" la")
    live = LiveServer(create_app(Scripted(make_model(tokenizer.get_vocab_size(), sequence_len=512), 0, word),
                                 tokenizer, max_batch=1, max_queue=1, token_delay=0.02))
    try:
        body = json.dumps({"messages": user("Sing"), "max_tokens": 400}).encode()
        running = _raw_post(live.port, body)
        _wait_for(lambda: live.stats()["active"] == 1, 10)
        waiting = _raw_post(live.port, body)
        _wait_for(lambda: live.stats()["queued"] == 1, 10)
        r = requests.post(live.url + "/v1/chat/completions", json={"messages": user(), "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert "busy" in r.json()["error"]["message"]
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="m", messages=user(), max_tokens=2)
        assert e.value.status_code == 503
        waiting.close()  # a queued client leaves: its place is free for the next one
        _wait_for(lambda: live.stats()["queued"] == 0 or live.stats()["cancelled"] >= 1, 5)
        third = _raw_post(live.port, body)
        _wait_for(lambda: live.stats()["queued"] == 1, 10)
        running.close()
        third.close()
        wait_idle(live, timeout=5)
        r = requests.post(live.url + "/v1/chat/completions", json={"messages": user(), "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
        assert live.stats()["rejected"] == 2
    finally:
        live.close()


def test_body_size_limit_and_slow_body_timeout(tokenizer):
    """A body over the limit is a 413 (from its Content-Length, before it is read, and while
    reading a chunked one); a client that announces more bytes than it sends gets a 408 after the
    body timeout and the connection is closed: it cannot hold a connection forever."""
    live = LiveServer(create_app(make_model(tokenizer.get_vocab_size(), sequence_len=64), tokenizer,
                                 max_body_bytes=10_000, body_timeout=1.0))
    try:
        big = json.dumps({"messages": user("x" * 20_000)})
        r = requests.post(live.url + "/v1/chat/completions", data=big, timeout=10,
                          headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "too large" in r.json()["error"]["message"]
        r = requests.post(live.url + "/chat/completions", data=iter([big[:6000].encode(), big[6000:].encode()]),
                          timeout=10, headers={"Content-Type": "application/json"})  # chunked: no Content-Length
        assert r.status_code == 413
        sock = socket.create_connection(("127.0.0.1", live.port), timeout=10)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5000\r\n\r\n{\"messages\": ")
        t0 = time.time()
        reply = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break  # the server closed the connection
            reply += chunk
        sock.close()
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert 0.9 < time.time() - t0 < 8
        assert requests.get(live.url + "/health", timeout=10).status_code == 200
    finally:
        live.close()


def _chunked(data, size=65536):
    parts = [data[i:i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in parts) + b"0\r\n\r\n"


def test_a_chunked_body_over_the_default_limit_gets_its_413(tokenizer):
    """2 MiB sent chunked (and with a Content-Length) to a server with the default 1 MiB limit:
    the client reads the whole 413, never a connection reset (the server reads and drops the rest
    before it answers and closes)."""
    live = LiveServer(create_app(make_model(tokenizer.get_vocab_size(), sequence_len=64), tokenizer))
    try:
        big = json.dumps({"messages": user("x" * (2 << 20))}).encode()
        head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        for path in (b"/v1/chat/completions", b"/chat/completions"):
            for framing, body in ((b"Transfer-Encoding: chunked", _chunked(big)),
                                  (b"Content-Length: %d" % len(big), big)):
                sock = socket.create_connection(("127.0.0.1", live.port), timeout=30)
                try:
                    sock.sendall(head % path + framing + b"\r\n\r\n" + body)
                    reply = b""
                    while chunk := sock.recv(65536):
                        reply += chunk
                finally:
                    sock.close()
                status, _, rest = reply.partition(b"\r\n")
                assert status.startswith(b"HTTP/1.1 413"), status
                assert b"too large" in rest.partition(b"\r\n\r\n")[2]
        assert requests.get(live.url + "/health", timeout=10).status_code == 200
    finally:
        live.close()


BAD = [
    ("malformed JSON", b'{"messages": [', "malformed JSON"),
    ("not an object", [1, 2], "JSON object"),
    ("no messages", {}, "non-empty list"),
    ("empty messages", {"messages": []}, "non-empty list"),
    ("too many messages", {"messages": (user("a") + [{"role": "assistant", "content": "b"}]) * (MAX_MESSAGES // 2)
                           + user("a") * 2}, "too many messages"),
    ("message too long", {"messages": user("x" * 8001)}, "too long"),
    ("conversation too long", {"messages": (user("x" * 7000) + [{"role": "assistant", "content": "y" * 7000}]) * 2
                               + user("z" * 7000)}, "conversation too long"),
    ("too many tokens", {"messages": user("word " * 1500)}, "the model's context"),
    ("bad role", {"messages": [{"role": "tool", "content": "x"}]}, "role"),
    ("assistant first", {"messages": [{"role": "assistant", "content": "x"}] + user()}, "alternating"),
    ("two users", {"messages": user() + user()}, "alternating"),
    ("ends with assistant", {"messages": user() + [{"role": "assistant", "content": "x"}]}, "last message"),
    ("system not first", {"messages": user() + [{"role": "system", "content": "x"}] + user()}, "alternating"),
    ("system alone", {"messages": [{"role": "system", "content": "x"}]}, "followed by a user"),
    ("content not a string", {"messages": [{"role": "user", "content": 5}]}, "content"),
    ("temperature low", {"messages": user(), "temperature": -0.1}, "temperature"),
    ("temperature high", {"messages": user(), "temperature": 2.5}, "temperature"),
    ("temperature string", {"messages": user(), "temperature": "hot"}, "temperature"),
    ("top_k low", {"messages": user(), "top_k": -1}, "top_k"),
    ("top_k high", {"messages": user(), "top_k": 201}, "top_k"),
    ("top_k fraction", {"messages": user(), "top_k": 1.5}, "top_k"),
    ("max_tokens zero", {"messages": user(), "max_tokens": 0}, "max_tokens"),
    ("max_tokens high", {"messages": user(), "max_tokens": 4097}, "max_tokens"),
    ("stream not bool", {"messages": user(), "stream": "yes"}, "stream"),
    # used to be 500s: RecursionError in the JSON parser, OverflowError in float(int)
    ("nested too deeply", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ("max_tokens huge", {"messages": user(), "max_tokens": 10 ** 400}, "max_tokens"),
    ("top_k huge", {"messages": user(), "top_k": -10 ** 400}, "top_k"),
    ("seed huge", {"messages": user(), "seed": 10 ** 400}, "seed"),
    ("max_completion_tokens huge", {"messages": user(), "max_completion_tokens": 10 ** 309}, "max_completion_tokens"),
    ("temperature NaN", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    ("max_tokens infinite", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": Infinity}', "max_tokens"),
    # a field that is present is checked even when another one decides the value
    ("max_completion_tokens NaN beside max_tokens",
     b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "max_completion_tokens": NaN}',
     "max_completion_tokens"),
    ("max_completion_tokens string beside max_tokens", {"messages": user(), "max_tokens": 5,
                                                        "max_completion_tokens": "many"}, "max_completion_tokens"),
    ("include_usage NaN", b'{"messages": [{"role": "user", "content": "hi"}], "stream": true, '
                          b'"stream_options": {"include_usage": NaN}}', "include_usage"),
    ("include_usage string", {"messages": user(), "stream": True, "stream_options": {"include_usage": "no"}},
     "include_usage"),
    ("n true", {"messages": user(), "n": True}, "n=1"),
    ("n float", {"messages": user(), "n": 1.0}, "n=1"),
    ("n two", {"messages": user(), "n": 2}, "n=1"),
    ("int too long to parse", b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}",
     "malformed JSON"),
]


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_limits_answer_400_json(server, path):
    for name, body, needle in BAD:
        kwargs = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body}
        r = requests.post(server.url + path, timeout=30, **kwargs)
        assert r.status_code == 400, (name, r.status_code, r.text[:200])
        err = r.json()["error"]
        assert needle in err["message"], (name, err)
    # the edges of each range are accepted
    ok = {"messages": user(), "temperature": 2.0, "top_k": 200, "max_tokens": 1}
    assert requests.post(server.url + path, json=ok, timeout=60).status_code == 200
    ok = {"messages": user(), "temperature": 0, "top_k": 0, "max_tokens": 4096}  # capped to the context
    assert requests.post(server.url + path, json=ok, timeout=60).status_code == 200


def test_head_requests(server):
    for path in ("/", "/health"):
        r = requests.head(server.url + path, timeout=10)
        assert r.status_code == 200, (path, r.status_code)
        assert r.content == b""


def test_tiny_temperature_and_top_p_are_served_as_greedy(server):
    """temperature 1e-300 / top_p 1e-300 pass validation (they are in range) and are honoured:
    the reply is the greedy one. They used to underflow to NaN in float32 and fail the batch."""
    body = {"messages": user("Tell me a story"), "max_tokens": 10}
    greedy = requests.post(server.url + "/v1/chat/completions", json={**body, "temperature": 0}, timeout=60)
    assert greedy.status_code == 200, greedy.text
    for extra in ({"temperature": 1e-300}, {"temperature": 4e-39, "top_k": 0}, {"temperature": 1.0, "top_p": 1e-300}):
        r = requests.post(server.url + "/v1/chat/completions", json={**body, **extra}, timeout=60)
        assert r.status_code == 200, (extra, r.text)
        assert r.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"]


def test_a_failing_row_ends_only_its_own_request(tokenizer):
    """Three streams decode together; a fourth request reaches a position whose logits are NaN
    (a row that cannot be sampled). Only that request ends, with an error; the three others
    finish normally. (The scheduler used to fail every stream of the batch.)"""
    from test_engine import Poisoned
    long_messages = user("word " * 60)
    poison_at = len(tokenizer.render_for_completion({"messages": long_messages})) + 2
    model = Poisoned(make_model(tokenizer.get_vocab_size(), sequence_len=256), poison_at)
    live = LiveServer(create_app(model, tokenizer, max_batch=4, token_delay=0.01))
    results = {}

    def stream(name, messages, **extra):
        body = {"messages": messages, "max_tokens": 30, "temperature": 1.0, "stream": True, **extra}
        with requests.post(live.url + "/v1/chat/completions", json=body, stream=True, timeout=60) as r:
            results[name] = sse_events(r)
    try:
        threads = [threading.Thread(target=stream, args=(f"ok{i}", user(f"Hi {i}")), kwargs={"top_k": 0})
                   for i in range(3)]
        for t in threads:
            t.start()
        _wait_for(lambda: live.stats()["total_requests"] >= 3, 20)  # the three are in when the bad one joins
        stream("bad", long_messages)
        for t in threads:
            t.join(timeout=60)
        bad = results.pop("bad")
        assert bad[-1] == "[DONE]" and "error" in bad[-2] and "NaN" in bad[-2]["error"]["message"]
        for name, events in results.items():
            assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), (name, events[-3:])
            assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length"), name
        stats = live.stats()
        assert stats["failed"] == 1 and stats["completed"] == 3
    finally:
        live.close()


class ExplodingPrefill(Wrapped):
    """The real model, except that a prefill that includes a prompt of exactly `bad_len` tokens
    raises (an error in one request's prefill, e.g. an out-of-memory)."""

    def __init__(self, model, bad_len):
        super().__init__(model)
        self.bad_len = bad_len

    def forward(self, idx, kv_cache=None, kv_len=None, logits_positions=None):
        if (logits_positions[1] + 1 == self.bad_len).any():  # a decode step's positions are all 0
            raise RuntimeError("simulated failure in this prompt's prefill")
        return self.inner(idx, kv_cache=kv_cache, kv_len=kv_len, logits_positions=logits_positions)


def test_a_failing_prefill_ends_only_its_own_request(tokenizer):
    """A request whose prefill fails is answered with an error; the request already decoding and
    one admitted at the same time finish normally (they used to fail with it)."""
    bad = user("word " * 40)
    model = ExplodingPrefill(make_model(tokenizer.get_vocab_size(), sequence_len=256),
                             len(tokenizer.render_for_completion({"messages": bad})))
    live = LiveServer(create_app(model, tokenizer, max_batch=3, token_delay=0.01))
    out = {}

    def ask(name, messages, max_tokens):
        r = requests.post(live.url + "/v1/chat/completions", timeout=60,
                          json={"messages": messages, "max_tokens": max_tokens, "temperature": 0})
        out[name] = r
    try:
        running = threading.Thread(target=ask, args=("running", user("Hi"), 40))
        running.start()
        _wait_for(lambda: live.stats()["active"] == 1, 10)
        pair = [threading.Thread(target=ask, args=("bad", bad, 5)), threading.Thread(target=ask, args=("ok", user("Yo"), 5))]
        for t in pair:
            t.start()
        for t in pair + [running]:
            t.join(timeout=60)
        assert out["bad"].status_code == 500 and "simulated failure" in out["bad"].json()["error"]["message"]
        for name in ("running", "ok"):
            assert out[name].status_code == 200, (name, out[name].text)
        assert live.stats()["failed"] == 1
    finally:
        live.close()


def test_openai_client_sees_400(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="nanochat-test", messages=user(), temperature=3.0)
    assert "temperature" in str(e.value)


# ---------------------------------------------------------------------------
# UTF-8: characters split across tokens are never sent broken

TRICKY = "héllo 🙂 wörld — 日本語 👩‍💻!"


def test_text_stream_holds_back_partial_characters(tokenizer):
    ids = tokenizer.encode(TRICKY)
    # the small test vocabulary splits these characters over several tokens
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    stream = TextStream(tokenizer)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == TRICKY


def test_streaming_is_utf8_safe_end_to_end(tokenizer):
    messages = user("emoji please")
    prompt = tokenizer.render_for_completion({"messages": messages})
    script = tokenizer.encode(TRICKY) + [tokenizer.encode_special("<|assistant_end|>")]
    model = Scripted(make_model(tokenizer.get_vocab_size(), sequence_len=128), len(prompt), script)
    live = LiveServer(create_app(model, tokenizer, max_batch=2))
    try:
        with requests.post(live.url + "/chat/completions", json={"messages": messages, "temperature": 0},
                           stream=True, timeout=60) as r:
            events = sse_events(r)  # decodes every event strictly
        pieces = [e["token"] for e in events if "token" in e]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == TRICKY and events[-1]["finish_reason"] == "stop"
        with requests.post(live.url + "/v1/chat/completions", json={"messages": messages, "stream": True},
                           stream=True, timeout=60) as r:
            events = sse_events(r)
        pieces = [e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"]]
        assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == TRICKY
        r = requests.post(live.url + "/v1/chat/completions", json={"messages": messages}, timeout=60)
        assert r.json()["choices"][0]["message"]["content"] == TRICKY
        assert r.json()["choices"][0]["finish_reason"] == "stop"
    finally:
        live.close()


@pytest.mark.slow
def test_compiled_server_answers_like_eager(tokenizer):
    """create_app(compile=True): the scheduler compiles every row bucket before the first
    request (/health says ready), then answers greedy requests, concurrent ones included,
    exactly like the eager server."""
    from torch._dynamo.utils import counters
    model = make_model(tokenizer.get_vocab_size(), seed=5, sequence_len=96)
    questions = ["Hello!", "What is 2+2?", "Tell me a story"]

    def answers(live):
        out = {}

        def ask(q):
            r = requests.post(live.url + "/v1/chat/completions", timeout=300,
                              json={"messages": user(q), "max_tokens": 12, "temperature": 0})
            out[q] = r.json()["choices"][0]["message"]["content"]
        threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    live = LiveServer(create_app(model, tokenizer, max_batch=2))
    try:
        eager = answers(live)
    finally:
        live.close()
    before = counters["stats"]["unique_graphs"]
    live = LiveServer(create_app(model, tokenizer, max_batch=2, compile=True))
    try:
        deadline = time.time() + 600
        while not requests.get(live.url + "/health", timeout=10).json()["ready"]:
            assert time.time() < deadline, "the compiled server never became ready"
            time.sleep(0.5)
        assert live.stats()["compiled"] is True
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= before + 2  # buckets 1 and 2 were compiled before the first request
        assert answers(live) == eager
        assert counters["stats"]["unique_graphs"] == graphs  # warmup() compiled every bucket already
    finally:
        live.close()


def test_serve_command(tokenizer):
    """`nanochat serve` as a user starts it, on a saved checkpoint (the default source search
    finds sft)."""
    import dataclasses
    import os
    import subprocess
    import sys

    from nanochat.checkpoint import checkpoint_dir, save_checkpoint
    model = make_model(tokenizer.get_vocab_size(), seed=9, sequence_len=128)
    save_checkpoint(checkpoint_dir("sft", "d2serve"), 3, model.state_dict(), None,
                    {"model_config": dataclasses.asdict(model.config)})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nanochat", "serve", "--port", str(port), "--model-tag", "d2serve",
                             "--max-batch", "3"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "NANOCHAT_API_KEY": "env-key"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, "nanochat serve did not come up"
            time.sleep(0.3)
        assert requests.get(url + "/health", timeout=10).json()["max_batch"] == 3
        assert requests.get(url + "/v1/models", timeout=10).status_code == 401  # the key from the environment
        auth = {"Authorization": "Bearer env-key"}
        assert requests.get(url + "/v1/models", headers=auth, timeout=10).json()["data"][0]["id"] == "nanochat-sft"
        r = requests.post(url + "/v1/chat/completions", json={"messages": user(), "max_tokens": 4}, headers=auth,
                          timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # default CPU threads: one fewer than the cores, so the HTTP side keeps one
    threads = max(1, (os.cpu_count() or 1) - 1)
    out = proc.stdout.read()
    assert f"with up to 3 requests per batch, {threads} CPU threads, API key required" in out
    assert "warning" not in out


def test_serve_rejects_bad_threads(capsys):
    from nanochat import cli
    assert cli.main(["serve", "--threads", "0"]) == 1
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_api_key(tokenizer):
    """create_app(api_key=...): /v1/* and the chat endpoints answer 401 (OpenAI's error shape,
    which the official client raises as AuthenticationError) without `Authorization: Bearer KEY`
    or with a wrong key; the page, /health and /metrics stay open."""
    import openai
    live = LiveServer(create_app(make_model(tokenizer.get_vocab_size(), sequence_len=64), tokenizer,
                                 api_key="s3cret-key"))
    try:
        body = {"messages": user(), "max_tokens": 3}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "s3cret"}, {"Authorization": "Bearer s3cret"}):
            for method, path in (("get", "/v1/models"), ("post", "/v1/chat/completions"),
                                 ("post", "/chat/completions"), ("get", "/stats")):
                r = requests.request(method, live.url + path, json=body, headers=headers, timeout=10)
                assert r.status_code == 401, (headers, path)
                assert r.json()["error"]["type"] == "authentication_error"
                assert r.headers["www-authenticate"] == "Bearer"
        for path in ("/", "/health", "/metrics"):
            assert requests.get(live.url + path, timeout=10).status_code == 200, path
        good = {"Authorization": "Bearer s3cret-key"}
        assert requests.get(live.url + "/v1/models", headers=good, timeout=10).status_code == 200
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret-key", max_retries=0)
        r = client.chat.completions.create(model="x", messages=user(), max_tokens=3)
        assert r.usage.completion_tokens <= 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        live.close()


def test_key_matches():
    assert key_matches("Bearer k3y", "k3y") and key_matches("bearer  k3y ", "k3y")
    # header values reach the app as latin-1 text of the bytes sent: a UTF-8 key still matches
    assert key_matches("Bearer " + "ключ".encode().decode("latin-1"), "ключ")
    for header in (None, "", "Bearer", "Bearer k3", "Bearer k3yy", "Basic k3y", "k3y", "Bearer K3Y"):
        assert not key_matches(header, "k3y"), header
    with pytest.raises(ValueError):
        create_app(make_model(64, sequence_len=16), None, api_key=" ")


def test_serve_warns_when_reachable_without_a_key(capsys, monkeypatch):
    """Binding beyond loopback without a key says so on stderr, before the model loads (here
    the model is missing, so the command then fails); a key, or a loopback address, silences it."""
    from nanochat import cli
    from nanochat.stages.serve import is_loopback
    monkeypatch.delenv("NANOCHAT_API_KEY", raising=False)
    for host, key, warned in (("0.0.0.0", None, True), ("192.168.1.5", None, True), ("0.0.0.0", "k", False),
                              ("127.0.0.1", None, False), ("::1", None, False), ("localhost", None, False)):
        argv = ["serve", "--host", host, "--model-tag", "no-such-model"] + (["--api-key", key] if key else [])
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert ("without an API key" in err) == warned, (host, key, err)
    assert not is_loopback("example.org") and is_loopback("127.0.0.2") and is_loopback("[::1]")
    monkeypatch.setenv("NANOCHAT_API_KEY", "from-env")
    assert cli.main(["serve", "--host", "0.0.0.0", "--model-tag", "no-such-model"]) == 1
    assert "without an API key" not in capsys.readouterr().err


def scrape(live):
    """{sample name: {frozenset(labels): value}} from GET /metrics, parsed by prometheus_client's
    own parser (what a Prometheus server would read)."""
    from prometheus_client.parser import text_string_to_metric_families
    r = requests.get(live.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def test_prometheus_metrics(tokenizer):
    """/metrics in vLLM's names: requests running and waiting, KV rows in use, prompt and
    generated tokens, time to first token, time per output token and end-to-end latency
    (histograms), finished requests by reason, and requests refused with 503."""
    live = LiveServer(create_app(make_model(tokenizer.get_vocab_size(), sequence_len=256), tokenizer, max_batch=2,
                                 max_queue=0, model_name="m", token_delay=0.02))
    me = frozenset({("model_name", "m")})
    try:
        first = scrape(live)
        assert first["vllm:num_requests_running"][me] == 0 and first["vllm:num_requests_waiting"][me] == 0
        assert first["vllm:generation_tokens_total"][me] == 0
        assert first["vllm:time_to_first_token_seconds_count"][me] == 0
        usages = []
        for text in ("Hello!", "What is 2+2?"):
            r = requests.post(live.url + "/v1/chat/completions", timeout=60,
                              json={"messages": user(text), "max_tokens": 6, "temperature": 0})
            usages.append(r.json()["usage"])
        m = scrape(live)
        assert m["vllm:prompt_tokens_total"][me] == sum(u["prompt_tokens"] for u in usages)
        assert m["vllm:generation_tokens_total"][me] == sum(u["completion_tokens"] for u in usages)
        assert m["vllm:time_to_first_token_seconds_count"][me] == 2
        assert m["vllm:e2e_request_latency_seconds_count"][me] == 2
        assert m["vllm:time_per_output_token_seconds_count"][me] == 2
        assert 0 < m["vllm:time_to_first_token_seconds_sum"][me] <= m["vllm:e2e_request_latency_seconds_sum"][me]
        bucket = frozenset({("model_name", "m"), ("le", "+Inf")})
        assert m["vllm:e2e_request_latency_seconds_bucket"][bucket] == 2
        done = sum(v for k, v in m["vllm:request_success_total"].items() if ("finished_reason", "length") in k
                   or ("finished_reason", "stop") in k)
        assert done == 2

        # both rows busy: a third request is refused (max_queue=0) and counted
        slow = [threading.Thread(target=requests.post, args=(live.url + "/v1/chat/completions",),
                                 kwargs={"json": {"messages": user(f"story {i}"), "max_tokens": 60}, "timeout": 60})
                for i in range(2)]
        for t in slow:
            t.start()
        _wait_for(lambda: live.stats()["active"] == 2, 20)
        busy = scrape(live)
        assert busy["vllm:num_requests_running"][me] == 2 and busy["vllm:kv_cache_usage_perc"][me] == 1.0
        assert busy["nanochat:kv_cache_rows"][frozenset({("model_name", "m"), ("state", "free")})] == 0
        r = requests.post(live.url + "/v1/chat/completions", json={"messages": user(), "max_tokens": 2}, timeout=10)
        assert r.status_code == 503
        for t in slow:
            t.join()
        m = scrape(live)
        assert m["nanochat:requests_rejected_total"][frozenset({("model_name", "m"), ("status", "503")})] == 1
        assert m["vllm:num_requests_running"][me] == 0
        assert m["vllm:e2e_request_latency_seconds_count"][me] == 4
    finally:
        live.close()
