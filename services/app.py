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
from collections import deque
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
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from services import metrics, web
from services.auth import (AuthError, AuthFailures, RateLimiter, admin_token, bearer, check_admin,
                           check_api_key, load_user_id_secret, retry_after, user_id, weak_admin_token)
from services.canary import vote_limit_wait
from services.comparisons import (ComparisonStore, DatabaseUnavailable, OutboxFull, VoteError,
                                  new_comparison_id)
from services.outbox import OutboxRelay
from services.events import Answer
from services.engine import Engine, EngineUnavailable
from services.engine_health import Probe, liveness, readiness
from services.registry_schema import CorruptState, RegistryError
from services.rollout import Rollout
from services.rounds_log import read_rounds
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
    PromoteRequest,
    RollbackRequest,
    RolloutRequest,
    Usage,
    completion_id,
    dump,
)
from services.security import BodySizeLimit, LoopbackHostOnly, SecurityHeaders
from services.settings import Settings, get_settings

log = logging.getLogger(__name__)

VERSION_HEADER = "X-Kaizen-Model-Version"


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
        relay.stop()
        app.state.comparisons.close()


def _start_serving(app: FastAPI, rollout: Rollout) -> None:
    settings: Settings = app.state.settings
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


REGISTRY_DAMAGED = ("the model registry's state is damaged and nothing can rebuild it: an operator must run "
                    "`kaizen models repair --champion vN` (the server log has the details)")


# -- dependencies ----------------------------------------------------------------------


async def get_rollout(request: Request) -> Rollout:
    if getattr(request.app.state, "registry_damaged", False):
        raise APIError(503, REGISTRY_DAMAGED, type="service_unavailable", code="registry_damaged")
    rollout: Rollout | None = getattr(request.app.state, "rollout", None)
    if rollout is None or not rollout.ready:
        raise APIError(503, "the model is still loading", type="service_unavailable", code="loading")
    return rollout


@dataclass(frozen=True)
class Caller:
    """Who sent the request: a pseudonymous id, never the key."""

    user: str


def client_address(request: Request) -> str:
    """Who failed to authenticate: the peer's address (a trusted proxy's X-Forwarded-For, per uvicorn)."""
    return request.client.host if request.client else "unknown"


def refuse_after_auth_failures(request: Request) -> None:
    """429 for an address past its failed-authentication limit, before its credentials are checked."""
    wait = request.app.state.auth_failures.wait(client_address(request))
    if wait > 0:
        raise APIError(429, f"too many failed authentications from this address: retry in {wait:.0f} s",
                       type="rate_limit_error", code="too_many_auth_failures",
                       headers={"Retry-After": retry_after(wait)})


def count_auth_failure(request: Request) -> None:
    """A wrong key or token was presented (a missing one guesses nothing, so it is not counted)."""
    token = bearer(request.headers.get("authorization"))
    if token is not None:
        request.app.state.auth_failures.failed(client_address(request), token)


async def get_caller(request: Request) -> Caller:
    """Authenticate the key (if keys are configured) and take a rate-limit token.

    Async on purpose, like the other dependencies: FastAPI runs a plain `def`
    dependency in a worker thread, a hop that cost more than the check itself."""
    state = request.app.state
    refuse_after_auth_failures(request)
    try:
        key = check_api_key(state.settings, request.headers.get("authorization"))
    except AuthError as exc:
        count_auth_failure(request)
        raise APIError(exc.status, exc.message, type="authentication_error", code=exc.code) from None
    caller = Caller(user=user_id(state.user_secret, key))
    wait = state.limiter.acquire(caller.user)
    if wait > 0:
        raise APIError(429, f"rate limit exceeded: retry in {wait:.1f} s", type="rate_limit_error",
                       code="rate_limit_exceeded", headers={"Retry-After": retry_after(wait)})
    return caller


async def require_admin(request: Request) -> None:
    refuse_after_auth_failures(request)
    try:
        check_admin(request.app.state.admin_token, request.headers.get("authorization"))
    except AuthError as exc:
        count_auth_failure(request)
        type_ = "authentication_error" if exc.status == 401 else "permission_error"
        raise APIError(exc.status, exc.message, type=type_, code=exc.code) from None


