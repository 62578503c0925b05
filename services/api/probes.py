"""Probes and Prometheus: `/healthz`, `/readyz`, `/metrics`, and the middleware that counts and
times every HTTP response for it (route template and status; metrics declared in kaizen/core/metrics.py).

Probes are unauthenticated: they answer from the engine watchdog's state (services/engine_health.py)
without calling the engine, and never name versions (`/admin/rollout` does).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from prometheus_client import make_asgi_app

from kaizen.core import metrics
from services.api.errors import REGISTRY_DAMAGED, error_response
from services.engine_health import Probe, liveness, readiness
from services.rollout import Rollout

router = APIRouter(tags=["probes"])


def probe_response(request: Request, check: Callable[..., Probe], status: str) -> JSONResponse:
    """A probe's answer from the engine watchdog's state (services/engine_health.py): no engine
    call, no version names (probes are unauthenticated; /admin/rollout names versions)."""
    if check is readiness and getattr(request.app.state, "registry_damaged", False):
        return error_response(503, REGISTRY_DAMAGED, "service_unavailable", code="registry_damaged")
    rollout: Rollout | None = getattr(request.app.state, "rollout", None)
    probe = check(rollout.champion if rollout else None, request.app.state.settings, time.monotonic())
    if probe.ok:
        return JSONResponse({"status": status})
    return error_response(503, probe.message, "service_unavailable", code=probe.code)


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    """Liveness: 503 when the engine has shown no sign of life for KAIZEN_ENGINE_STALL_TIMEOUT_S."""
    return probe_response(request, liveness, "ok")


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Readiness: 503 while loading, while a dead engine restarts, or while it does not answer."""
    return probe_response(request, readiness, "ready")


Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class MetricsMiddleware:
    """Counts every HTTP response by route template and status; times it to the last byte."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or (
                "/metrics" if scope["path"].startswith("/metrics") else "unmatched")
            metrics.HTTP_REQUESTS.labels(route=path, method=scope["method"], status=str(status)).inc()
            metrics.HTTP_DURATION.labels(route=path).observe(time.perf_counter() - started)


class PrometheusEndpoint:
    """prometheus_client's ASGI app (text or OpenMetrics by Accept, gzip by Accept-Encoding) as an
    object, so a Starlette `Route` serves it as it is rather than wrapping it as a request handler."""

    def __init__(self) -> None:
        self.asgi = make_asgi_app()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        await self.asgi(scope, receive, send)
