"""Wire models of the HTTP API, on one base model.

Field order follows the OpenAI chat-completions reference
(https://platform.openai.com/docs/api-reference/chat); Kaizen extensions are
fenced by a comment. Unknown request fields are accepted and logged, never
rejected, as clients send fields this server does not implement.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger(__name__)


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_unknown_fields(self) -> OpenAIBaseModel:
        if self.model_extra:
            log.debug("ignored unknown fields in %s: %s", type(self).__name__, sorted(self.model_extra))
        return self


# -- errors ---------------------------------------------------------------------


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


# -- chat completions request -------------------------------------------------


class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class ChatCompletionRequest(OpenAIBaseModel):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=8)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = None
    # -- Kaizen extensions --
    comparison: Literal["off", "allow", "force"] = "off"
    """Opt in to paired answers: `allow` pairs at KAIZEN_COMPARISON_RATE, `force` always."""

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @property
    def answer_token_limit(self) -> int | None:
        # `max_completion_tokens` replaces the deprecated `max_tokens` in OpenAI's API.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template expects them (`developer` is a system turn)."""
        out = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": m.text()})
        return out

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# -- chat completions response --------------------------------------------------

FinishReason = Literal["stop", "length", "abort"] | None


class Usage(OpenAIBaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(OpenAIBaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    # -- Kaizen extensions --
    model_version: str
    comparison_id: str | None = None


class Delta(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(OpenAIBaseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason = None
    logprobs: None = None


class ChatCompletionChunk(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    # -- Kaizen extensions --
    model_version: str
    comparison_id: str | None = None


# -- feedback (Kaizen) ---------------------------------------------------------------


class FeedbackRequest(OpenAIBaseModel):
    comparison_id: str = Field(min_length=1, max_length=200)
    choice: Literal[0, 1, "tie", "both_bad"]
    reason: str | None = Field(default=None, max_length=2000)

    @field_validator("choice", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        if isinstance(value, bool):  # JSON true would otherwise pass as 1
            raise ValueError("choice must be 0, 1, \"tie\" or \"both_bad\"")
        return value


class FeedbackResponse(OpenAIBaseModel):
    object: Literal["feedback"] = "feedback"
    event_id: str
    comparison_id: str
    # -- Kaizen extension --
    model_versions: list[str] = []
    """The version that wrote each answer (index 0, 1). Told only once the vote is in, so it
    cannot sway the vote; with a canary running, one is the champion and one the canary."""


# -- models -----------------------------------------------------------------------


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kaizen"
    # -- Kaizen extensions --
    version: str


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude_none=False)


# -- operators (Kaizen /admin) ----------------------------------------------------------


class RolloutRequest(OpenAIBaseModel):
    version: str = Field(min_length=2, max_length=32)
    fraction: float = Field(gt=0.0, le=1.0)
    reason: str = Field(default="", max_length=2000)
    who: str = Field(default="operator", min_length=1, max_length=200)


class PromoteRequest(OpenAIBaseModel):
    version: str | None = Field(default=None, min_length=2, max_length=32)
    reason: str = Field(default="", max_length=2000)
    who: str = Field(default="operator", min_length=1, max_length=200)


class RollbackRequest(OpenAIBaseModel):
    reason: str = Field(default="", max_length=2000)
    who: str = Field(default="operator", min_length=1, max_length=200)
