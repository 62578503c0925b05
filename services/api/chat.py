"""`/v1/models` and `/v1/chat/completions`: the OpenAI-compatible surface.

A chat completion is checked (model, conversation, lengths, capacity), planned onto engines and
admitted (services/api/pairing.py), then served whole or streamed (services/api/chat_serving.py).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kaizen.core import metrics
from services.api.chat_serving import VERSION_HEADER, Completion, full_response, stream_response
from services.api.deps import CallerDep, RolloutDep
from services.api.errors import APIError
from services.api.pairing import Part, PendingPair, admit_or_replan, pinned_engine, plan_parts, should_pair
from services.api.sampling import check_limits, sampling, sampling_params
from services.engine import Engine
from services.protocol import (ChatCompletionRequest, ChatCompletionResponse, ModelCard, ModelList,
                               completion_id, dump)
from services.rollout import Rollout
from kaizen.core.settings import Settings

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models")
async def list_models(_caller: CallerDep, rollout: RolloutDep, request: Request) -> Response:
    settings: Settings = request.app.state.settings
    engine = rollout.champion
    assert engine is not None
    # the version only: the folder's path would tell every key holder the server's layout (#19 item 5)
    card = ModelCard(id=settings.served_model_name, created=int(engine.model_dir.stat().st_mtime),
                     version=engine.version)
    return JSONResponse(dump(ModelList(data=[card])), headers={VERSION_HEADER: engine.version})


def check_request(req: ChatCompletionRequest, rollout: Rollout, settings: Settings) -> None:
    """404 for a model this server does not serve; 400 for too many messages."""
    if (req.model is not None and req.model != settings.served_model_name
            and pinned_engine(rollout, req.model) is None):
        raise APIError(404, f"the model `{req.model}` does not exist; this server serves "
                       f"`{settings.served_model_name}`", param="model", code="model_not_found")
    if len(req.messages) > settings.max_messages:
        raise APIError(400, f"{len(req.messages)} messages; this server takes at most "
                       f"{settings.max_messages}",
                       param="messages", code="too_many_messages")


def check_pairable(req: ChatCompletionRequest, paired: bool) -> None:
    if paired and req.n != 1:
        raise APIError(400, "a paired answer has exactly two choices: send n=1 with `comparison`",
                       param="n", code="invalid_value")


def render_prompt(engine: Engine, messages: list[dict[str, str]]) -> list[int]:
    """The conversation's token ids (versions share the tokenizer, so any part's engine renders it)."""
    try:
        return engine.render(messages)
    except Exception as exc:  # the template rejected the conversation (e.g. role order)
        raise APIError(400, f"the conversation does not fit the model's chat template: {exc}",
                       param="messages") from exc


def check_capacity(parts: list[Part], settings: Settings) -> None:
    if sum(p.engine.unfinished_requests() for p in parts) >= settings.max_inflight:
        raise APIError(503, "the server is at capacity: retry shortly", type="overloaded_error",
                       code="overloaded", headers={"Retry-After": "1"})


def engine_params(req: ChatCompletionRequest, used: dict[str, Any], parts: list[Part]) -> list[Any]:
    """vLLM's sampling parameters for each part; 400 for what vLLM's own validation refuses (n above
    1 with temperature 0, say: its VLLMValidationError is not a ValueError)."""
    from vllm.exceptions import VLLMValidationError

    try:
        return [sampling_params(req, used, p.n, req.stream) for p in parts]
    except (ValueError, VLLMValidationError) as exc:  # vLLM's own validation of what our models let through
        raise APIError(400, f"invalid sampling parameters: {exc}", code="invalid_value") from exc


def count_admitted(rollout: Rollout, parts: list[Part], prompt_tokens: int) -> None:
    for p in parts:
        rollout.count_request(p.version)
        metrics.PROMPT_TOKENS.labels(model_version=p.version).inc(prompt_tokens)


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(
    req: ChatCompletionRequest, caller: CallerDep, rollout: RolloutDep, request: Request
) -> Response:
    """OpenAI chat completions; with `comparison`, sometimes two answers to vote on (a pair).

    Checked, planned onto engines, admitted, then answered whole or streamed."""
    settings: Settings = request.app.state.settings
    check_request(req, rollout, settings)
    paired = should_pair(req, settings)
    check_pairable(req, paired)
    started = time.perf_counter()
    request.app.state.rates.request()
    messages = req.chat_messages()
    request_id = completion_id()
    planned = plan_parts(rollout, caller, req, paired, request_id)
    prompt_ids = render_prompt(planned[0].engine, messages)
    max_tokens = check_limits(req, len(prompt_ids), settings)
    check_capacity(planned, settings)
    used = sampling(req, max_tokens, paired, settings)
    params = engine_params(req, used, planned)
    parts = await admit_or_replan(planned, lambda: plan_parts(rollout, caller, req, paired, request_id))
    if parts is not planned:  # planned again: the new parts' own parameters
        params = [sampling_params(req, used, p.n, req.stream) for p in parts]
    count_admitted(rollout, parts, len(prompt_ids))
    pair = PendingPair.start(caller.user, messages, used) if paired else None
    job = Completion(rollout=rollout, parts=parts, params=params, prompt_ids=prompt_ids,
                     request_id=request_id, started=started, pair=pair, model_name=settings.served_model_name,
                     store=request.app.state.comparisons)
    if req.stream:
        return stream_response(job, bool(req.stream_options and req.stream_options.include_usage))
    return await full_response(job)
