"""#19 hardening, items 1, 3, 4 and 5: body limits, failed authentication, browser protections,
what /v1/models reveals.

    python -m pytest tests/test_security.py -q

Against real servers: the shared `kaizen serve` (tests/conftest.py) where the engine matters,
and the real app under uvicorn in a thread (lifespan off, no engine) where only middleware and
authentication answer, so that each test gets its own failure counters and its own mode (open
or keyed). Pages are loaded in Debian's headless Chromium, as in tests/test_web.py.
"""

from __future__ import annotations

import json
import re
import secrets
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from playwright.sync_api import ConsoleMessage, sync_playwright

from services.app import build_app, uvicorn_options
from services.auth import admin_token, token_entropy_bits, weak_admin_token
from kaizen.core.settings import Settings
from tests.conftest import ADMIN_TOKEN, OTHER_KEY, ROOT, USER_KEY, free_port, make_settings, wait_http
from tests.test_web import CHROMIUM, CHROMIUM_ARGS

STATIC = ROOT / "services" / "static"
#: Seconds a test waits for one answer from a server (the shared machine is slow, not the code).
ANSWER_TIMEOUT_S = 120


@contextmanager
def app_server(settings: Settings, app: FastAPI | None = None) -> Iterator[str]:
    """The real app (`app`, else one built from `settings`) on a real socket: uvicorn in a thread,
    lifespan off, so no engine; yields its base URL."""
    app = app if app is not None else build_app(settings)
    options = {**uvicorn_options(settings), "host": "127.0.0.1", "log_level": "warning"}  # as `serve` runs it
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{settings.port}"
    try:
        wait_http(f"{base}/healthz", 60)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code and body["error"]["message"], body
    return dict(body["error"])


# -- item 1: the body limit counts streamed bytes ----------------------------------------------


