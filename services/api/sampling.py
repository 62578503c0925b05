"""What a chat request asks of the engine: its answer's token budget (checked against the model's
context and this server's limits), the sampling parameters recorded with a paired answer, and
vLLM's `SamplingParams` built from them.
"""

from __future__ import annotations

from typing import Any

from services.api.errors import APIError
from services.protocol import ChatCompletionRequest
from kaizen.core.settings import Settings


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
