"""Request hardening middleware of the chat API (#19): what every request passes before a route.

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(LoopbackHostOnly, names=settings.open_mode_hosts)   # open mode only

- `BodySizeLimit` refuses a body over the limit (413) however it is framed: a declared
  Content-Length before reading, a chunked body as its bytes stream in. It runs before any
  route, so before authentication.
- `SecurityHeaders` adds the browser protections to every answer: a Content-Security-Policy
  without inline script or style, no framing, no MIME sniffing, no Referer.
- `LoopbackHostOnly` guards an open server (loopback, no API keys) against DNS rebinding: a page
  on `evil.example` whose name later resolves to 127.0.0.1 would reach the API from the victim's
  browser, but its requests carry `Host: evil.example`, which is refused.

Each answer made here is in OpenAI's error shape, like the app's own.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders

from services.protocol import ErrorInfo, ErrorResponse, dump

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The web pages load their scripts, styles and data from this origin only; nothing inline runs
#: (services/static/ has no inline <script>, <style> or on* handler); `data:` is the favicon.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
#: FastAPI's /docs and /redoc pages load Swagger UI / ReDoc from a CDN and start it with an inline
#: script; they hold no secret and no user content, so they keep only the framing and plug-in bans.
DOCS_CONTENT_SECURITY_POLICY = "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
DOCS_PATHS = ("/docs", "/redoc")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate CSP level 2
}


def error_json(status: int, message: str, code: str) -> JSONResponse:
    """An OpenAI-shaped error answered by middleware (services.api.errors.error_response, for routes)."""
    body = ErrorResponse(error=ErrorInfo(message=message, type="invalid_request_error", code=code))
    return JSONResponse(dump(body), status_code=status)


class BodySizeLimit:
    """413 for a request body over `max_bytes`, counted as it streams, whatever the framing.

    The body (at most `max_bytes`) is read here before the app runs, then replayed to it: FastAPI
    reads whole bodies anyway, and this way no route or dependency starts on a body that will be
    refused. The client's later messages (a disconnect during a streamed answer) pass through."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def too_large(self, size: str) -> JSONResponse:
        return error_json(413, f"request body is {size} bytes; the limit is {self.max_bytes}", "body_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self.too_large(length)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        first: Message | None = None  # what the app is handed first: the body, or a disconnect
        while first is None:
            message = await receive()
            if message["type"] != "http.request":
                first = message  # the client left mid-body: the app sees it as before
                break
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:  # stop reading at the limit: the rest is never buffered
                await self.too_large(f"more than {self.max_bytes}")(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                assert first is not None
                return first
            return await receive()

        await self.app(scope, replay, send)


class SecurityHeaders:
    """Adds the browser protections to every HTTP answer (pages, JSON, errors, /metrics)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        docs = scope["path"] in DOCS_PATHS or scope["path"].startswith("/docs/")
        policy = DOCS_CONTENT_SECURITY_POLICY if docs else CONTENT_SECURITY_POLICY

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", policy)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def host_name(host: str) -> str:
    """The name of a Host header without its port: `[::1]:8000` -> `::1`, `LocalHost.:80` -> `localhost`."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def is_loopback_address(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class LoopbackHostOnly:
    """Refuses (400) requests whose Host is not a loopback name, on a server without API keys.

    Browsers always send the Host they resolved, so a DNS-rebinding page cannot pass; local tools
    (curl, the OpenAI client, `kaizen up`) address 127.0.0.1 or localhost. Loopback addresses
    (127.0.0.0/8, ::1: a server on KAIZEN_HOST=127.0.0.2 is addressed so) and names under
    `.localhost`, loopback by definition (RFC 6761), pass too."""

    def __init__(self, app: ASGIApp, names: list[str]) -> None:
        self.app, self.names = app, {host_name(n) for n in names}

    def allowed(self, host: str | None) -> bool:
        if host is None:  # HTTP/1.0 without Host: no browser sends that
            return True
        name = host_name(host)
        return name in self.names or name.endswith(".localhost") or is_loopback_address(name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host")
            if not self.allowed(host):
                names = ", ".join(sorted(self.names))
                response = error_json(
                    400, f"Host `{host}` is not a loopback name: this server runs without API keys, so "
                    f"it only answers requests addressed to {names} (a guard against DNS rebinding); "
                    "set KAIZEN_API_KEYS to serve it under other names", "invalid_host")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
