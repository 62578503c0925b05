"""The outbox relay against a real broker, including one that restarts and forgets."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from kaizen.core.broker import ensure_topics, start_embedded_broker
from services.comparisons import ComparisonStore, OutboxFull
from kaizen.core.events import Answer, PreferenceEvent
from services.outbox import OutboxRelay
from kaizen.core.settings import Settings
from tests.conftest import free_port, make_settings


def read_topic(settings: Settings, expect: int, timeout_s: float = 30) -> list[PreferenceEvent]:
    consumer = KafkaConsumer(settings.topic_preferences, bootstrap_servers=settings.bootstrap_servers,
                             auto_offset_reset="earliest", group_id=f"reader-{uuid.uuid4().hex[:6]}",
                             session_timeout_ms=settings.kafka_session_timeout_ms,
                             max_poll_interval_ms=settings.kafka_max_poll_interval_ms)
    got: list[PreferenceEvent] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < expect and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=300).values():
                got.extend(PreferenceEvent.model_validate_json(r.value) for r in records)
        time.sleep(0.5)  # anything beyond `expect` would be a double
        for records in consumer.poll(timeout_ms=300).values():
            got.extend(PreferenceEvent.model_validate_json(r.value) for r in records)
    finally:
        consumer.close()
    return got


def vote_n(store: ComparisonStore, n: int) -> list[PreferenceEvent]:
    answers = [Answer(text="a", model_version="v0"), Answer(text="b", model_version="v0")]
    events = []
    for i in range(n):
        cid = store.record("u-1", [{"role": "user", "content": f"q{i}"}], answers)
        events.append(store.vote(cid, "u-1", i % 2, None))  # type: ignore[arg-type]
    return events


def wait_until(predicate, timeout_s: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_relay_survives_a_broker_that_restarts_empty(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, outbox_check_interval_s=0.5, outbox_poll_interval_s=0.1,
                             outbox_backoff_max_s=1.0)
    broker = start_embedded_broker(settings)
    ensure_topics(settings)
    store = ComparisonStore(settings.api_db, timedelta(hours=1))
    relay = OutboxRelay(settings, store)
    relay.start()
    try:
        first = vote_n(store, 30)
        relay.notify()
        wait_until(lambda: store.outbox_backlog()[0] == 0)
        assert {e.event_id for e in read_topic(settings, 30)} == {e.event_id for e in first}

        broker.kill()  # the in-memory log is gone
        broker.wait()
        second = vote_n(store, 20)  # accepted while the broker is down
        broker = start_embedded_broker(settings)  # back, empty, without topics
        wait_until(lambda: relay.resets >= 1 and store.outbox_backlog()[0] == 0, 60)
        on_topic = read_topic(settings, 50)
        # every vote is on the new log; delivery is at-least-once (a vote sent just after
        # the restart is sent again with the rest), and the store's event_id key makes
        # the effect exactly-once
        assert {e.event_id for e in on_topic} == {e.event_id for e in first + second}
        by_id = {e.event_id: e for e in first + second}
        assert all(e == by_id[e.event_id] for e in on_topic)
    finally:
        relay.stop()
        broker.kill()
        broker.wait()
        store.close()


def test_the_relay_stops_within_its_timeouts_while_no_broker_answers(tmp_path: Path) -> None:
    """Stopping the chat API while Kafka was down took a minute: kafka-python waits 30 s to bootstrap
    whatever the caller's timeout, and the relay's thread, then its final flush, each waited that long
    (the pod's grace period is 30 s: it was SIGKILLed). Now each connection attempt waits what its
    caller allows, and stop() returns within about timeout_s + flush_s; the votes stay in the outbox."""
    settings = make_settings(tmp_path, broker_port=free_port(), kafka_request_timeout_ms=2000,  # nothing there
                             outbox_backoff_max_s=0.5)
    store = ComparisonStore(settings.api_db, timedelta(hours=1))
    relay = OutboxRelay(settings, store)
    try:
        waiting = vote_n(store, 3)
        relay.start()
        time.sleep(1.0)  # the thread is trying to reach the broker
        started = time.monotonic()
        relay.stop(timeout_s=4, flush_s=2)
        took = time.monotonic() - started
        assert took < 4 + 2 + 3, f"stop() took {took:.1f} s"  # was 60 s
        assert [e.event_id for e in store.outbox_events()] == [e.event_id for e in waiting]  # nothing lost
    finally:
        store.close()


def test_full_outbox_refuses_votes_and_keeps_them_all(tmp_path: Path) -> None:
    store = ComparisonStore(tmp_path / "api.sqlite", timedelta(hours=1), max_pending=5)
    accepted = vote_n(store, 5)
    with pytest.raises(OutboxFull):
        vote_n(store, 1)
    assert [e.event_id for e in store.outbox_events()] == [e.event_id for e in accepted]
    # once delivered, there is room again
    store.mark_delivered([r.seq for r in store.pending(10)], {0: 4})
    assert len(vote_n(store, 1)) == 1
    store.close()


def test_one_users_votes_share_a_partition_in_order(tmp_path: Path, broker: Settings) -> None:
    """Preferences are keyed by the pseudonymous user: with several partitions each user's votes
    land on one of them, in the order they were accepted."""
    topic = f"kaizen.preferences.keyed-{uuid.uuid4().hex[:6]}"
    settings = make_settings(tmp_path, broker_port=broker.broker_port, topic_preferences=topic,
                             topic_partitions=4, outbox_poll_interval_s=0.1)
    ensure_topics(settings, [topic])
    store = ComparisonStore(settings.api_db, timedelta(hours=1))
    answers = [Answer(text="a", model_version="v0"), Answer(text="b", model_version="v0")]
    users = [f"user-{i}" for i in range(6)]
    accepted = [store.vote(store.record(u, [{"role": "user", "content": f"q{n}"}], answers), u, 0, None)
                for n in range(10) for u in users]
    relay = OutboxRelay(settings, store)
    try:
        while relay.deliver_once():
            pass
    finally:
        relay.stop()
        store.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=settings.bootstrap_servers,
                             auto_offset_reset="earliest", group_id=f"reader-{uuid.uuid4().hex[:6]}", consumer_timeout_ms=5000,
                             session_timeout_ms=settings.kafka_session_timeout_ms,
                             max_poll_interval_ms=settings.kafka_max_poll_interval_ms)
    records = list(consumer)
    consumer.close()
    assert len(records) == len(accepted)
    partitions: dict[str, set[int]] = {}
    by_partition: dict[int, list[PreferenceEvent]] = {}
    for r in records:
        event = PreferenceEvent.model_validate_json(r.value)
        assert r.key == event.user.encode()
        partitions.setdefault(event.user, set()).add(r.partition)
        by_partition.setdefault(r.partition, []).append(event)
    assert all(len(p) == 1 for p in partitions.values()), partitions
    assert len({p for ps in partitions.values() for p in ps}) > 1  # spread over partitions
    for events in by_partition.values():  # in each partition (offset order), each user's votes in order
        for u in users:
            mine = [e.event_id for e in events if e.user == u]
            assert mine == [e.event_id for e in accepted if e.user == u and e.event_id in mine]
    for u in users:
        assert sum(1 for r in records if r.key == u.encode()) == 10
