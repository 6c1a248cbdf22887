"""The chat page in headless Chromium (Debian's chromium through Playwright): send a message and
see the reply stream in, stop it, regenerate it, edit a message, slash commands, reload keeps the
conversation, the API key dialog, model output is shown as text (no HTML injection, a corpus of
crafted replies and every prefix of them), and markdown, tables, links, highlighted code and
LaTeX render from the vendored libraries with no request leaving the server."""
import os
import time

import pytest
from playwright import sync_api

from helpers import LiveServer, Scripted, make_model
from nanochat.server import create_app

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

INJECTION = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
FILLER = " ".join(f"word{i}" for i in range(60))
REPLY = f"Hi! {INJECTION} **bold** and `code`\n\n- one\n- two\n\n```python\nprint(1 < 2)\n```\n{FILLER} THE END"


@pytest.fixture(scope="module")
def ui_server(tokenizer):
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})
    script = tokenizer.encode(REPLY) + [tokenizer.encode_special("<|assistant_end|>")]
    model = Scripted(make_model(tokenizer.get_vocab_size(), sequence_len=1024), len(prompt), script)
    # 15 ms per token: a full reply takes a few seconds, long enough to press stop in the middle
    live = LiveServer(create_app(model, tokenizer, max_batch=2, token_delay=0.015))
    yield live
    live.close()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def assistant_text(page):
    return page.locator(".msg.assistant .content").last.inner_text()


def wait_idle(page, timeout=30_000):
    page.wait_for_function("!document.body.classList.contains('busy')", timeout=timeout)