RolloutDep = Annotated[Rollout, Depends(get_rollout)]
CallerDep = Annotated[Caller, Depends(get_caller)]
AdminDep = Annotated[None, Depends(require_admin)]


# -- routes -------------------------------------------------------------------------------

probes = APIRouter(tags=["probes"])
openai_routes = APIRouter(prefix="/v1", tags=["openai"])
admin_routes = APIRouter(prefix="/admin", tags=["admin"])


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


@probes.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    """Liveness: 503 when the engine has shown no sign of life for KAIZEN_ENGINE_STALL_TIMEOUT_S."""
    return probe_response(request, liveness, "ok")


@probes.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Readiness: 503 while loading, while a dead engine restarts, or while it does not answer."""
    return probe_response(request, readiness, "ready")


@openai_routes.get("/models")
async def list_models(_caller: CallerDep, rollout: RolloutDep, request: Request) -> Response:
    settings: Settings = request.app.state.settings
    engine = rollout.champion
    assert engine is not None
    # the version only: the folder's path would tell every key holder the server's layout (#19 item 5)
    card = ModelCard(id=settings.served_model_name, created=int(engine.model_dir.stat().st_mtime),
                     version=engine.version)
    return JSONResponse(dump(ModelList(data=[card])), headers={VERSION_HEADER: engine.version})


def sampling(req: ChatCompletionRequest, max_tokens: int, paired: bool, settings: Settings) -> dict[str, Any]:
    """The sampling parameters actually used (recorded with each paired answer).

    A paired answer ignores the request's `seed` (#19 item 2): with it, the same request pinned to
    one version, or sent by a user the canary serves, would reproduce one side of the pair word for
    word and tell the voter which answer is the canary's."""
    temperature = max(req.temperature, settings.comparison_temperature) if paired else req.temperature
    seed = None if paired else req.seed
    return {"temperature": temperature, "top_p": req.top_p, "max_tokens": max_tokens, "seed": seed,
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
        seed=used["seed"],
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


@dataclass
class Part:
    """One engine request of a chat completion: all its choices, or one side of a pair."""

    engine: Engine
    n: int
    offset: int
    """Index of this part's first choice in the response."""
    request_id: str
    version: str = ""


def pinned_engine(rollout: Rollout, model: str | None) -> Engine | None:
    """The engine a request's `model: "vN"` pins: only the champion's version (#19 item 2).

    The canary's version is answered as an unknown model: pinning it would let any key sample the
    canary at will (outside its share of users) and match the answers of a pair to versions."""
    champion = rollout.champion
    return champion if champion is not None and model is not None and champion.version == model else None


def plan_parts(rollout: Rollout, caller: Caller, req: ChatCompletionRequest, paired: bool,
               request_id: str) -> list[Part]:
    """Which engine(s) answer: the pinned champion, champion vs canary for a pair while a
    canary runs, else the user's sticky engine."""
    pinned = pinned_engine(rollout, req.model)
    if pinned is not None:
        return [Part(pinned, 2 if paired else req.n, 0, request_id)]
    if paired:
        pair = rollout.pair_engines()
        if pair is not None:
            return [Part(pair[0], 1, 0, f"{request_id}-a"), Part(pair[1], 1, 1, f"{request_id}-b")]
        return [Part(rollout.engine_for(caller.user), 2, 0, request_id)]
    return [Part(rollout.engine_for(caller.user), req.n, 0, request_id)]


ADMIT_REPLANS = 2
"""How often a request whose engine was retired before it was admitted is planned again."""


async def admit_parts(parts: list[Part]) -> None:
    """Admit every part (each waits, bounded, while a swap or a restart holds new requests);
    all or none: on `EngineUnavailable` the parts already admitted are released."""
    for i, p in enumerate(parts):
        try:
            p.version = await p.engine.admit(p.request_id)
        except EngineUnavailable:
            for q in parts[:i]:
                q.engine.release(q.request_id)
            raise


def response_version(parts: list[Part]) -> str:
    """The label of a response: its version, or both of a champion-vs-canary pair (sorted,
    so the label does not say which side is which)."""
    versions = sorted({p.version for p in parts}, key=lambda v: (len(v), v))
    return ",".join(versions)


@openai_routes.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(
    req: ChatCompletionRequest, caller: CallerDep, rollout: RolloutDep, request: Request
) -> Response:
    settings: Settings = request.app.state.settings
    if (req.model is not None and req.model != settings.served_model_name
            and pinned_engine(rollout, req.model) is None):
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
    request.app.state.rates.request()
    messages = req.chat_messages()
    request_id = completion_id()
    parts = plan_parts(rollout, caller, req, paired, request_id)
    try:
        prompt_ids = parts[0].engine.render(messages)  # versions share the tokenizer
    except Exception as exc:  # the template rejected the conversation (e.g. role order)
        raise APIError(400, f"the conversation does not fit the model's chat template: {exc}",
                       param="messages") from exc
    max_tokens = check_limits(req, len(prompt_ids), settings)
    if sum(p.engine.unfinished_requests() for p in parts) >= settings.max_inflight:
        raise APIError(503, "the server is at capacity: retry shortly", type="overloaded_error",
                       code="overloaded", headers={"Retry-After": "1"})
    used = sampling(req, max_tokens, paired, settings)
    try:
        params = [sampling_params(req, used, p.n, req.stream) for p in parts]
    except ValueError as exc:  # vLLM's own validation of what our models let through
        raise APIError(400, f"invalid sampling parameters: {exc}", code="invalid_value") from exc
    for replan in range(ADMIT_REPLANS + 1):
        try:
            await admit_parts(parts)
            break
        except EngineUnavailable as exc:
            # an engine retired between planning and admission (a canary promoted or withdrawn,
            # here or by another replica): plan again on what is served now
            if exc.reason != "engine_stopped" or replan == ADMIT_REPLANS:
                raise
            parts = plan_parts(rollout, caller, req, paired, request_id)
            params = [sampling_params(req, used, p.n, req.stream) for p in parts]
    for p in parts:
        rollout.count_request(p.version)
        metrics.PROMPT_TOKENS.labels(model_version=p.version).inc(len(prompt_ids))

    def release() -> None:
        for p in parts:
            label = p.engine.release(p.request_id)
            if label is not None:
                p.version = label

    version = response_version(parts)
    pair = PendingPair(new_comparison_id(), caller.user, messages, used, datetime.now(UTC)) if paired else None
    n = sum(p.n for p in parts)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = stream_chunks(request.app, rollout, parts, params, n, prompt_ids, request_id, started,
                               include_usage, pair, release)
        return EventSourceResponse(events, headers={VERSION_HEADER: version}, sep="\n", ping=15,
                                   background=BackgroundTask(release))

    texts = [""] * n
    tokens = [0] * n
    finish: list[str | None] = [None] * n
    try:
        async for part, out in generate_parts(rollout, parts, params, prompt_ids, started):
            for c in out.outputs:
                i = part.offset + c.index
                texts[i] += c.text
                tokens[i] += len(c.token_ids)
                finish[i] = c.finish_reason
    finally:
        release()
    version = response_version(parts)  # names both versions if a swap resumed it on new weights
    for p in parts:
        metrics.GENERATED_TOKENS.labels(model_version=p.version).inc(sum(tokens[p.offset:p.offset + p.n]))
    completion_tokens = sum(tokens)
    comparison_id = None
    if pair is not None:
        # in a thread: on PostgreSQL a few network round trips; DatabaseUnavailable answers 503
        comparison_id = await asyncio.to_thread(record_pair, request.app, pair, texts, finish,
                                                [p.version for p in parts for _ in range(p.n)])
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
    return JSONResponse(dump(body), headers={VERSION_HEADER: version})


async def generate_parts(rollout: Rollout, parts: list[Part], params: list[Any], prompt_ids: list[int],
                         started: float) -> AsyncIterator[tuple[Part, Any]]:
    """Outputs of all parts as they come, with time to first token and errors per version.

    One part is iterated directly; two (a champion-vs-canary pair) run as tasks feeding
    one queue. Cancelling this iterator cancels the tasks, which aborts the engine requests."""
    first = {p.request_id: True for p in parts}

    def seen(part: Part, out: Any) -> None:
        if first[part.request_id] and any(c.token_ids for c in out.outputs):
            first[part.request_id] = False
            ttft = time.perf_counter() - started
            metrics.TIME_TO_FIRST_TOKEN.labels(model_version=part.version).observe(ttft)
            rollout.observe(part.version, ttft_s=ttft)

    if len(parts) == 1:
        part = parts[0]
        try:
            async for out in part.engine.generate(prompt_ids, params[0], part.request_id):
                seen(part, out)
                yield part, out
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception:
            rollout.observe(part.version, error=True)
            raise
        return

    queue: asyncio.Queue[tuple[Part, Any] | None] = asyncio.Queue()

    async def pump(part: Part, p: Any) -> None:
        try:
            async for out in part.engine.generate(prompt_ids, p, part.request_id):
                await queue.put((part, out))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer below
            rollout.observe(part.version, error=True)
            await queue.put((part, exc))
        await queue.put(None)

    tasks = [asyncio.create_task(pump(part, p)) for part, p in zip(parts, params, strict=True)]
    try:
        done = 0
        while done < len(tasks):
            item = await queue.get()
            if item is None:
                done += 1
                continue
            part, out = item
            if isinstance(out, BaseException):
                raise out
            seen(part, out)
            yield part, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True)
