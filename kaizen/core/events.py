"""Event schemas on Kafka, shared by the API (producer) and trainer (consumer).

A Preference event (schema_version 1) is one vote on one comparison; the
chosen/rejected pair is derived from it, never stored twice. Events are
versioned: a consumer that meets an unknown `schema_version` dead-letters the
event rather than guess.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION: Literal[1] = 1
Choice = Literal[0, 1, "tie", "both_bad"]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    model_version: str
    finish_reason: str | None = None
    sampling: dict[str, Any] = Field(default_factory=dict)

    @property
    def ended(self) -> bool | None:
        """True: the model ended the answer ("stop"); False: cut off at max_tokens ("length");
        None: not known (an imported pair, an older event). The trainer's one reading of it."""
        return {"stop": True, "length": False}.get(self.finish_reason or "")


def ended_gap(a: bool | None, b: bool | None) -> int:
    """ended(a) − ended(b) for two answers' `Answer.ended`: 1 when only a ended, −1 when only b did,
    0 when both or neither did or either is not known (None)."""
    return 0 if a is None or b is None else int(a) - int(b)


class PreferenceEvent(BaseModel):
    """Schema v1 (ARCHITECTURE.md): one vote, with everything needed to learn from it."""

    model_config = ConfigDict(extra="forbid")
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    schema_version: Literal[1] = SCHEMA_VERSION
    comparison_id: str = Field(min_length=1, max_length=200)
    user: str = Field(min_length=1, max_length=200, description="pseudonymous id, never the key")
    served_at: datetime
    voted_at: datetime = Field(default_factory=utcnow)
    messages: Annotated[list[Message], Field(min_length=1)]
    answers: Annotated[list[Answer], Field(min_length=2, max_length=2)]
    choice: Choice
    reason: str | None = Field(default=None, max_length=2000)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    def conversation(self) -> list[dict[str, str]]:
        """The messages as a chat template reads them: role and content."""
        return [{"role": m.role, "content": m.content} for m in self.messages]

    def ranked(self) -> tuple[Answer, Answer] | None:
        """(chosen, rejected) as the user voted; None for a tie or both-bad, which order nothing."""
        if not isinstance(self.choice, int):
            return None
        return self.answers[self.choice], self.answers[1 - self.choice]


class InvalidEvent(ValueError):
    """A message on a topic that is not a valid event; the reason says why."""


def parse_preference(raw: bytes) -> PreferenceEvent:
    """Decode and validate one message value, or raise InvalidEvent with the reason."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidEvent("not a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        shown = version if isinstance(version, int | None) else type(version).__name__
        raise InvalidEvent(f"unknown schema_version {shown!r} (this consumer reads {SCHEMA_VERSION})")
    try:
        return PreferenceEvent.model_validate(data)
    except ValidationError as exc:
        # without the offending values: a reason is logged and kept, and values are message text
        raise InvalidEvent(f"invalid event: {exc.errors(include_url=False, include_input=False)}") from exc