def test_chat_page(ui_server, browser, tmp_path):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(ui_server.url + "/")
    assert page.title() == "nanochat"

    # send: the reply streams in (the stop button shows while it does)
    page.fill("#input", "hi")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.user")
    assert page.locator(".msg.user").inner_text().strip().endswith("hi")
    page.wait_for_function("document.querySelector('.msg.assistant strong') !== null", timeout=30_000)
    assert page.is_visible("#stop") and not page.is_visible("#send")
    first = assistant_text(page)
    page.wait_for_function(f"document.querySelector('.msg.assistant .content').innerText.length > {len(first)}")
    page.wait_for_function("document.querySelector('.msg.assistant pre') !== null", timeout=30_000)

    # model output is text, never markup
    text = assistant_text(page)
    assert INJECTION in text
    assert page.locator("#messages img, #messages script").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert page.locator(".msg.assistant strong").first.inner_text() == "bold"
    assert page.locator(".msg.assistant li").count() == 2

    # stop in the middle: the partial reply stays and stops growing; the server frees the row
    page.click("#stop")
    wait_idle(page)
    stopped = assistant_text(page)
    time.sleep(0.5)
    assert assistant_text(page) == stopped and "THE END" not in stopped and stopped
    deadline = time.time() + 10
    while ui_server.stats()["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert ui_server.stats()["active"] == 0

    # regenerate: the same single reply is replaced by a full one
    page.click(".msg.assistant .regen")
    page.wait_for_function("document.body.classList.contains('busy')", timeout=10_000)
    wait_idle(page)
    assert page.locator(".msg.assistant").count() == 1
    full = assistant_text(page)
    assert full.rstrip().endswith("THE END")
    assert page.locator(".msg.assistant pre code").inner_text().rstrip("\n") == "print(1 < 2)"
    page.screenshot(path=str(tmp_path / "chat.png"))
    if os.environ.get("NANOCHAT_UI_SCREENSHOT"):
        page.screenshot(path=os.environ["NANOCHAT_UI_SCREENSHOT"])

    # reload: the conversation is still there (localStorage)
    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert page.locator(".msg.user").count() == 1
    assert assistant_text(page).rstrip().endswith("THE END")

    # slash commands
    page.fill("#input", "/temperature 0.3")
    page.press("#input", "Enter")
    assert "temperature 0.3" in page.inner_text("#settings")
    page.fill("#input", "/topk 7")
    page.press("#input", "Enter")
    assert "top-k 7" in page.inner_text("#settings")
    page.fill("#input", "/temperature 9")
    page.press("#input", "Enter")
    assert page.locator(".msg.error").count() == 1 and "temperature 0.3" in page.inner_text("#settings")
    page.fill("#input", "/help")
    page.press("#input", "Enter")
    assert "/clear" in page.locator(".msg.system").last.inner_text()

    # edit the user message and resend: everything after it is replaced
    page.click(".msg.user")
    page.fill(".msg.user textarea", "hi")
    page.click(".msg.user .resend")
    page.wait_for_function("document.body.classList.contains('busy')", timeout=10_000)
    wait_idle(page)
    assert page.locator(".msg.user").count() == 1 and page.locator(".msg.assistant").count() == 1
    assert assistant_text(page).rstrip().endswith("THE END")

    # /clear starts a new empty conversation; the old one stays in the sidebar
    page.fill("#input", "/clear")
    page.press("#input", "Enter")
    assert page.locator(".msg.user").count() == 0 and page.locator("#sidebar .conv").count() == 2
    page.reload()
    assert "temperature 0.3" in page.inner_text("#settings")  # settings persist too
    page.locator("#sidebar .conv", has_text="hi").click()
    assert page.locator(".msg.assistant").count() == 1
    assert not errors, errors
    context.close()


def test_phone_width(ui_server, browser, tmp_path):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(ui_server.url + "/")
    page.fill("#input", "hi")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelector('.msg.assistant strong') !== null", timeout=30_000)
    page.click("#stop")
    wait_idle(page)
    # nothing wider than the screen: no horizontal scrolling of the page
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.locator("#sidebar").bounding_box()["x"] < 0  # the sidebar is tucked away
    box = page.locator("#input").bounding_box()
    assert box["width"] > 200 and box["x"] + box["width"] <= 390
    page.screenshot(path=str(tmp_path / "phone.png"))
    if os.environ.get("NANOCHAT_UI_SCREENSHOT"):
        page.screenshot(path=os.environ["NANOCHAT_UI_SCREENSHOT"].replace(".png", "_phone.png"))
    context.close()


def test_api_key_asked_once_and_kept(tokenizer, browser):
    """A server started with an API key: the first message makes the page ask for the key; a
    wrong one is refused and asked again; the right one is kept, so after a reload the page
    talks to the server without asking."""
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})
    script = tokenizer.encode("Hello there") + [tokenizer.encode_special("<|assistant_end|>")]
    model = Scripted(make_model(tokenizer.get_vocab_size(), sequence_len=256), len(prompt), script)
    live = LiveServer(create_app(model, tokenizer, max_batch=2, api_key="open-sesame"))
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(live.url + "/")  # the page itself is open
        page.fill("#input", "hi")
        page.press("#input", "Enter")
        page.wait_for_selector("#key-dialog[open]")
        assert "needs an API key" in page.inner_text("#key-msg")
        page.fill("#key-input", "wrong")
        page.click("#key-save")
        page.wait_for_function("document.getElementById('key-msg').innerText.includes('refused')")
        assert page.is_visible("#key-dialog")
        page.fill("#key-input", "open-sesame")
        page.press("#key-input", "Enter")
        wait_idle(page)
        assert assistant_text(page).strip() == "Hello there"
        assert not page.is_visible("#key-dialog")
        page.reload()
        page.fill("#input", "hi")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2", timeout=30_000)
        wait_idle(page)
        assert not page.is_visible("#key-dialog")
        assert page.locator(".msg.error").count() == 0
        # /key forgets it: the next message asks again, and cancelling says why nothing came back
        page.fill("#input", "/key")
        page.press("#input", "Enter")
        page.fill("#input", "hi")
        page.press("#input", "Enter")
        page.wait_for_selector("#key-dialog[open]")
        page.click("#key-cancel")
        wait_idle(page)
        assert "needs an API key" in page.locator(".msg.error").last.inner_text()
    finally:
        context.close()
        live.close()