class PendingPair:
    """A paired answer being generated; stored once both answers are complete."""

    comparison_id: str
    user: str
    messages: list[dict[str, str]]
    sampling: dict[str, Any]
    served_at: datetime


def record_pair(app: FastAPI, pair: PendingPair, texts: list[str], finish: list[str | None],
                versions: list[str]) -> str:
    answers = [Answer(text=texts[i], model_version=versions[i], finish_reason=finish[i], sampling=pair.sampling)
               for i in range(2)]
    store: ComparisonStore = app.state.comparisons
    store.record(pair.user, pair.messages, answers, served_at=pair.served_at, comparison_id=pair.comparison_id)
    for v in sorted(set(versions)):
        metrics.COMPARISONS_SERVED.labels(model_version=v).inc()
    return pair.comparison_id


@openai_routes.post("/feedback", status_code=202, response_model=FeedbackResponse)
async def feedback(body: FeedbackRequest, caller: CallerDep, request: Request) -> Response:
    """A vote on a paired answer: 0 or 1 (the better choice's index), "tie" or "both_bad"."""
    store: ComparisonStore = request.app.state.comparisons
    settings: Settings = request.app.state.settings
    # per-user vote limit (#19 item 2); checked before the vote, so concurrent votes of one key
    # may pass it by as many as are in flight at once (the request rate limit bounds those)
    now = datetime.now(UTC)
    cast, oldest = await asyncio.to_thread(store.votes_in_window, caller.user, now - settings.vote_limit_window)
    wait = vote_limit_wait(cast, oldest, now, settings.vote_limit_per_window, settings.vote_limit_window)
    if wait > 0:
        raise APIError(429, f"vote limit reached: {settings.vote_limit_per_window} votes per "
                       f"{settings.vote_limit_window}; retry in {wait:.0f} s", type="rate_limit_error",
                       code="vote_limit_exceeded", headers={"Retry-After": retry_after(wait)})
    try:
        # in a thread: on PostgreSQL a vote is a few network round trips the event loop should not wait on
        event = await asyncio.to_thread(store.vote, body.comparison_id, caller.user, body.choice, body.reason)
    except OutboxFull as exc:
        metrics.OUTBOX_FULL_REJECTIONS.inc()
        raise APIError(503, f"votes are not being delivered fast enough ({exc}): retry later",
                       type="overloaded_error", code="outbox_full", headers={"Retry-After": "5"}) from None
    except VoteError as exc:
        type_ = "not_found_error" if exc.status == 404 else (
            "permission_error" if exc.status == 403 else "invalid_request_error")
        raise APIError(exc.status, exc.message, type=type_, param="comparison_id", code=exc.code) from None
    metrics.VOTES.labels(choice=str(body.choice)).inc()
    request.app.state.rates.vote(str(body.choice))
    relay: OutboxRelay | None = getattr(request.app.state, "relay", None)
    if relay is not None:
        relay.notify()
    out = FeedbackResponse(event_id=str(event.event_id), comparison_id=body.comparison_id,
                           model_versions=[a.model_version for a in event.answers])
    return JSONResponse(dump(out), status_code=202)


