"""The chat API: FastAPI + one vLLM engine in the same process.

    kaizen serve                      # http://127.0.0.1:8000
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "kaizen", "messages": [{"role": "user", "content": "Hi"}]}'

`build_app` registers routers, middleware and error handlers in one block;
`lifespan` owns the engine and always shuts it down.
"""

from __future__ import annotations

import asyncio
import json
import random
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import make_asgi_app
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services import metrics, web
from services.auth import AuthError, RateLimiter, check_admin, check_api_key, load_user_id_secret, retry_after, user_id
from services.comparisons import ComparisonStore, OutboxFull, VoteError, new_comparison_id
from services.outbox import OutboxRelay
from services.events import Answer
from services.engine import Engine
from services.models import require_model
from services.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    Delta,
    ErrorInfo,
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    ModelCard,
    ModelList,
    Usage,
    completion_id,
    dump,
)
from services.settings import Settings, get_settings

log = logging.getLogger(__name__)

VERSION_HEADER = "X-Kaizen-Model-Version"
#: Label of the base model until the registry names versions.
BASE_VERSION = "v0"


class APIError(Exception):
    """An error the client caused or must know about, in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_response(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code))
    return JSONResponse(dump(body), status_code=status, headers=headers)


# -- lifecycle ------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Own the outbox relay and the engine; shut both down however the app ends."""
    settings: Settings = app.state.settings
    model_dir = require_model(settings.model_dir)
    relay = OutboxRelay(settings, app.state.comparisons)
    relay.start()  # votes accepted before a crash are delivered while the model loads
    app.state.relay = relay
    engine: Engine | None = None
    try:
        log.info("loading %s into vLLM", model_dir)
        engine = Engine(settings, model_dir, BASE_VERSION)
        app.state.engine = engine
        metrics.ENGINE_READY.set(1)
        metrics.ENGINE_REQUESTS_IN_FLIGHT.set_function(engine.unfinished_requests)
        metrics.MODEL_INFO.labels(model_version=engine.version).set(1)
        log.info("serving %s (version %s) on %s", settings.served_model_name, engine.version,
                 settings.public_url)
        yield
    finally:
        metrics.ENGINE_READY.set(0)
        metrics.ENGINE_REQUESTS_IN_FLIGHT.set_function(lambda: 0)
        app.state.engine = None
        if engine is not None:
            engine.shutdown()
        relay.stop()
        app.state.comparisons.close()


# -- dependencies ----------------------------------------------------------------------


async def get_engine(request: Request) -> Engine:
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None:
        raise APIError(503, "the model is still loading", type="service_unavailable", code="loading")
    return engine


@dataclass(frozen=True)
class Caller:
    """Who sent the request: a pseudonymous id, never the key."""

    user: str


async def get_caller(request: Request) -> Caller:
    """Authenticate the key (if keys are configured) and take a rate-limit token.

    Async on purpose, like the other dependencies: FastAPI runs a plain `def`
    dependency in a worker thread, a hop that cost more than the check itself."""
    state = request.app.state
    try:
        key = check_api_key(state.settings, request.headers.get("authorization"))
    except AuthError as exc:
        raise APIError(exc.status, exc.message, type="authentication_error", code=exc.code) from None
    caller = Caller(user=user_id(state.user_secret, key))
    wait = state.limiter.acquire(caller.user)
    if wait > 0:
        raise APIError(429, f"rate limit exceeded: retry in {wait:.1f} s", type="rate_limit_error",
                       code="rate_limit_exceeded", headers={"Retry-After": retry_after(wait)})
    return caller


async def require_admin(request: Request) -> None:
    try:
        check_admin(request.app.state.settings, request.headers.get("authorization"))
    except AuthError as exc:
        type_ = "authentication_error" if exc.status == 401 else "permission_error"
        raise APIError(exc.status, exc.message, type=type_, code=exc.code) from None


EngineDep = Annotated[Engine, Depends(get_engine)]
CallerDep = Annotated[Caller, Depends(get_caller)]
AdminDep = Annotated[None, Depends(require_admin)]


# -- routes -------------------------------------------------------------------------------

probes = APIRouter(tags=["probes"])
openai_routes = APIRouter(prefix="/v1", tags=["openai"])
admin_routes = APIRouter(prefix="/admin", tags=["admin"])


@probes.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@probes.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ready", "model_version": engine.version})