def scripted_server(tokenizer, reply, **kwargs):
    """A live server whose model answers "hi" with exactly `reply`."""
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})
    script = tokenizer.encode(reply) + [tokenizer.encode_special("<|assistant_end|>")]
    model = Scripted(make_model(tokenizer.get_vocab_size(), sequence_len=2048), len(prompt), script)
    return LiveServer(create_app(model, tokenizer, max_batch=2, **kwargs))


def offline_page(context, server):
    """A page whose every request must go to `server`: anything else is aborted and recorded."""
    page = context.new_page()
    outside = []

    def route(r):
        if r.request.url.startswith(server.url + "/"):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()
    page.route("**/*", route)
    return page, outside


# Replies a hostile model (or a prompt injection) could produce. Rendered, none may run code,
# load anything, or leave an event handler or a javascript:/data: link behind.
CRAFTED = [
    INJECTION,
    "[click](javascript:window.__pwned=3)",
    "[click](JaVaScRiPt:window.__pwned=4)",
    "[click](  javascript:window.__pwned=5)",
    "[click](&#106;avascript:window.__pwned=6)",
    "<javascript:window.__pwned=7>",
    "[x](data:text/html,<script>window.__pwned=8</script>)",
    "![img](javascript:window.__pwned=9)",
    '![img](x" onerror="window.__pwned=10)',
    "<svg onload=window.__pwned=11>",
    '<a href="javascript:window.__pwned=12">a</a>',
    "<iframe src=javascript:window.__pwned=13></iframe>",
    "<style>body{display:none}</style>",
    "<form action=javascript:window.__pwned=14><button>go</button></form>",
    r"$\href{javascript:window.__pwned=15}{x}$",
    r"$$\href{javascript:window.__pwned=16}{x}$$",
    r"$\htmlId{x}{y}\htmlStyle{color:red}{z}$",
    r"\(\url{javascript:window.__pwned=17}\)",
    "```html\n<script>window.__pwned=18</script>\n```",
    "`<img src=x onerror=window.__pwned=19>`",
    "| a | b |\n|---|---|\n| <img src=x onerror=window.__pwned=20> | [l](javascript:window.__pwned=21) |",
    "[ref]\n\n[ref]: javascript:window.__pwned=22",
    "<details open ontoggle=window.__pwned=23>",
    "\u0000<script>window.__pwned=24</script>\u0000",
]

CHECK_INERT = """
(texts) => {
  const bad = [];
  const host = document.createElement("div");
  host.className = "msg assistant";
  document.getElementById("messages").append(host);
  for (const text of texts) {
    // every prefix too: this is what the page shows while a reply streams in
    for (let n = 1; n <= text.length; n++) {
      host.innerHTML = renderMarkdown(text.slice(0, n));
      for (const el of host.querySelectorAll("*")) {
        const tag = el.tagName.toLowerCase();
        if (["script", "iframe", "object", "embed", "form", "style", "link", "meta", "base"].includes(tag))
          bad.push([text, n, tag]);
        for (const a of el.attributes) {
          const v = a.value.replace(/[\\s\\u0000-\\u001f]/g, "").toLowerCase();
          if (a.name.startsWith("on")) bad.push([text, n, tag + " " + a.name]);
          if (/^(javascript|vbscript|data):/.test(v) && a.name !== "class") bad.push([text, n, tag + " " + a.name + "=" + v]);
        }
        if (tag === "a" && el.getAttribute("target") === "_blank" && !/noopener/.test(el.getAttribute("rel") || ""))
          bad.push([text, n, "target without noopener"]);
      }
    }
  }
  host.remove();
  return bad;
}
"""


def test_crafted_replies_stay_inert(ui_server, browser):
    """The page's renderer (markdown-it, texmath/KaTeX, highlight.js, then DOMPurify) on every
    crafted reply and on every prefix of each (as it streams in): no script, no frame, no event
    handler, no javascript:/data: URL, no link without rel=noopener; nothing ran."""
    context = browser.new_context()
    page, outside = offline_page(context, ui_server)
    page.goto(ui_server.url + "/")
    bad = page.evaluate(CHECK_INERT, CRAFTED)
    assert bad == [], bad[:10]
    page.wait_for_timeout(300)  # an onerror/onload would have fired by now
    assert page.evaluate("window.__pwned") is None
    assert outside == [], outside
    # the check itself sees an unsafe renderer (raw HTML in, raw HTML out)
    page.evaluate("renderMarkdown = (t) => t")
    assert len(page.evaluate(CHECK_INERT, CRAFTED[:3])) > 3
    context.close()