def _registry_error(exc: RegistryError) -> APIError:
    type_ = "not_found_error" if exc.status == 404 else "invalid_request_error"
    return APIError(exc.status, str(exc), type=type_, code=exc.code)


def _version_row(rollout: Rollout, info: Any) -> dict[str, Any]:
    row: dict[str, Any] = info.model_dump(mode="json")
    row["serving"] = rollout.engine_named(info.version) is not None
    row["refused"] = rollout.refused.get(info.version)
    return row


@admin_routes.get("/versions")
async def admin_versions(_admin: AdminDep, rollout: RolloutDep) -> dict[str, Any]:
    """Every version in the registry with its stage, lineage parent, gate and training metrics."""
    state = await asyncio.to_thread(rollout.registry.state)
    infos = await asyncio.to_thread(rollout.registry.all_versions)
    return {"object": "list", "champion": state.champion, "canary": state.canary,
            "canary_fraction": state.canary_fraction,
            "data": [_version_row(rollout, i) for i in reversed(infos)]}


@admin_routes.get("/versions/{version}")
async def admin_version(version: str, _admin: AdminDep, rollout: RolloutDep) -> dict[str, Any]:
    try:
        info = await asyncio.to_thread(rollout.registry.info, version)
        lineage = await asyncio.to_thread(rollout.registry.lineage, version)
    except RegistryError as exc:
        raise _registry_error(exc) from None
    audit = await asyncio.to_thread(rollout.registry.audit, None, version)
    return {**_version_row(rollout, info), "lineage": lineage,
            "audit": [e.model_dump(mode="json") for e in audit]}