@openai_routes.get("/models")
async def list_models(_caller: CallerDep, engine: EngineDep, request: Request) -> Response:
    settings: Settings = request.app.state.settings
    card = ModelCard(
        id=settings.served_model_name, created=int(engine.model_dir.stat().st_mtime),
        version=engine.version, root=str(engine.model_dir),
    )
    return JSONResponse(dump(ModelList(data=[card])), headers={VERSION_HEADER: engine.version})


def sampling(req: ChatCompletionRequest, max_tokens: int, paired: bool, settings: Settings) -> dict[str, Any]:
    """The sampling parameters actually used (recorded with each paired answer)."""
    temperature = max(req.temperature, settings.comparison_temperature) if paired else req.temperature
    return {"temperature": temperature, "top_p": req.top_p, "max_tokens": max_tokens, "seed": req.seed,
            "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
            "stop": req.stop_list}


def sampling_params(req: ChatCompletionRequest, used: dict[str, Any], n: int, stream: bool) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=n,
        temperature=used["temperature"],
        top_p=req.top_p,
        max_tokens=used["max_tokens"],
        stop=req.stop_list or None,
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    )


def check_limits(req: ChatCompletionRequest, prompt_len: int, settings: Settings) -> int:
    """Validate lengths against the model and settings; return the answer's token budget."""
    limit = req.answer_token_limit
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if limit is not None and limit > settings.max_tokens_limit:
        raise APIError(400, f"{param} is {limit}, above this server's limit of {settings.max_tokens_limit}",
                       param=param, code="max_tokens_too_large")
    room = settings.engine_max_model_len - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt is {prompt_len} tokens; this model's context is "
                       f"{settings.engine_max_model_len} tokens", param="messages",
                       code="context_length_exceeded")
    if limit is None:
        return min(settings.default_max_tokens, room)
    if limit > room:
        raise APIError(400, f"the prompt ({prompt_len} tokens) plus {param} ({limit}) exceeds this "
                       f"model's context of {settings.engine_max_model_len} tokens", param=param,
                       code="context_length_exceeded")
    return limit


@openai_routes.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(
    req: ChatCompletionRequest, caller: CallerDep, engine: EngineDep, request: Request
) -> Response:
    settings: Settings = request.app.state.settings
    if req.model not in (None, settings.served_model_name, engine.version):
        raise APIError(404, f"the model `{req.model}` does not exist; this server serves "
                       f"`{settings.served_model_name}`", param="model", code="model_not_found")
    if len(req.messages) > settings.max_messages:
        raise APIError(400, f"{len(req.messages)} messages; this server takes at most {settings.max_messages}",
                       param="messages", code="too_many_messages")
    paired = req.comparison == "force" or (
        req.comparison == "allow" and random.random() < settings.comparison_rate)
    if paired and req.n != 1:
        raise APIError(400, "a paired answer has exactly two choices: send n=1 with `comparison`",
                       param="n", code="invalid_value")
    started = time.perf_counter()
    messages = req.chat_messages()
    try:
        prompt_ids = engine.render(messages)
    except Exception as exc:  # the template rejected the conversation (e.g. role order)
        raise APIError(400, f"the conversation does not fit the model's chat template: {exc}",
                       param="messages") from exc
    max_tokens = check_limits(req, len(prompt_ids), settings)
    if engine.unfinished_requests() >= settings.max_inflight:
        raise APIError(503, "the server is at capacity: retry shortly", type="overloaded_error",
                       code="overloaded", headers={"Retry-After": "1"})
    used = sampling(req, max_tokens, paired, settings)
    n = 2 if paired else req.n
    try:
        params = sampling_params(req, used, n, req.stream)
    except ValueError as exc:  # vLLM's own validation of what our models let through
        raise APIError(400, f"invalid sampling parameters: {exc}", code="invalid_value") from exc
    request_id = completion_id()
    version = engine.version
    pair = PendingPair(new_comparison_id(), caller.user, messages, used, datetime.now(UTC)) if paired else None
    metrics.PROMPT_TOKENS.labels(model_version=version).inc(len(prompt_ids))
    headers = {VERSION_HEADER: version}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = stream_chunks(request.app, engine, n, prompt_ids, params, request_id, started,
                               include_usage, pair)
        return EventSourceResponse(events, headers=headers, sep="\n", ping=15)

    texts = [""] * n
    tokens = [0] * n
    finish: list[str | None] = [None] * n
    first = True
    async for out in engine.generate(prompt_ids, params, request_id):
        if first:
            metrics.TIME_TO_FIRST_TOKEN.labels(model_version=version).observe(time.perf_counter() - started)
            first = False
        for c in out.outputs:
            texts[c.index] += c.text
            tokens[c.index] += len(c.token_ids)
            finish[c.index] = c.finish_reason
    completion_tokens = sum(tokens)
    metrics.GENERATED_TOKENS.labels(model_version=version).inc(completion_tokens)
    comparison_id = None
    if pair is not None:
        comparison_id = record_pair(request.app, pair, texts, finish, version)
    body = ChatCompletionResponse(
        id=request_id,
        model=settings.served_model_name,
        model_version=version,
        comparison_id=comparison_id,
        choices=[
            Choice(index=i, message=AssistantMessage(content=texts[i]), finish_reason=_finish(finish[i]))
            for i in range(n)
        ],
        usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens,
                    total_tokens=len(prompt_ids) + completion_tokens),
    )
    return JSONResponse(dump(body), headers=headers)


