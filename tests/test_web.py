"""The chat page at `/`, driven in headless Chromium against real servers.

    python -m pytest tests/test_web.py -q

Needs Debian's `chromium` (/usr/bin/chromium) and the `playwright` Python package;
Playwright's own browser download is not used. The page talks to the shared
`kaizen serve` process (tests/conftest.py); the rate-limit test starts a second
one with a tiny token bucket, so its 429 is the server's own; the loading test
runs the app in-process without an engine, so its 503 is the server's own too.
Screenshots of a paired answer land in docs/screenshots/.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, Page, Request, expect, sync_playwright

from services.app import build_app
from services.protocol import ErrorInfo, ErrorResponse, dump
from kaizen.core.settings import Settings
from tests.conftest import ROOT, USER_KEY, make_settings, stop_group, wait_http
from tests.test_feedback import outbox

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SHOTS = ROOT / "docs" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
NARROW = {"width": 390, "height": 844}
#: Generous for a 16-token answer, short enough that a hung page fails fast.
ANSWER_TIMEOUT_MS = 30_000


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def limited_server_proc(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen[bytes], Settings]]:
    """A second `kaizen serve` allowing 2 requests per key, then ~1 per 100 s, serving under
    another KAIZEN_SERVED_MODEL_NAME than the default (the page must not hard-code one).

    Autouse at module scope, so it starts loading before the shared server's wait and both engines
    start together (only the rate-limit test waits on it), and stops when this module's tests end.
    """
    settings = make_settings(tmp_path_factory.mktemp("limited-api"), model=tiny_model, api_keys=USER_KEY,
                             rate_limit_rps=0.01, rate_limit_burst=2, served_model_name="acme-assistant")
    with open(settings.data_dir / "serve.log", "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "kaizen", "serve"], env=settings.child_env(), cwd=ROOT,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    yield proc, settings
    stop_group(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        # launch() gives every run a fresh temporary profile (user-data-dir)
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser: Browser, url: str, *, viewport: dict[str, int] = DESKTOP, key: str | None = None,
              color_scheme: Any = "light") -> Page:
    """A page in a fresh context (own localStorage); `key` pre-stored as a returning user's."""
    context = browser.new_context(viewport=viewport, color_scheme=color_scheme)
    if key is not None:
        context.add_init_script(f"localStorage.setItem('kaizen.apiKey', {json.dumps(key)})")
    page = context.new_page()
    page.set_default_timeout(ANSWER_TIMEOUT_MS)
    page.goto(url)
    return page


def chat_requests(page: Page) -> list[dict[str, Any]]:
    """Every POST /v1/chat/completions the page sends, with its headers and JSON body."""
    seen: list[dict[str, Any]] = []

    def on_request(req: Request) -> None:
        if req.method == "POST" and req.url.endswith("/v1/chat/completions"):
            seen.append({"headers": req.headers, "body": req.post_data_json})

    page.on("request", on_request)
    return seen


def send(page: Page, text: str) -> None:
    page.locator("#prompt").fill(text)
    page.locator("#prompt").press("Enter")


def card_boxes(page: Page) -> list[dict[str, float]]:
    """Both cards' boxes in one go (the log may be mid smooth-scroll between two calls)."""
    boxes: list[dict[str, float]] = page.locator(".pair").last.locator(".card").evaluate_all(
        "els => els.map(e => { const r = e.getBoundingClientRect();"
        " return {x: r.x, y: r.y, width: r.width, height: r.height}; })")
    assert len(boxes) == 2, boxes
    return boxes


def pair_texts(page: Page) -> list[str]:
    """The two answers exactly as the model wrote them (each drawn as Markdown keeps its text in data-raw)."""
    texts = page.locator(".pair").last.locator(".card .text").evaluate_all(
        "els => els.map(e => e.dataset.raw)")
    assert len(texts) == 2, texts
    return list(texts)


# -- tests --------------------------------------------------------------------------------------


