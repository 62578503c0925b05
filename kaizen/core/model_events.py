"""Events on `kaizen.model-events`: published / canary / promoted / rolled_back / refused.

The registry is the truth; these events make everyone who follows it react
at once instead of at their next poll. Emitting is best effort (a broker
outage must not fail a publish or a promotion: readers poll the registry too).
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from kaizen.core.settings import Settings

log = logging.getLogger(__name__)

EventType = Literal["published", "rejected", "canary", "promoted", "rolled_back", "refused", "swapped"]
SCHEMA_VERSION = 1


class ModelEvent(BaseModel):
    event_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    schema_version: int = SCHEMA_VERSION
    type: EventType
    version: str | None
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    who: str = "system"
    details: dict[str, Any] = Field(default_factory=dict)


def emit(settings: Settings, type_: EventType, version: str | None, *, who: str = "system",
         timeout_s: float = 5.0, **details: Any) -> ModelEvent:
    """Send one event keyed by version; log (never raise) if Kafka cannot take it."""
    event = ModelEvent(type=type_, version=version, who=who, details=details)
    try:
        from kafka import KafkaProducer

        producer = KafkaProducer(
            **settings.kafka_options(bootstrap_timeout_s=timeout_s), client_id="kaizen-model-events", acks="all",
            request_timeout_ms=int(timeout_s * 1000), max_block_ms=int(timeout_s * 1000),
        )
        try:
            producer.send(settings.topic_model_events, key=(version or "").encode(),
                          value=event.model_dump_json().encode()).get(timeout=timeout_s)
        finally:
            producer.close(timeout=timeout_s)
        log.info("model event %s %s", type_, version)
    except Exception as exc:  # noqa: BLE001 - best effort by design, see module docstring
        log.warning("could not emit model event %s %s (%s); followers will see it at their next poll",
                    type_, version, exc)
    return event


def parse(raw: bytes) -> ModelEvent | None:
    try:
        return ModelEvent.model_validate(json.loads(raw))
    except (ValueError, TypeError):
        return None