@dataclass(frozen=True)
class PendingPair:
    """A paired answer being generated; stored once both answers are complete."""

    comparison_id: str
    user: str
    messages: list[dict[str, str]]
    sampling: dict[str, Any]
    served_at: datetime


def record_pair(app: FastAPI, pair: PendingPair, texts: list[str], finish: list[str | None], version: str) -> str:
    answers = [Answer(text=texts[i], model_version=version, finish_reason=finish[i], sampling=pair.sampling)
               for i in range(2)]
    store: ComparisonStore = app.state.comparisons
    store.record(pair.user, pair.messages, answers, served_at=pair.served_at, comparison_id=pair.comparison_id)
    metrics.COMPARISONS_SERVED.labels(model_version=version).inc()
    return pair.comparison_id


@openai_routes.post("/feedback", status_code=202, response_model=FeedbackResponse)
async def feedback(body: FeedbackRequest, caller: CallerDep, request: Request) -> Response:
    """A vote on a paired answer: 0 or 1 (the better choice's index), "tie" or "both_bad"."""
    store: ComparisonStore = request.app.state.comparisons
    try:
        event = store.vote(body.comparison_id, caller.user, body.choice, body.reason)
    except OutboxFull as exc:
        metrics.OUTBOX_FULL_REJECTIONS.inc()
        raise APIError(503, f"votes are not being delivered fast enough ({exc}): retry later",
                       type="overloaded_error", code="outbox_full", headers={"Retry-After": "5"}) from None
    except VoteError as exc:
        type_ = "not_found_error" if exc.status == 404 else (
            "permission_error" if exc.status == 403 else "invalid_request_error")
        raise APIError(exc.status, exc.message, type=type_, param="comparison_id", code=exc.code) from None
    metrics.VOTES.labels(choice=str(body.choice)).inc()
    relay: OutboxRelay | None = getattr(request.app.state, "relay", None)
    if relay is not None:
        relay.notify()
    out = FeedbackResponse(event_id=str(event.event_id), comparison_id=body.comparison_id)
    return JSONResponse(dump(out), status_code=202)


@admin_routes.get("/versions")
async def admin_versions(_admin: AdminDep, request: Request) -> dict[str, Any]:
    """Model versions this server knows (until the registry lands: the one it serves)."""
    engine: Engine | None = request.app.state.engine
    if engine is None:
        return {"object": "list", "data": []}
    return {"object": "list", "data": [
        {"version": engine.version, "stage": "champion", "path": str(engine.model_dir), "serving": True}]}


def _finish(reason: str | None) -> Any:
    return reason if reason in ("stop", "length", "abort") else ("stop" if reason else None)