def test_key_then_streamed_answer(api_server: tuple[str, Settings], browser: Browser) -> None:
    base, _ = api_server
    page = open_page(browser, f"{base}/?compare=off")
    requests = chat_requests(page)
    # no key yet: the server answered 401 to the version probe, so the page asks for one
    expect(page.locator("#settings")).to_be_visible()
    expect(page.locator("#key-hint")).to_contain_text("needs an API key")
    expect(page.locator("#empty")).to_be_visible()

    page.locator("#api-key").fill(USER_KEY)
    page.locator("#api-key").press("Enter")
    expect(page.locator("#model-version")).to_have_text("model v0")
    expect(page.locator("#prompt")).to_be_focused()

    # record every length the streaming answer goes through
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const t = document.querySelector('.msg.assistant .text');
            if (t && t.dataset.raw !== undefined) window.__lengths.push(t.dataset.raw.length);
        }).observe(document.getElementById('log'),
                   {subtree: true, childList: true, characterData: true, attributes: true});
    }""")
    send(page, "Tell me a short story")
    expect(page.locator(".msg.user .bubble")).to_have_text("Tell me a short story")
    answer = page.locator(".msg.assistant[data-done=true] .text")
    expect(answer).to_have_count(1)
    final = answer.get_attribute("data-raw") or ""
    assert final.strip(), "the streamed answer is empty"
    lengths = [n for n in page.evaluate("window.__lengths") if n > 0]
    js_length = len(final.encode("utf-16-le")) // 2  # JavaScript counts UTF-16 units: an emoji is 2
    assert len(set(lengths)) >= 2 and lengths == sorted(lengths) and lengths[-1] == js_length, lengths
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator(".notice")).to_have_count(0)

    body = requests[0]["body"]
    assert requests[0]["headers"]["authorization"] == f"Bearer {USER_KEY}"
    assert body["stream"] is True and body["comparison"] == "off"
    assert body["messages"] == [{"role": "user", "content": "Tell me a short story"}]

    # Shift+Enter is a newline, not a send; the key survives a reload (localStorage)
    page.locator("#prompt").fill("line one")
    page.locator("#prompt").press("Shift+Enter")
    page.locator("#prompt").type("line two")
    assert page.locator("#prompt").input_value() == "line one\nline two"
    assert len(requests) == 1
    page.reload()
    expect(page.locator("#api-key")).to_have_value(USER_KEY)
    expect(page.locator("#model-version")).to_have_text("model v0")
    page.context.close()


def test_pair_vote_by_keyboard(api_server: tuple[str, Settings], browser: Browser) -> None:
    base, settings = api_server
    page = open_page(browser, f"{base}/?compare=force")
    requests = chat_requests(page)
    page.locator("#api-key").fill(USER_KEY)
    page.locator("#api-key").press("Enter")
    send(page, "Which fruit is best?")
    pair = page.locator(".pair[data-ready=true]")
    expect(pair).to_have_count(1)
    cid = pair.get_attribute("data-comparison-id")
    assert cid and cid.startswith("cmp-")
    assert requests[0]["body"]["comparison"] == "force"

    a, b = pair.locator(".card[data-label=A]"), pair.locator(".card[data-label=B]")
    expect(a).to_contain_text("Answer A")
    expect(b).to_contain_text("Answer B")
    box_a, box_b = card_boxes(page)
    assert box_a["x"] + box_a["width"] <= box_b["x"] and abs(box_a["y"] - box_b["y"]) < 2  # side by side
    for label in ("A is better", "B is better", "Tie", "Both are bad"):
        expect(pair.get_by_role("button", name=label)).to_be_visible()
    expect(page.locator(".vote-help")).to_contain_text("both bad")
    shown = pair_texts(page)
    assert all(t.strip() for t in shown), shown
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "chat-desktop.png"))

    # a reason, then Esc out of the field and vote with a key: "2" is "B is better"
    pair.locator(".reason").fill("B reads better")
    pair.locator(".reason").press("Escape")
    page.keyboard.press("2")
    thanks = pair.locator(".vote-thanks")
    expect(thanks).to_contain_text("Thanks for your vote")
    expect(thanks).to_contain_text("answer B")
    expect(b).to_have_class(re.compile(r"\bwinner\b"))
    expect(a).to_have_class(re.compile(r"\bloser\b"))
    # only now, after the vote, each answer says which version wrote it
    expect(a.locator(".card-version")).to_have_text("v0")
    expect(b.locator(".card-version")).to_have_text("v0")
    expect(pair.get_by_role("button", name="A is better")).to_be_disabled()
    page.screenshot(path=str(SHOTS / "chat-voted-desktop.png"))

    events = [e for e in outbox(settings) if e.comparison_id == cid]
    assert len(events) == 1, events
    ev = events[0]
    assert ev.choice == 1 and ev.reason == "B reads better"
    assert [ans.text for ans in ev.answers] == shown
    assert [m.model_dump() for m in ev.messages] == [{"role": "user", "content": "Which fruit is best?"}]

    # the conversation goes on with the chosen answer; more keys do nothing now
    page.keyboard.press("1")
    send(page, "Why?")
    expect(page.locator(".pair[data-ready=true]")).to_have_count(2)
    assert requests[1]["body"]["messages"] == [
        {"role": "user", "content": "Which fruit is best?"},
        {"role": "assistant", "content": shown[1]},
        {"role": "user", "content": "Why?"},
    ]
    assert len([e for e in outbox(settings) if e.comparison_id == cid]) == 1
    page.context.close()


def test_reload_keeps_the_conversation(api_server: tuple[str, Settings], browser: Browser) -> None:
    """The conversation survives a reload (localStorage), a pair left unvoted can still be voted on
    after it, the next request carries the whole history, and New chat forgets it."""
    base, settings = api_server
    page = open_page(browser, f"{base}/?compare=off", key=USER_KEY)
    requests = chat_requests(page)
    send(page, "First question")
    expect(page.locator(".msg.assistant[data-done=true]")).to_have_count(1)
    first = page.locator(".msg.assistant .text").first.get_attribute("data-raw")
    page.goto(f"{base}/?compare=force")
    send(page, "Second question")
    expect(page.locator(".pair[data-ready=true]")).to_have_count(1)
    cid = page.locator(".pair").get_attribute("data-comparison-id")
    shown = pair_texts(page)

    page.reload()
    expect(page.locator(".msg.user .bubble")).to_have_text(["First question", "Second question"])
    expect(page.locator(".msg.assistant .text").first).to_have_attribute("data-raw", first or "")
    assert pair_texts(page) == shown
    expect(page.locator("#empty")).to_be_hidden()
    pair = page.locator(".pair[data-ready=true]")
    assert pair.get_attribute("data-comparison-id") == cid
    pair.get_by_role("button", name="B is better").click()  # the restored pair takes its vote
    expect(pair.locator(".vote-thanks")).to_contain_text("answer B")
    assert [e.choice for e in outbox(settings) if e.comparison_id == cid] == [1]

    page.reload()  # the vote is remembered too
    expect(page.locator(".pair.settled .card[data-label=B]")).to_have_class(re.compile(r"\bwinner\b"))
    expect(page.locator(".pair .vote-button")).to_have_count(0)
    send(page, "Third question")
    expect(page.locator(".pair[data-ready=true]")).to_have_count(1)
    assert requests[-1]["body"]["messages"] == [
        {"role": "user", "content": "First question"}, {"role": "assistant", "content": first},
        {"role": "user", "content": "Second question"}, {"role": "assistant", "content": shown[1]},
        {"role": "user", "content": "Third question"}]

    page.get_by_role("button", name="New chat").click()
    expect(page.locator(".msg")).to_have_count(0)
    page.reload()
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    page.context.close()


#: An answer as a model might write it, with HTML that must stay text.
MARKDOWN_ANSWER = """Here is how:

1. Install it
2. Run **this**:

```python
print("<b>hi</b>")
```

- a `code` word
- <script>window.__pwned = 1</script> stays text
<img src=x onerror="window.__pwned = 2">"""


def test_markdown_is_drawn_and_html_stays_text(api_server: tuple[str, Settings], browser: Browser) -> None:
    """An answer is drawn as Markdown (paragraphs, lists, a code block with a Copy button), and HTML in
    it stays characters. The answer is one the page saved itself (a real model cannot be made to write
    this text); a saved answer is drawn by the same code as a streamed one."""
    base, _ = api_server
    page = open_page(browser, f"{base}/?compare=off", key=USER_KEY)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    send(page, "How do I print bold?")
    expect(page.locator(".msg.assistant[data-done=true]")).to_have_count(1)
    saved = json.loads(page.evaluate("localStorage.getItem('kaizen.chat')"))
    assert saved["turns"][1]["kind"] == "answer"
    saved["turns"][1]["text"] = MARKDOWN_ANSWER
    saved["messages"][1]["content"] = MARKDOWN_ANSWER
    page.evaluate("s => localStorage.setItem('kaizen.chat', s)", json.dumps(saved))
    page.reload()

    text = page.locator(".msg.assistant .text")
    expect(text.locator("p").first).to_have_text("Here is how:")
    expect(text.locator("ol > li")).to_have_text(["Install it", "Run this:"])
    expect(text.locator("ol strong")).to_have_text("this")
    code = text.locator(".code-block pre code")
    expect(code).to_have_text('print("<b>hi</b>")')
    expect(code).to_have_class("language-python")
    expect(text.locator(".code-block .code-lang")).to_have_text("python")
    expect(text.locator("ul > li")).to_have_count(2)
    expect(text.locator("ul > li code")).to_have_text("code")
    expect(text.locator("ul > li").nth(1)).to_contain_text("<script>window.__pwned = 1</script> stays text")
    expect(text).to_contain_text('<img src=x onerror="window.__pwned = 2">')
    # no element came from the model's text: no script, no img, no bold from its <b>
    assert text.locator("script, img, b").count() == 0
    assert page.evaluate("window.__pwned") is None

    text.get_by_role("button", name="Copy python to the clipboard").click()
    expect(text.locator(".copy-code")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == 'print("<b>hi</b>")'
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "chat-markdown-desktop.png"))
    page.context.close()


def test_narrow_screen_stacks_the_pair(api_server: tuple[str, Settings], browser: Browser) -> None:
    base, settings = api_server
    page = open_page(browser, f"{base}/?compare=force", viewport=NARROW, key=USER_KEY, color_scheme="dark")
    send(page, "Give me a tip for learning to cook")
    pair = page.locator(".pair[data-ready=true]")
    expect(pair).to_have_count(1)
    box_a, box_b = card_boxes(page)
    assert box_a["y"] + box_a["height"] <= box_b["y"]  # stacked
    assert box_a["x"] >= 0 and box_a["x"] + box_a["width"] <= NARROW["width"]  # no sideways scrolling
    assert page.evaluate("document.documentElement.scrollWidth") <= NARROW["width"]
    # every vote button is a finger-sized target inside the screen, not covered by anything
    for label in ("A is better", "B is better", "Tie", "Both are bad"):
        button = pair.get_by_role("button", name=label)
        button.scroll_into_view_if_needed()
        box = button.bounding_box()
        assert box is not None and box["height"] >= 44 and box["width"] >= 120, (label, box)
        assert box["x"] >= 0 and box["x"] + box["width"] <= NARROW["width"], (label, box)
        hit = page.evaluate(
            "([x, y]) => document.elementFromPoint(x, y)?.closest('.vote-button')?.dataset.choice ?? null",
            [box["x"] + box["width"] / 2, box["y"] + box["height"] / 2])
        assert hit is not None, (label, "covered")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "chat-narrow-dark.png"))

    # a click works as well as a key; "Tie" continues with answer A
    pair.get_by_role("button", name="Tie").click()
    expect(pair.locator(".vote-thanks")).to_contain_text("answer A")
    cid = pair.get_attribute("data-comparison-id")
    assert [e.choice for e in outbox(settings) if e.comparison_id == cid] == ["tie"]
    expect(pair.locator(".card-version")).to_have_text(["v0", "v0"])
    page.screenshot(path=str(SHOTS / "chat-narrow-voted-dark.png"))
    page.context.close()


def test_vote_refused_is_explained(api_server: tuple[str, Settings], browser: Browser) -> None:
    """A pair voted elsewhere first (another tab): the page says 409 in words and moves on with A."""
    base, _ = api_server
    page = open_page(browser, f"{base}/?compare=force", key=USER_KEY)
    send(page, "Hello")
    pair = page.locator(".pair[data-ready=true]")
    expect(pair).to_have_count(1)
    r = httpx.post(f"{base}/v1/feedback", headers={"Authorization": f"Bearer {USER_KEY}"},
                   json={"comparison_id": pair.get_attribute("data-comparison-id"), "choice": 0})
    assert r.status_code == 202, r.text
    pair.get_by_role("button", name="Both are bad").click()
    alert = pair.get_by_role("alert")
    expect(alert).to_contain_text("already has a vote")
    expect(alert).to_contain_text("HTTP 409")
    expect(pair.locator(".vote-thanks")).to_have_count(0)
    expect(pair.get_by_role("button", name="B is better")).to_be_disabled()
    page.context.close()


def test_stop_keeps_the_partial_answer(api_server: tuple[str, Settings], browser: Browser) -> None:
    base, _ = api_server
    page = open_page(browser, f"{base}/?compare=off&max_tokens=300", key=USER_KEY)
    requests = chat_requests(page)
    # a slow network (Chromium's own throttling; the tiny model is faster than a person's click)
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions",
             {"offline": False, "latency": 0, "downloadThroughput": 1500, "uploadThroughput": -1})
    send(page, "Write a long essay")
    expect(page.locator(".msg.assistant .text")).not_to_have_text("")
    page.locator("#stop").click()
    expect(page.locator(".msg.assistant[data-done=true]")).to_contain_text("Stopped.")
    # what the page sends back is the answer as the model wrote it (data-raw), not its Markdown
    # rendering: a random tiny model's text with blank lines or `*` renders to other characters
    partial = page.locator(".msg.assistant .text").get_attribute("data-raw") or ""
    assert requests[0]["body"]["max_tokens"] == 300
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#prompt")).to_be_focused()
    cdp.send("Network.emulateNetworkConditions",
             {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    send(page, "Go on")
    expect(page.locator(".msg.assistant[data-done=true]")).to_have_count(2, timeout=ANSWER_TIMEOUT_MS)  # 300 tokens
    assert requests[1]["body"]["messages"][1] == {"role": "assistant", "content": partial}
    page.context.close()


def test_bad_key_is_explained(api_server: tuple[str, Settings], browser: Browser) -> None:
    base, _ = api_server
    page = open_page(browser, f"{base}/?compare=off", key="not-a-real-key")
    expect(page.locator("#key-hint")).to_contain_text("did not accept this key")
    send(page, "Hello?")
    alert = page.locator("#alerts").get_by_role("alert")
    expect(alert).to_contain_text("Your API key was not accepted")
    expect(alert).to_contain_text("HTTP 401")
    expect(alert).to_contain_text("invalid_api_key")
    # nothing typed is lost: the message is back in the box, the turn withdrawn
    expect(page.locator("#prompt")).to_have_value("Hello?")
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#settings")).to_be_visible()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "chat-bad-key-desktop.png"))
    # fixing the key makes the same message go through
    page.locator("#api-key").fill(USER_KEY)
    page.locator("#api-key").press("Enter")
    page.locator("#prompt").press("Enter")
    expect(page.locator(".msg.assistant[data-done=true]")).to_have_count(1)
    expect(page.locator("#alerts .notice")).to_have_count(0)
    page.context.close()


def test_loading_server_is_explained(browser: Browser, tmp_path: Path) -> None:
    """The app in-process with no engine yet: its real 503 `loading`, in words."""
    settings = make_settings(tmp_path)
    server = uvicorn.Server(uvicorn.Config(build_app(settings), host="127.0.0.1", port=settings.port,
                                           lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{settings.port}"
        wait_http(f"{base}/healthz", 10)
        page = open_page(browser, f"{base}/")
        requests = chat_requests(page)
        expect(page.locator("#model-version")).to_have_text("model loading…")
        send(page, "Are you there?")
        alert = page.locator("#alerts").get_by_role("alert")
        expect(alert).to_contain_text("The model is still loading")
        expect(alert).to_contain_text("HTTP 503")
        # an open server needs no key: none is sent; pairs are allowed unless the user opts out
        assert "authorization" not in requests[0]["headers"]
        assert requests[0]["body"]["comparison"] == "allow"
        page.locator("#settings-toggle").click()
        page.get_by_label("Help improve Kaizen: sometimes show two answers").uncheck()
        page.locator("#prompt").press("Enter")
        expect(alert).to_contain_text("HTTP 503")
        assert len(requests) == 2 and requests[1]["body"]["comparison"] == "off"
        page.context.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_engine_death_mid_answer_is_explained(browser: Browser, tmp_path: Path) -> None:
    """A stream cut by a dead engine ends in the API's error event (services/api/chat_serving.py, the 503 as a
    stream's error event): the page keeps the partial answer and words it as the 503 it is (it
    said "a problem answering", HTTP 500). The page comes from the real app without an engine;
    the stream is the app's own event shapes, served by Playwright (killing an EngineCore mid-answer
    in a browser test is tests/test_engine_health.py's slow business)."""
    settings = make_settings(tmp_path)
    server = uvicorn.Server(uvicorn.Config(build_app(settings), host="127.0.0.1", port=settings.port,
                                           lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{settings.port}"
        wait_http(f"{base}/healthz", 10)
        piece = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "kaizen",
                 "model_version": "v0", "choices": [{"index": 0, "delta": {"content": "Half an ans"}}]}
        died = dump(ErrorResponse(error=ErrorInfo(message="the engine died under the request; it is being "
                                                  "restarted", type="service_unavailable", code="engine_dead")))
        stream = "".join(f"data: {json.dumps(d)}\n\n" for d in (piece, died)) + "data: [DONE]\n\n"
        page = open_page(browser, f"{base}/?compare=off")
        page.route("**/v1/chat/completions", lambda route: route.fulfill(
            status=200, headers={"Content-Type": "text/event-stream"}, body=stream))
        send(page, "Tell me everything")
        answer = page.locator(".msg.assistant").last
        alert = answer.get_by_role("alert")
        expect(alert).to_contain_text("The server is busy right now")
        expect(alert).to_contain_text("HTTP 503, engine_dead")
        expect(answer).to_contain_text("Half an ans")
        page.context.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_rate_limit_is_explained(
    limited_server_proc: tuple[subprocess.Popen[bytes], Settings], browser: Browser
) -> None:
    proc, settings = limited_server_proc
    base = f"http://127.0.0.1:{settings.port}"
    wait_http(f"{base}/readyz", 240, proc)
    # a token for the version probe, one for the first message; the second is refused
    page = open_page(browser, f"{base}/?compare=off", key=USER_KEY)
    requests = chat_requests(page)
    expect(page.locator("#model-version")).to_have_text("model v0")
    send(page, "First question")
    # served as "acme-assistant", not "kaizen": the page names no model, so the server's own answers
    # (a page naming "kaizen" gets "Not found." here: HTTP 404, model_not_found)
    expect(page.locator(".msg.assistant[data-done=true], #alerts [role=alert]")).to_have_count(
        1, timeout=ANSWER_TIMEOUT_MS)
    assert page.locator("#alerts").inner_text().strip() == "", page.locator("#alerts").inner_text()
    expect(page.locator(".msg.assistant[data-done=true]")).to_have_count(1)
    assert requests[0]["body"].get("model") in (None, settings.served_model_name), requests[0]["body"]
    send(page, "Second question")
    alert = page.locator("#alerts").get_by_role("alert")
    expect(alert).to_contain_text("Too many requests")
    expect(alert).to_contain_text("HTTP 429")
    expect(alert).to_contain_text(re.compile(r"Please wait \d{2,3} seconds"))  # Retry-After: ~100 s here
    # a visible countdown: the number goes down by itself
    countdown = alert.locator(".countdown")
    start = int(countdown.get_attribute("data-remaining") or 0)
    assert 2 < start <= 101, start
    expect(countdown).to_have_attribute("data-remaining", str(start - 2), timeout=5000)
    expect(countdown).to_have_text(f"Please wait {start - 2} seconds before trying again.")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "chat-rate-limited-desktop.png"))
    retry = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {USER_KEY}"})
    assert retry.status_code == 429  # the server agrees
    expect(page.locator("#prompt")).to_have_value("Second question")
    page.context.close()
