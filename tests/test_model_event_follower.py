"""The chat API's model-event follower (services/rollout_events.py, ModelEventFollower) backs off on its
own settings, not the vote outbox's.

    python -m pytest tests/test_model_event_follower.py -q
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import kafka
import pytest

from kaizen.core import model_events
from services.rollout_events import ModelEventFollower
from tests.conftest import free_port, make_settings


class CountedStop(threading.Event):
    """The follower's stop flag, recording each back-off wait; set after `limit` of them."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.waits = limit, list[float | None]()

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        if len(self.waits) >= self.limit:
            self.set()
        return self.is_set()


def test_follower_backs_off_on_its_own_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tmp_path, outbox_backoff_min_s=100.0, outbox_backoff_max_s=100.0,
                             model_events_backoff_min_s=0.01, model_events_backoff_max_s=0.04)

    def no_broker(*_args: object, **_kwargs: object) -> None:
        raise kafka.errors.NoBrokersAvailable()

    monkeypatch.setattr(kafka, "KafkaConsumer", no_broker)  # every connection attempt fails at once
    follower = ModelEventFollower(settings, on_event=lambda: None)
    stop = CountedStop(limit=4)
    follower._stop = stop
    follower.run()  # in this thread: returns once the flag is set
    assert stop.waits == [0.01, 0.02, 0.04, 0.04]


def test_an_event_emitted_while_no_broker_answers_waits_only_its_timeout(tmp_path: Path) -> None:
    """emit(timeout_s=5) took 30 s while Kafka was down (kafka-python's own bootstrap wait), in the
    trainer's round after the gate and in `kaizen models import`. Nothing listens on the port: a real
    outage, not a fake client."""
    settings = make_settings(tmp_path, broker_port=free_port())
    started = time.monotonic()
    event = model_events.emit(settings, "promoted", "v3", timeout_s=2.0)
    took = time.monotonic() - started
    assert took < 2.0 + 3, f"emit took {took:.1f} s"  # was 30 s
    assert (event.type, event.version) == ("promoted", "v3")  # best effort: logged, never raised