def post_chunked(base: str, path: str, total: int, chunk_size: int) -> tuple[int, dict[str, str], bytes, int]:
    """POST `total` bytes as a chunked body over a raw socket, with no Authorization header.

    Stops sending as soon as the server answers (or closes), as a client would; returns the
    status, headers, body and how many bytes of the request were sent."""
    url = httpx.URL(base)
    head = (f"POST {path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    frame = f"{chunk_size:x}\r\n".encode() + b"x" * chunk_size + b"\r\n"
    frames_left, ended, sent = total // chunk_size, False, 0
    out = bytearray(head)
    with socket.create_connection((url.host, url.port), timeout=ANSWER_TIMEOUT_S) as sock:
        sock.setblocking(False)
        while True:
            if not out and frames_left:
                out += frame
                frames_left -= 1
            elif not out and not ended:
                out += b"0\r\n\r\n"
                ended = True
            readable, writable, _ = select.select([sock], [sock] if out else [], [], ANSWER_TIMEOUT_S)
            if readable:
                break  # the server answered (or closed) before or after the whole body
            assert writable, "the server neither answered nor read the body"
            try:
                n = sock.send(out)
            except (BrokenPipeError, ConnectionResetError):
                break
            del out[:n]
            sent += n
        sock.setblocking(True)
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            assert more, f"connection closed before an answer: {data!r}"
            data += more
        head_bytes, _, body = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", "0")):
            more = sock.recv(65536)
            if not more:
                break
            body += more
    return status, headers, body, sent


def test_chunked_body_over_the_limit_is_refused_as_it_streams(api_server: tuple[str, Settings]) -> None:
    """#19 item 1: a chunked body bigger than max_body_bytes answers 413 (OpenAI shape) once the
    limit is passed, before authentication, and the server stops reading it. Before the fix
    BodySizeLimit read only Content-Length: the whole body was buffered, then auth said 401."""
    base, settings = api_server
    total = 32 * settings.max_body_bytes  # far beyond what socket buffers hold
    status, headers, body, sent = post_chunked(base, "/v1/chat/completions", total, 64 * 1024)
    assert status == 413, (status, body[:300])
    error = json.loads(body)["error"]
    assert error["code"] == "body_too_large" and error["type"] == "invalid_request_error", error
    assert headers["content-type"] == "application/json"
    assert sent < total // 2, f"the client sent {sent} of {total} bytes: the server kept reading"


def test_chunked_body_under_the_limit_still_reaches_the_route(api_server: tuple[str, Settings]) -> None:
    """#19 item 1: counting streamed bytes keeps small chunked bodies working (the body is replayed)."""
    base, _ = api_server
    vote = json.dumps({"comparison_id": "cmp-does-not-exist", "choice": 1}).encode()

    def chunks() -> Iterator[bytes]:  # an iterator: httpx sends it chunked, with no Content-Length
        yield vote[:10]
        yield vote[10:]

    r = httpx.post(f"{base}/v1/feedback", content=chunks(), timeout=ANSWER_TIMEOUT_S,
                   headers={"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json"})
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert_openai_error(r, 404, "comparison_not_found")


# -- item 3: failed authentication is limited per address; weak admin tokens refused -----------


def test_failed_authentication_is_rate_limited_per_client_address(tmp_path: Path) -> None:
    """#19 item 3: after auth_failure_limit wrong keys or admin tokens, an address gets 429 (with
    Retry-After) on every authenticated route, even with the right key, so a guess cannot be
    confirmed; requests without credentials do not count, nor does a wrong token repeated (one
    guess); another address is not affected.
    Before the fix every wrong key answered 401, without end."""
    settings = make_settings(tmp_path, api_keys=f"{USER_KEY},{OTHER_KEY}", admin_token=ADMIN_TOKEN,
                             auth_failure_limit=3, auth_failure_window_s=3600)
    vote = {"comparison_id": "cmp-does-not-exist", "choice": 1}
    with app_server(settings) as base, httpx.Client(base_url=base, timeout=ANSWER_TIMEOUT_S) as client:
        for _ in range(5):  # no credentials: nothing guessed, nothing counted
            assert_openai_error(client.post("/v1/feedback", json=vote), 401, "invalid_api_key")
        assert_openai_error(client.post("/v1/feedback", json=vote, headers=bearer(USER_KEY)), 404,
                            "comparison_not_found")
        for wrong in ("guess-1", "guess-1", "guess-1", "guess-1", "guess-2"):  # two guesses
            assert_openai_error(client.post("/v1/feedback", json=vote, headers=bearer(wrong)), 401,
                                "invalid_api_key")
        assert_openai_error(client.get("/admin/versions", headers=bearer(USER_KEY)), 403, "forbidden")
        for route in ("/v1/feedback", "/admin/versions"):  # the limit is reached: the right keys too
            r = (client.post(route, json=vote, headers=bearer(USER_KEY)) if route == "/v1/feedback"
                 else client.get(route, headers=bearer(ADMIN_TOKEN)))
            error = assert_openai_error(r, 429, "too_many_auth_failures")
            assert error["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
        assert client.get("/healthz").status_code == 200  # unauthenticated routes stay open
    # another client address (127.0.0.2 is loopback too) has its own count
    with app_server(settings.model_copy(update={"port": free_port()})) as base:
        other = httpx.Client(base_url=base, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        for n in range(3):
            other.post("/v1/feedback", json=vote, headers=bearer(f"guess-{n}"))
        assert other.post("/v1/feedback", json=vote, headers=bearer(USER_KEY)).status_code == 429
        local = httpx.post(f"{base}/v1/feedback", json=vote, headers=bearer(USER_KEY), timeout=ANSWER_TIMEOUT_S)
        assert_openai_error(local, 404, "comparison_not_found")
        other.close()


def test_failed_authentication_counts_the_client_a_trusted_proxy_names(tmp_path: Path) -> None:
    """#19 item 3: behind a proxy listed in KAIZEN_FORWARDED_ALLOW_IPS, failures count against the
    client it names in X-Forwarded-For, so one client's guesses do not lock out the others behind
    it; a proxy not listed cannot name clients, so a spoofed X-Forwarded-For per guess does not
    escape the limit. Before the fix there was no such setting (uvicorn trusted 127.0.0.1 only)."""
    vote = {"comparison_id": "cmp-does-not-exist", "choice": 1}

    def post(base: str, client: str, key: str) -> httpx.Response:
        headers = {**bearer(key), "X-Forwarded-For": client}  # this test plays the proxy, from 127.0.0.1
        return httpx.post(f"{base}/v1/feedback", json=vote, headers=headers, timeout=ANSWER_TIMEOUT_S)

    common: dict[str, Any] = {"api_keys": USER_KEY, "auth_failure_limit": 2, "auth_failure_window_s": 3600}
    with app_server(make_settings(tmp_path / "trusted", forwarded_allow_ips="127.0.0.1", **common)) as base:
        for n in range(2):
            assert_openai_error(post(base, "203.0.113.7", f"guess-{n}"), 401, "invalid_api_key")
        assert_openai_error(post(base, "203.0.113.7", USER_KEY), 429, "too_many_auth_failures")
        assert_openai_error(post(base, "203.0.113.8", USER_KEY), 404, "comparison_not_found")
    with app_server(make_settings(tmp_path / "untrusted", forwarded_allow_ips="10.9.9.9", **common)) as base:
        for n in range(2):
            assert_openai_error(post(base, f"203.0.113.{n}", f"guess-{n}"), 401, "invalid_api_key")
        assert_openai_error(post(base, "203.0.113.99", USER_KEY), 429, "too_many_auth_failures")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("mode", [{"environment": "production"}, {"host": "0.0.0.0"}])
def test_weak_admin_tokens_are_refused_where_others_can_reach_the_server(tmp_path: Path,
                                                                         mode: dict[str, str]) -> None:
    """#19 item 3: `kaizen serve` in production, or on a non-loopback address, refuses an admin
    token that is short or repetitive, not only `changeme`, and says why. Before the fix
    `admin-token-89ab` (16 characters, ~58 bits) was accepted and the server started."""
    model = tmp_path / "placeholder-model"  # gets `kaizen serve` past its model check to the server's start
    model.mkdir()
    (model / "config.json").write_text("{}")
    settings = make_settings(tmp_path, api_keys=USER_KEY, admin_token="admin-token-89ab", model=model, **mode)
    r = subprocess.run([sys.executable, "-m", "kaizen", "serve"], env=settings.child_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=ANSWER_TIMEOUT_S)
    assert r.returncode != 0
    assert "KAIZEN_ADMIN_TOKEN is too weak" in r.stderr and "16 characters" in r.stderr, r.stderr[-2000:]
    assert "admin-token-89ab" not in r.stderr + r.stdout  # the secret itself is never printed


def test_token_strength_passes_generated_tokens_and_refuses_patterns(tmp_path: Path) -> None:
    """#19 item 3: what the weak-token check accepts: the token `kaizen up` generates and tokens of
    the usual generators pass; long but repetitive ones fail on entropy."""
    generated = admin_token(make_settings(tmp_path))  # `make run`: no configuration
    assert generated is not None
    for token in (generated, secrets.token_hex(16), secrets.token_urlsafe(24)):
        assert weak_admin_token(make_settings(tmp_path, admin_token=token, environment="production",
                                              api_keys=USER_KEY)) is None, token
    for token, why in (("changeme", "8 characters"), ("ab" * 20, "bits"), ("a" * 64, "bits")):
        reason = weak_admin_token(make_settings(tmp_path, admin_token=token))
        assert reason is not None and why in reason, (token, reason)
    assert token_entropy_bits("a" * 64) == 0.0 and token_entropy_bits("ab" * 20) == 40.0


# -- item 4: browser protections and the Host check of open mode ------------------------------


class InlineCode(HTMLParser):
    """Collects what a CSP without 'unsafe-inline' would block: inline scripts, <style>, on*=, style=."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "style":
            self.found.append("<style>")
        if tag == "script" and "src" not in names:
            self._script = True
        self.found += [f"<{tag} {n}=...>" for n in names if n.startswith("on") or n == "style"]
        self.found += [f"<{tag} {n}=javascript:>" for n, v in attrs if (v or "").strip().lower().startswith("javascript:")]

    def handle_endtag(self, tag: str) -> None:
        self._script = False if tag == "script" else self._script

    def handle_data(self, data: str) -> None:
        if self._script and data.strip():
            self.found.append(f"inline <script>: {data.strip()[:60]}")


@pytest.mark.parametrize("page", sorted(p.name for p in STATIC.glob("*.html")))
def test_pages_have_no_inline_code(page: str) -> None:
    """#19 item 4: the pages' scripts and styles live in files, so the CSP forbids inline code."""
    parser = InlineCode()
    parser.feed((STATIC / page).read_text())
    assert parser.found == []


def test_security_headers_on_every_answer(api_server: tuple[str, Settings]) -> None:
    """#19 item 4: pages, scripts, JSON answers and errors carry a CSP without inline script and
    with frame-ancestors 'none', X-Content-Type-Options: nosniff and a Referrer-Policy. Before
    the fix none of these headers was sent."""
    base, _ = api_server
    for path, auth in (("/", None), ("/admin", None), ("/static/app.js", None), ("/v1/models", USER_KEY),
                       ("/v1/models", None), ("/healthz", None), ("/no-such-page", None)):
        r = httpx.get(f"{base}{path}", headers=bearer(auth) if auth else {}, timeout=ANSWER_TIMEOUT_S)
        csp = r.headers.get("content-security-policy", "")
        directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
        assert directives.get("frame-ancestors") == ["'none'"], (path, csp)
        assert directives.get("script-src") == ["'self'"] and directives.get("style-src") == ["'self'"], csp
        assert directives.get("object-src") == ["'none'"], csp
        assert r.headers.get("x-content-type-options") == "nosniff", path
        assert r.headers.get("referrer-policy") == "no-referrer", path


def test_pages_run_under_their_csp_and_cannot_be_framed(api_server: tuple[str, Settings]) -> None:
    """#19 item 4: in Chromium both pages start (their scripts ran: the chat page asks for a key,
    the operator page for a token) with no CSP violation reported, and a page on another origin
    cannot frame them."""
    base, _ = api_server
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            for path in ("/", "/admin"):
                page = browser.new_context().new_page()
                messages: list[str] = []

                def on_console(msg: ConsoleMessage, messages: list[str] = messages) -> None:
                    messages.append(msg.text)

                page.on("console", on_console)
                page.goto(f"{base}{path}")
                page.wait_for_function("document.readyState === 'complete'")
                toggle = page.locator("#settings-toggle")  # its handler is in the page's script file
                before = toggle.get_attribute("aria-expanded")
                toggle.click()
                page.wait_for_function(
                    "b => document.getElementById('settings-toggle').getAttribute('aria-expanded') !== b",
                    arg=before, timeout=ANSWER_TIMEOUT_S * 1000)
                violations = [m for m in messages if "Content Security Policy" in m]
                assert violations == [], violations
                page.context.close()
            # framing: a page on another origin (a data: URL) embeds the chat page
            page = browser.new_context().new_page()
            page.set_content(f'<iframe id="f" src="{base}/"></iframe>')
            page.wait_for_function("document.readyState === 'complete'")
            frame = page.frame_locator("#f")
            assert frame.locator("#prompt").count() == 0  # the framed page never rendered
            page.context.close()
        finally:
            browser.close()


@pytest.fixture
def open_server(tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    """An open server as `make run` starts one: loopback, no API keys."""
    settings = make_settings(tmp_path)
    assert not settings.api_keys and settings.binds_loopback
    with app_server(settings) as base:
        yield base, settings


def test_open_mode_refuses_hosts_that_are_not_loopback(open_server: tuple[str, Settings]) -> None:
    """#19 item 4: a server without keys answers only requests addressed to a loopback name; any
    other Host (a DNS-rebinding page's) gets a 400 in OpenAI's shape, on every route. Before the
    fix a request with `Host: evil.example` was answered."""
    base, settings = open_server
    port = settings.port
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", f"10.0.0.1:{port}"):
        for method, path in (("GET", "/"), ("GET", "/admin/versions"), ("POST", "/v1/feedback")):
            r = httpx.request(method, f"{base}{path}", headers={"Host": host}, json={}, timeout=ANSWER_TIMEOUT_S)
            error = assert_openai_error(r, 400, "invalid_host")
            assert "DNS rebinding" in error["message"] and "KAIZEN_API_KEYS" in error["message"]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST.:{port}", f"[::1]:{port}",
                 f"app.localhost:{port}", "127.0.0.1", f"127.0.0.2:{port}"):
        assert httpx.get(f"{base}/healthz", headers={"Host": host}, timeout=ANSWER_TIMEOUT_S).status_code == 200


def test_dns_rebinding_is_refused_in_a_browser(open_server: tuple[str, Settings]) -> None:
    """#19 item 4: Chromium resolving `rebind.example` to 127.0.0.1 (what a rebinding attack makes
    a browser do) gets the refusal, not the chat page, while 127.0.0.1 gets the page."""
    base, settings = open_server
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            *CHROMIUM_ARGS, "--host-resolver-rules=MAP rebind.example 127.0.0.1"])
        try:
            page = browser.new_page()
            response = page.goto(f"http://rebind.example:{settings.port}/")
            assert response is not None and response.status == 400
            assert json.loads(page.inner_text("body"))["error"]["code"] == "invalid_host"
            response = page.goto(f"{base}/")
            assert response is not None and response.status == 200
        finally:
            browser.close()


def test_keyed_server_answers_any_host(tmp_path: Path) -> None:
    """#19 item 4: with API keys the Host is not checked (behind a proxy or ingress the server has
    other names); the keys protect it."""
    settings = make_settings(tmp_path, api_keys=USER_KEY)
    with app_server(settings) as base:
        r = httpx.get(f"{base}/healthz", headers={"Host": "kaizen.example.com"}, timeout=ANSWER_TIMEOUT_S)
        assert r.status_code == 200


# -- item 5: /v1/models names the version, not the folder --------------------------------------


def test_models_list_reveals_no_path(api_server: tuple[str, Settings]) -> None:
    """#19 item 5: GET /v1/models gives the served name and version only; before the fix its
    `root` was the absolute model folder on the server's disk."""
    base, settings = api_server
    r = httpx.get(f"{base}/v1/models", headers=bearer(USER_KEY), timeout=ANSWER_TIMEOUT_S)
    assert r.status_code == 200, r.text
    assert settings.model is not None and str(settings.model) not in r.text and str(ROOT) not in r.text
    (card,) = r.json()["data"]
    assert card["id"] == settings.served_model_name and card["version"] == r.headers["x-kaizen-model-version"]
    strings = [v for v in card.values() if isinstance(v, str)]
    assert not any(re.match(r"^(/|[A-Za-z]:\\)", v) for v in strings), card