@admin_routes.get("/rollout")
async def admin_rollout(_admin: AdminDep, rollout: RolloutDep) -> dict[str, Any]:
    """Champion, canary and split; the live head-to-head with its 95% interval; health; decision."""
    return await asyncio.to_thread(rollout.status)


async def _act(rollout: Rollout, action: str, **kwargs: Any) -> dict[str, Any]:
    try:
        await rollout.act(action, **kwargs)
    except RegistryError as exc:
        raise _registry_error(exc) from None
    state = await rollout.reconcile()  # swap or start the canary before answering
    return await asyncio.to_thread(rollout.status, state)


@admin_routes.post("/rollout")
async def admin_start_canary(body: RolloutRequest, _admin: AdminDep, rollout: RolloutDep) -> dict[str, Any]:
    """Serve `version` to `fraction` of users (sticky per user) beside the champion."""
    return await _act(rollout, "canary", who=body.who, why=body.reason, version=body.version,
                      fraction=body.fraction)


@admin_routes.post("/promote")
async def admin_promote(body: PromoteRequest, _admin: AdminDep, rollout: RolloutDep) -> dict[str, Any]:
    """Make `version` (default: the canary) the champion; its weights are swapped in before this returns."""
    return await _act(rollout, "promote", who=body.who, why=body.reason, version=body.version)


@admin_routes.post("/rollback")
async def admin_rollback(body: RollbackRequest, _admin: AdminDep, rollout: RolloutDep) -> dict[str, Any]:
    """Withdraw the canary, or (with none) return to the previous champion."""
    return await _act(rollout, "rollback", who=body.who, why=body.reason)


@admin_routes.get("/audit")
async def admin_audit(_admin: AdminDep, rollout: RolloutDep, limit: int = 100) -> dict[str, Any]:
    entries = await asyncio.to_thread(rollout.registry.audit, max(1, min(limit, 10_000)))
    return {"object": "list", "data": [e.model_dump(mode="json") for e in reversed(entries)]}


@admin_routes.get("/rounds")
async def admin_rounds(_admin: AdminDep, request: Request, limit: int = 100) -> dict[str, Any]:
    """Training rounds as the trainer logged them (shared data dir), newest first."""
    settings: Settings = request.app.state.settings
    # the trainer's own data dir: under Helm the shared volume, not this pod's directory
    trainer_view = settings.model_copy(update={"data_dir": settings.trainer_data_path})
    rows = await asyncio.to_thread(read_rounds, trainer_view, max(1, min(limit, 10_000)))
    return {"object": "list", "data": rows}


#: The trainer's round scheduler writes what decides the next round here (trainer/daemon.py, SCHEDULE_FILE).
SCHEDULE_PATH = ("rounds", "schedule.json")
#: A schedule report older than this means no trainer is checking (reports come every few seconds).
SCHEDULE_STALE_S = 60.0


