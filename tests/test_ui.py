"""The chat page in headless Chromium (Debian's chromium through Playwright): send a message and
see the reply stream in, stop it, regenerate it, edit a message, slash commands, reload keeps the
conversation, and model output is shown as text (no HTML injection)."""
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
    assert page.locator(".msg.assistant pre code").inner_text() == "print(1 < 2)"
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
