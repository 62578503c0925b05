"""The chat API: FastAPI + one vLLM engine in the same process.

    kaizen serve                      # http://127.0.0.1:8000
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "kaizen", "messages": [{"role": "user", "content": "Hi"}]}'

`build_app` registers routers (services/api/, one per resource), middleware and error handlers in
one block; `lifespan` owns the outbox relay and the engines and always shuts them down; `serve`
runs it under uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from services import web
from kaizen.core import metrics
from services.api import admin, chat, feedback, probes
from services.api.errors import (APIError, handle_api_error, handle_database_unavailable,
                                 handle_engine_unavailable, handle_http_error, handle_unexpected,
                                 handle_validation_error)
from services.api.probes import MetricsMiddleware, PrometheusEndpoint
from services.api.rates import Rates
from services.auth import AuthFailures, RateLimiter, admin_token, load_user_id_secret, weak_admin_token
from services.comparisons import ComparisonStore, DatabaseUnavailable
from services.engine import EngineUnavailable, freeze_heap
from services.models import require_model
from services.outbox import OutboxRelay
from kaizen.core.engine_config import release_rpc_dir
from kaizen.core.registry_schema import CorruptState
from services.rollout import Rollout
from services.vote_writer import VoteWriter
from services.security import BodySizeLimit, LoopbackHostOnly, SecurityHeaders
from kaizen.core.settings import Settings, get_settings

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Own the outbox relay and the engines; shut both down however the app ends."""
    settings: Settings = app.state.settings
    require_model(settings.model_dir)
    relay = OutboxRelay(settings, app.state.comparisons)
    relay.start()  # votes accepted before a crash are delivered while the model loads
    app.state.relay = relay
    rollout = Rollout(settings, app.state.comparisons)
    waiting: asyncio.Task[None] | None = None
    try:
        try:
            rollout.start()  # registers v0 if needed, loads the champion (and a running canary)
        except CorruptState as exc:  # nothing to rebuild the state from: wait for a repair, up
            log.error("%s", exc)
            app.state.registry_damaged = True
            waiting = asyncio.create_task(_serve_after_repair(app, rollout), name="kaizen-await-repair")
        else:
            _start_serving(app, rollout)
        yield
    finally:
        if waiting is not None:
            waiting.cancel()
        metrics.ENGINE_READY.set(0)
        metrics.ENGINE_REQUESTS_IN_FLIGHT.set_function(lambda: 0)
        app.state.rollout = None
        await rollout.stop()
        release_rpc_dir()  # the engines' socket files (kaizen/core/engine_config.py)
        app.state.vote_writer.stop()  # commits the votes already queued; the relay then flushes them
        relay.stop()
        app.state.comparisons.close()


def _start_serving(app: FastAPI, rollout: Rollout) -> None:
    settings: Settings = app.state.settings
    freeze_heap()  # the startup heap is static from here on (services/engine.py)
    app.state.registry_damaged = False
    app.state.rollout = rollout
    rollout.run_in_background()
    metrics.ENGINE_READY.set(1)
    metrics.ENGINE_REQUESTS_IN_FLIGHT.set_function(lambda: sum(
        e.unfinished_requests() for e in (rollout.champion, rollout.canary) if e is not None))
    assert rollout.champion is not None
    metrics.MODEL_INFO.labels(model_version=rollout.champion.version).set(1)
    log.info("serving %s (champion %s%s) on %s", settings.served_model_name, rollout.champion.version,
             f", canary {rollout.canary.version}" if rollout.canary else "", settings.public_url)


async def _serve_after_repair(app: FastAPI, rollout: Rollout) -> None:
    """#19 item 7: a registry whose state nothing can rebuild does not crash-loop the API. It
    stays up, not ready (503 `registry_damaged` naming `kaizen models repair`), and starts
    serving as soon as the state reads again."""
    settings: Settings = app.state.settings
    while True:
        await asyncio.sleep(settings.registry_poll_interval_s)
        try:
            await asyncio.to_thread(rollout.start)
        except CorruptState:
            continue
        log.info("the registry state reads again: starting to serve")
        _start_serving(app, rollout)
        return


