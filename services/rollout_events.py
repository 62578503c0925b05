"""The rollout's side of `kaizen.model-events`: it emits without waiting, and follows to wake up.

The rollout (services/rollout.py) announces what it did (a swap, a refused version, a canary, a
promotion, a rollback) on `kaizen.model-events` in a background thread, so a missing broker never
holds up a request or a swap. It also reads the topic from its end (`ModelEventFollower`): every
event another process published (the trainer's new candidate, an operator's promotion through
another replica) wakes the reconcile loop at once instead of at the next registry poll.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from kaizen.core import model_events
from kaizen.core.settings import Settings

log = logging.getLogger(__name__)


def emit_in_background(settings: Settings, type_: Any, version: str | None, **details: Any) -> None:
    """Model events never hold up a request or a swap (a missing broker would, for seconds)."""
    threading.Thread(target=model_events.emit, args=(settings, type_, version), kwargs=details,
                     name="kaizen-model-event", daemon=True).start()


class ModelEventFollower(threading.Thread):
    """Reads `kaizen.model-events` from the end (no consumer group) and wakes the reconcile loop."""

    def __init__(self, settings: Settings, on_event: Any) -> None:
        super().__init__(name="kaizen-model-events", daemon=True)
        self.settings, self.on_event = settings, on_event
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        s = self.settings
        backoff = s.model_events_backoff_min_s
        while not self._stop.is_set():
            consumer = None
            try:
                consumer = KafkaConsumer(
                    **s.kafka_options(), client_id="kaizen-chat-model-events",
                    group_id=None, enable_auto_commit=False, request_timeout_ms=s.kafka_request_timeout_ms,
                    metadata_max_age_ms=s.kafka_metadata_max_age_ms)
                parts = consumer.partitions_for_topic(s.topic_model_events)
                if not parts:
                    raise RuntimeError(f"topic {s.topic_model_events} not found yet")
                tps = [TopicPartition(s.topic_model_events, p) for p in sorted(parts)]
                consumer.assign(tps)
                consumer.seek_to_end(*tps)
                backoff = s.model_events_backoff_min_s
                while not self._stop.is_set():
                    batch = consumer.poll(timeout_ms=500)
                    events = [model_events.parse(r.value) for recs in batch.values() for r in recs]
                    if events:
                        log.info("model events: %s", ", ".join(f"{e.type} {e.version}" for e in events if e))
                        self.on_event()
            except Exception as exc:  # noqa: BLE001 - the registry poll covers the gap
                log.warning("model-event follower: %s (retrying in %.1f s)", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, s.model_events_backoff_max_s)
            finally:
                if consumer is not None:
                    consumer.close()