@admin_routes.get("/schedule")
async def admin_schedule(_admin: AdminDep, request: Request) -> dict[str, Any]:
    """What starts the next training round, as the trainer's scheduler last saw it: votes so far,
    the thresholds, when the interval runs out. `trainer_reporting` is false when no trainer is checking."""
    settings: Settings = request.app.state.settings
    path = settings.trainer_data_path.joinpath(*SCHEDULE_PATH)
    try:
        report: dict[str, Any] = json.loads(await asyncio.to_thread(path.read_text))
    except (OSError, ValueError):
        return {"object": "schedule", "trainer_reporting": False,
                "min_new_preferences": settings.min_new_preferences,
                "round_interval_s": settings.round_interval.total_seconds()}
    age = time.time() - float(report.get("checked_at", 0))
    return {"object": "schedule", **report, "age_s": age, "trainer_reporting": age < SCHEDULE_STALE_S}


@admin_routes.get("/stats")
async def admin_stats(_admin: AdminDep, request: Request) -> dict[str, Any]:
    """Chat request and vote rates over the last few minutes, and votes by choice."""
    rates: Rates = request.app.state.rates
    return rates.snapshot()


class Rates:
    """Timestamps of recent chat requests and votes, for rates over a sliding window."""

    def __init__(self, window_s: float = 300.0, max_events: int = 200_000) -> None:
        self.window_s = window_s
        self.requests: deque[float] = deque(maxlen=max_events)
        self.votes: deque[float] = deque(maxlen=max_events)
        self.by_choice: dict[str, int] = {"0": 0, "1": 0, "tie": 0, "both_bad": 0}
        self.requests_total = 0
        self.votes_total = 0

    def request(self) -> None:
        self.requests.append(time.monotonic())
        self.requests_total += 1

    def vote(self, choice: str) -> None:
        self.votes.append(time.monotonic())
        self.votes_total += 1
        self.by_choice[choice] = self.by_choice.get(choice, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        cutoff = time.monotonic() - self.window_s
        for q in (self.requests, self.votes):
            while q and q[0] < cutoff:
                q.popleft()
        return {"requests_per_s": len(self.requests) / self.window_s, "votes_per_s": len(self.votes) / self.window_s,
                "votes_by_choice": dict(self.by_choice), "requests_total": self.requests_total,
                "votes_total": self.votes_total, "window_s": self.window_s}


def _finish(reason: str | None) -> Any:
    return reason if reason in ("stop", "length", "abort") else ("stop" if reason else None)


async def stream_chunks(
    app: FastAPI, rollout: Rollout, parts: list[Part], params: list[Any], n: int, prompt_ids: list[int],
    request_id: str, started: float, include_usage: bool, pair: PendingPair | None,
    release: Callable[[], None],
) -> AsyncIterator[str]:
    """OpenAI stream chunks as SSE `data:` payloads, ending with `[DONE]`.

    If the client goes away, sse-starlette cancels this generator; vLLM's
    `generate` aborts the request on cancellation, so nothing keeps running.
    """
    settings: Settings = app.state.settings
    created = int(time.time())
    version = response_version(parts)

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        return json.dumps(dump(ChatCompletionChunk(
            id=request_id, created=created, model=settings.served_model_name,
            choices=choices, usage=usage, model_version=version,
            comparison_id=pair.comparison_id if pair else None,
        )))

    try:
        for i in range(n):
            yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
        texts = [""] * n
        finish: list[str | None] = [None] * n
        tokens = [0] * n
        try:
            async for part, out in generate_parts(rollout, parts, params, prompt_ids, started):
                for c in out.outputs:
                    i = part.offset + c.index
                    tokens[i] += len(c.token_ids)
                    texts[i] += c.text
                    finish[i] = c.finish_reason or finish[i]
                    if c.text:
                        yield chunk([ChunkChoice(index=i, delta=Delta(content=c.text))])
                    if c.finish_reason is not None:
                        yield chunk([ChunkChoice(index=i, delta=Delta(), finish_reason=_finish(c.finish_reason))])
        except (asyncio.CancelledError, GeneratorExit):
            metrics.CLIENT_DISCONNECTS.inc()
            raise
        except EngineUnavailable as exc:  # the engine died mid-answer: the 503 as a stream's error event
            metrics.ENGINE_UNAVAILABLE.labels(code=exc.reason).inc()
            yield json.dumps(dump(ErrorResponse(error=ErrorInfo(
                message=str(exc), type="service_unavailable", param=None, code=exc.reason))))
            yield "[DONE]"
            return
        finally:
            release()
            for p in parts:
                metrics.GENERATED_TOKENS.labels(model_version=p.version).inc(sum(tokens[p.offset:p.offset + p.n]))
        version = response_version(parts)  # names both versions if a swap resumed it on new weights
        if pair is not None:  # only a pair the client received whole can be voted on
            try:
                await asyncio.to_thread(record_pair, app, pair, texts, finish,
                                        [p.version for p in parts for _ in range(p.n)])
            except DatabaseUnavailable as exc:  # the answer is streamed already: finish it, unvotable
                metrics.DATABASE_ERRORS.inc()
                log.warning("paired answer %s not recorded (a vote on it will get 404): %s",
                            pair.comparison_id, exc)
        if include_usage:
            completion_tokens = sum(tokens)
            yield chunk([], Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens,
                                  total_tokens=len(prompt_ids) + completion_tokens))
        yield "[DONE]"
    finally:
        release()


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