def test_nul_characters_do_not_garble_code_spans(tokenizer, browser):
    """The previous renderer marked code spans with NUL-delimited numbers, so a reply holding
    "\\u00000\\u0000" got the first code span pasted in there. markdown-it replaces NUL with U+FFFD."""
    live = scripted_server(tokenizer, "Use `alpha` here and \u00000\u0000 there, then `beta`.")
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(live.url + "/")
        page.fill("#input", "hi")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant .content")
        wait_idle(page)
        codes = page.locator(".msg.assistant code").all_inner_texts()
        assert codes == ["alpha", "beta"]
        assert assistant_text(page).count("alpha") == 1
    finally:
        context.close()
        live.close()


RICH = r"""## Results

| model | score |
|---|---|
| d20 | **0.22** |
| d26 | 0.25 |

See [the docs](https://example.org/docs) for more.

```python
def area(r):
    return 3.14159 * r ** 2
```

The area is $A = \pi r^2$, and

$$\int_0^1 x^2 \, dx = \frac{1}{3}$$

THE END"""


def test_rich_markdown_renders(tokenizer, browser, tmp_path):
    """A streamed reply with a table, a link, a fenced Python block and LaTeX, in Chromium with
    every request outside the server refused: the table has its header, the link opens in a new
    tab with rel=noopener, the code is highlighted (coloured pixels in a screenshot of it), the
    math is KaTeX's (its own fonts loaded from the server), nothing was fetched from elsewhere."""
    import matplotlib.image
    live = scripted_server(tokenizer, RICH)
    context = browser.new_context(viewport={"width": 1000, "height": 1200})
    try:
        page, outside = offline_page(context, live)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(live.url + "/")
        page.fill("#input", "hi")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant .content")
        wait_idle(page)
        msg = page.locator(".msg.assistant").last
        assert msg.locator("table th").all_inner_texts() == ["model", "score"]
        assert msg.locator("table tbody tr").count() == 2
        link = msg.locator("a", has_text="the docs")
        assert link.get_attribute("href") == "https://example.org/docs"
        assert link.get_attribute("target") == "_blank" and "noopener" in link.get_attribute("rel")
        assert msg.locator("pre code .hljs-keyword").count() >= 2  # def, return
        assert msg.locator(".katex").count() == 2 and msg.locator(".katex-display").count() == 1
        assert "πr" in msg.locator(".katex").first.inner_text().replace("\n", "")
        page.evaluate("document.fonts.ready")
        loaded = page.evaluate("[...document.fonts].filter(f => f.status === 'loaded').map(f => f.family)")
        assert any("KaTeX_Main" in f for f in loaded), loaded
        assert outside == [] and errors == [], (outside, errors)

        shot = tmp_path / "rich.png"
        msg.screenshot(path=str(shot))
        if os.environ.get("NANOCHAT_UI_SCREENSHOT"):
            msg.screenshot(path=os.environ["NANOCHAT_UI_SCREENSHOT"].replace(".png", "_markdown.png"))
        code_png = tmp_path / "code.png"
        msg.locator("pre").screenshot(path=str(code_png))
        rgb = matplotlib.image.imread(str(code_png))[..., :3]
        coloured = ((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25).sum()
        assert coloured > 50, coloured  # grey text would have none
        math_png = tmp_path / "math.png"
        msg.locator(".katex-display").screenshot(path=str(math_png))
        ink = (matplotlib.image.imread(str(math_png))[..., :3].mean(axis=-1) < 0.5).sum()
        assert ink > 100, ink  # the formula was drawn
    finally:
        context.close()
        live.close()