def build_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="Kaizen", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.rollout = None
    app.state.rates = Rates()
    app.state.comparisons = ComparisonStore.from_settings(settings)  # SQLite, or the shared PostgreSQL
    app.state.vote_writer = VoteWriter(settings, app.state.comparisons)  # group commit of votes
    app.state.user_secret = load_user_id_secret(settings)
    app.state.admin_token = admin_token(settings)  # explicit, or generated for loopback development
    app.state.limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst)
    app.state.auth_failures = AuthFailures(settings.auth_failure_limit, settings.auth_failure_window_s,
                                           settings.auth_failure_max_clients)
    app.include_router(probes.router)
    app.include_router(chat.router)
    app.include_router(feedback.router)
    app.include_router(admin.router)
    app.include_router(web.router)
    app.mount("/static", web.static_files(), name="static")
    prometheus = PrometheusEndpoint()
    app.router.routes.append(Route("/metrics", prometheus, methods=["GET"], include_in_schema=False))
    # and /metrics/, what it answered before (a mount alone: 307 at /metrics)
    app.mount("/metrics", prometheus)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if not settings.api_keys:  # open mode (loopback only, check_bind): refuse DNS-rebinding Hosts
        app.add_middleware(LoopbackHostOnly, names=settings.open_mode_hosts)
    app.add_middleware(SecurityHeaders)  # outside the others: their own answers get the headers too
    app.add_middleware(MetricsMiddleware)
    app.add_exception_handler(APIError, handle_api_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(DatabaseUnavailable, handle_database_unavailable)
    app.add_exception_handler(EngineUnavailable, handle_engine_unavailable)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    app.add_exception_handler(Exception, handle_unexpected)
    return app


def check_bind(settings: Settings) -> None:
    """Refuse an open API on a non-loopback address, and a weak admin token where others can reach
    the server (production, or a non-loopback address); warn loudly on loopback."""
    weak = weak_admin_token(settings)
    if weak is not None:
        if settings.environment == "production" or not settings.binds_loopback:
            raise SystemExit(f"refusing to serve: KAIZEN_ADMIN_TOKEN is too weak ({weak}); use a random one, "
                             "e.g. `python -c 'import secrets; print(secrets.token_hex(24))'`")
        log.warning("KAIZEN_ADMIN_TOKEN is weak (%s): accepted on loopback only", weak)
    if settings.api_keys:
        return
    if not settings.binds_loopback:
        raise SystemExit(
            f"refusing to serve on {settings.host} without API keys: set KAIZEN_API_KEYS "
            "or bind to 127.0.0.1"
        )
    log.warning("no KAIZEN_API_KEYS set: the API is open to anyone on this machine (loopback only)")


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """How `serve` runs uvicorn. `forwarded_allow_ips`: the proxies whose X-Forwarded-For names the
    client, the address failed authentications are counted against (#19 item 3)."""
    return {"host": settings.host, "port": settings.port, "log_level": settings.log_level,
            "timeout_graceful_shutdown": 10, "timeout_keep_alive": settings.keep_alive_s,
            "proxy_headers": True,
            "forwarded_allow_ips": settings.forwarded_allow_ips}


def serve(settings: Settings) -> None:
    """Run the chat API in this process until SIGINT/SIGTERM.

    The port is bound first, then the app starts (the engine loads: seconds to minutes), then it
    listens. uvicorn.run binds only after the app's startup; meanwhile vLLM's processes open sockets
    on ephemeral ports, and one took the API's port once (CI: `kaizen up` died on "address already
    in use" after loading its engine). Bound early, a taken port fails at once and nothing can take it.
    """
    import uvicorn

    check_bind(settings)
    try:
        app = build_app(settings)
    except DatabaseUnavailable as exc:
        raise SystemExit(f"cannot start: {exc} (KAIZEN_DATABASE_URL)") from None
    config = uvicorn.Config(app, **uvicorn_options(settings))
    sock = config.bind_socket()  # bound, not yet listening (connections are refused until ready)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    if not server.started:
        sys.exit(3)  # uvicorn.run's STARTUP_FAILURE: what `kaizen up` reports as "exited while starting"