class PrometheusEndpoint:
    """prometheus_client's ASGI app (text or OpenMetrics by Accept, gzip by Accept-Encoding) as an
    object, so a Starlette `Route` serves it as it is rather than wrapping it as a request handler."""

    def __init__(self) -> None:
        self.asgi = make_asgi_app()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        await self.asgi(scope, receive, send)


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


async def handle_database_unavailable(request: Request, exc: Exception) -> Response:
    """The shared store cannot be reached: nothing was taken (a vote is committed or refused whole)."""
    assert isinstance(exc, DatabaseUnavailable)
    metrics.DATABASE_ERRORS.inc()
    log.warning("%s %s: %s", request.method, request.url.path, exc)
    retry = str(request.app.state.settings.database_retry_after_s)
    return error_response(503, "the vote store is unavailable: nothing was recorded, retry shortly",
                          "service_unavailable", code="database_unavailable", headers={"Retry-After": retry})


async def handle_engine_unavailable(request: Request, exc: Exception) -> Response:
    """The engine is swapping weights, restarting or died under the request: retry shortly."""
    assert isinstance(exc, EngineUnavailable)
    metrics.ENGINE_UNAVAILABLE.labels(code=exc.reason).inc()
    retry = str(request.app.state.settings.engine_retry_after_s)
    return error_response(503, str(exc), "service_unavailable", code=exc.reason,
                          headers={"Retry-After": retry})


async def handle_unexpected(_: Request, exc: Exception) -> Response:
    ref = uuid.uuid4().hex[:12]
    log.exception("unhandled error (ref %s)", ref, exc_info=exc)
    return error_response(500, f"internal error (ref {ref})", "internal_error")


def build_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="Kaizen", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.rollout = None
    app.state.rates = Rates()
    app.state.comparisons = ComparisonStore.from_settings(settings)  # SQLite, or the shared PostgreSQL
    app.state.user_secret = load_user_id_secret(settings)
    app.state.admin_token = admin_token(settings)  # explicit, or generated for loopback development
    app.state.limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst)
    app.state.auth_failures = AuthFailures(settings.auth_failure_limit, settings.auth_failure_window_s,
                                           settings.auth_failure_max_clients)
    app.include_router(probes)
    app.include_router(openai_routes)
    app.include_router(admin_routes)
    app.include_router(web.router)
    app.mount("/static", web.static_files(), name="static")
    prometheus = PrometheusEndpoint()
    app.router.routes.append(Route("/metrics", prometheus, methods=["GET"], include_in_schema=False))
    app.mount("/metrics", prometheus)  # and /metrics/, what it answered before (a mount alone: 307 at /metrics)
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
            "timeout_graceful_shutdown": 10, "proxy_headers": True,
            "forwarded_allow_ips": settings.forwarded_allow_ips}


def serve(settings: Settings) -> None:
    """Run the chat API in this process until SIGINT/SIGTERM."""
    import uvicorn

    check_bind(settings)
    try:
        app = build_app(settings)
    except DatabaseUnavailable as exc:
        raise SystemExit(f"cannot start: {exc} (KAIZEN_DATABASE_URL)") from None
    uvicorn.run(app, **uvicorn_options(settings))