async def stream_chunks(
    app: FastAPI, engine: Engine, n: int, prompt_ids: list[int], params: Any,
    request_id: str, started: float, include_usage: bool, pair: PendingPair | None,
) -> AsyncIterator[str]:
    """OpenAI stream chunks as SSE `data:` payloads, ending with `[DONE]`.

    If the client goes away, sse-starlette cancels this generator; vLLM's
    `generate` aborts the request on cancellation, so nothing keeps running.
    """
    settings = engine.settings
    version = engine.version
    created = int(time.time())

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        return json.dumps(dump(ChatCompletionChunk(
            id=request_id, created=created, model=settings.served_model_name,
            choices=choices, usage=usage, model_version=version,
            comparison_id=pair.comparison_id if pair else None,
        )))

    for i in range(n):
        yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
    texts = [""] * n
    finish: list[str | None] = [None] * n
    completion_tokens = 0
    first = True
    try:
        async for out in engine.generate(prompt_ids, params, request_id):
            for c in out.outputs:
                if first and c.token_ids:
                    metrics.TIME_TO_FIRST_TOKEN.labels(model_version=version).observe(
                        time.perf_counter() - started)
                    first = False
                completion_tokens += len(c.token_ids)
                texts[c.index] += c.text
                finish[c.index] = c.finish_reason or finish[c.index]
                if c.text:
                    yield chunk([ChunkChoice(index=c.index, delta=Delta(content=c.text))])
                if c.finish_reason is not None:
                    yield chunk([ChunkChoice(index=c.index, delta=Delta(),
                                             finish_reason=_finish(c.finish_reason))])
    except (asyncio.CancelledError, GeneratorExit):
        metrics.CLIENT_DISCONNECTS.inc()
        metrics.GENERATED_TOKENS.labels(model_version=version).inc(completion_tokens)
        raise
    metrics.GENERATED_TOKENS.labels(model_version=version).inc(completion_tokens)
    if pair is not None:  # only a pair the client received whole can be voted on
        record_pair(app, pair, texts, finish, version)
    if include_usage:
        yield chunk([], Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens,
                              total_tokens=len(prompt_ids) + completion_tokens))
    yield "[DONE]"


# -- middleware --------------------------------------------------------------------------

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
            path = getattr(route, "path", None) or ("/metrics" if scope["path"].startswith("/metrics") else "unmatched")
            metrics.HTTP_REQUESTS.labels(route=path, method=scope["method"], status=str(status)).inc()
            metrics.HTTP_DURATION.labels(route=path).observe(time.perf_counter() - started)


class BodySizeLimit:
    """Answers 413 (OpenAI shape) to a request whose declared body exceeds the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                response = error_response(413, f"request body is {int(length)} bytes; the limit is "
                                          f"{self.max_bytes}", "invalid_request_error", code="body_too_large")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- error handlers --------------------------------------------------------------------------


async def handle_api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


#: Routes whose invalid bodies answer 422 (the feedback contract) rather than OpenAI's 400.
UNPROCESSABLE_ROUTES = {"/v1/feedback"}


async def handle_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg', 'invalid request')}" if param else str(first.get("msg", "invalid request"))
    status = 422 if request.url.path in UNPROCESSABLE_ROUTES else 400
    return error_response(status, message, "invalid_request_error", param, "invalid_value")


async def handle_http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, str(exc.detail), type_, headers=getattr(exc, "headers", None))


async def handle_unexpected(_: Request, exc: Exception) -> Response:
    ref = uuid.uuid4().hex[:12]
    log.exception("unhandled error (ref %s)", ref, exc_info=exc)
    return error_response(500, f"internal error (ref {ref})", "internal_error")


def build_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="Kaizen", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = None
    app.state.comparisons = ComparisonStore(settings.api_db, settings.comparison_ttl,
                                            settings.outbox_max_pending)
    app.state.user_secret = load_user_id_secret(settings)
    app.state.limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst)
    app.include_router(probes)
    app.include_router(openai_routes)
    app.include_router(admin_routes)
    app.include_router(web.router)
    app.mount("/static", web.static_files(), name="static")
    app.mount("/metrics", make_asgi_app())
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware)
    app.add_exception_handler(APIError, handle_api_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    app.add_exception_handler(Exception, handle_unexpected)
    return app


def check_bind(settings: Settings) -> None:
    """Refuse an open API on a non-loopback address; warn loudly on loopback."""
    if settings.api_keys:
        return
    if not settings.binds_loopback:
        raise SystemExit(
            f"refusing to serve on {settings.host} without API keys: set KAIZEN_API_KEYS "
            "or bind to 127.0.0.1"
        )
    log.warning("no KAIZEN_API_KEYS set: the API is open to anyone on this machine (loopback only)")


def serve(settings: Settings) -> None:
    """Run the chat API in this process until SIGINT/SIGTERM."""
    import uvicorn

    check_bind(settings)
    uvicorn.run(
        build_app(settings), host=settings.host, port=settings.port,
        log_level=settings.log_level, timeout_graceful_shutdown=10,
    )

