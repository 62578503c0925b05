"""Trainer consumer against the real broker and a real SQLite store."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer

from kaizen.core.broker import ensure_topics
from kaizen.core.events import Answer, Message, PreferenceEvent
from kaizen.core.settings import Settings
from trainer import daemon
from trainer.consumer import PreferenceConsumer
from trainer.store import PreferenceStore


def make_event(choice: object = 0) -> PreferenceEvent:
    return PreferenceEvent(
        comparison_id=f"cmp-{uuid.uuid4().hex[:8]}", user="u-test", served_at=datetime.now(UTC),
        messages=[Message(role="user", content="What is 2+2?")],
        answers=[Answer(text="4", model_version="v0"), Answer(text="5", model_version="v0")],
        choice=choice,  # type: ignore[arg-type]
    )


def isolated(broker: Settings, tmp_path: Path) -> Settings:
    """Own topics and group, so tests do not see each other's events."""
    tag = uuid.uuid4().hex[:8]
    return broker.model_copy(update={
        "data_dir": tmp_path, "consumer_group": f"trainer-{tag}",
        "topic_preferences": f"prefs.{tag}", "topic_preferences_dlq": f"prefs.{tag}.dlq",
        "topic_model_events": f"models.{tag}",
    })


def send(settings: Settings, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    futures = [producer.send(settings.topic_preferences, key=b"k", value=v) for v in values]
    producer.flush()
    for f in futures:
        f.get(timeout=60)  # a send that failed must fail the test here, not look like a lost event
    producer.close()


def test_consumer_stores_dedups_and_dead_letters(broker: Settings, tmp_path: Path) -> None:
    settings = isolated(broker, tmp_path)
    good = [make_event(0), make_event("tie")]
    bad = [b"{not json", json.dumps({"schema_version": 99}).encode(),
           json.dumps({**json.loads(good[0].to_bytes()), "choice": "maybe"}).encode()]
    late = make_event(1)
    # a duplicate of good[0] (same event_id) sits between malformed events; a valid one behind them
    values = [good[0].to_bytes(), bad[0], good[1].to_bytes(), bad[1], good[0].to_bytes(), bad[2], late.to_bytes()]
    ensure_topics(settings)
    send(settings, values)

    assert daemon.run(settings, once=True) == 3
    store = PreferenceStore(settings.preferences_db)
    try:
        assert store.count() == 3
        assert store.get(str(good[0].event_id)) == good[0]  # stored field for field
        assert store.get(str(late.event_id)) == late
        assert store.stats()["by_choice"] == {"0": 1, "tie": 1, "1": 1}
    finally:
        store.close()

    dlq = KafkaConsumer(settings.topic_preferences_dlq, bootstrap_servers=settings.bootstrap_servers,
                        auto_offset_reset="earliest", group_id=f"dlq-{uuid.uuid4().hex[:6]}",
                        session_timeout_ms=settings.kafka_session_timeout_ms,
                        max_poll_interval_ms=settings.kafka_max_poll_interval_ms)
    dead: list[dict[str, object]] = []
    deadline = time.monotonic() + 30
    while len(dead) < 3 and time.monotonic() < deadline:
        for records in dlq.poll(timeout_ms=500).values():
            dead.extend(json.loads(r.value) for r in records)
    dlq.close()
    assert [d["raw"] for d in dead] == [v.decode() for v in bad]
    assert "not JSON" in str(dead[0]["reason"])
    assert "schema_version 99" in str(dead[1]["reason"])
    assert "choice" in str(dead[2]["reason"])

    # offsets were committed: a second pass finds nothing new, and a redelivery would be a no-op
    assert daemon.run(settings, once=True) == 0


def test_redelivered_batch_is_not_doubled(broker: Settings, tmp_path: Path) -> None:
    settings = isolated(broker, tmp_path)
    ensure_topics(settings)
    events = [make_event(0) for _ in range(4)]
    send(settings, [e.to_bytes() for e in events])
    store = PreferenceStore(settings.preferences_db)
    # crash after the store commit, before the offset commit: simulated by a consumer
    # whose commit is skipped (a real crash at that point cannot be timed from a test)
    first = PreferenceConsumer(settings, store)
    first.consumer.commit = lambda *a, **k: None  # type: ignore[method-assign]
    deadline = time.monotonic() + 30
    while first.stats.stored < 4 and time.monotonic() < deadline:
        first.poll_once()
    first.close()
    assert store.count() == 4
    again = PreferenceConsumer(settings, store)
    deadline = time.monotonic() + 30
    while again.stats.duplicates < 4 and time.monotonic() < deadline:
        again.poll_once()
    again.close()
    assert again.stats.duplicates == 4 and again.stats.stored == 0
    assert store.count() == 4
    store.close()


def test_a_stalled_consumer_is_replaced_and_an_idle_one_is_not(broker: Settings, tmp_path: Path) -> None:
    """The stall watchdog: a consumer that fetches nothing while its partition holds unread events
    is replaced by a new group member, which reads them; one with nothing to read stays.
    The stall is made with kafka-python's own `pause` (a client stuck in a rejoin cannot be timed
    from a test; the broker-restart test below meets it for real under load)."""
    settings = isolated(broker, tmp_path).model_copy(update={"kafka_stall_timeout_s": 2.0})
    ensure_topics(settings)
    store = PreferenceStore(settings.preferences_db)
    consumer = PreferenceConsumer(settings, store)
    try:
        first = [make_event(0) for _ in range(3)]
        send(settings, [e.to_bytes() for e in first])
        deadline = time.monotonic() + 60
        while store.count() < 3 and time.monotonic() < deadline:
            consumer.poll_once()
        assert store.count() == 3
        idle_until = time.monotonic() + 5  # idle, all read: no replacement however long it waits
        while time.monotonic() < idle_until:
            consumer.poll_once()
        assert consumer.reopened == 0

        stuck = consumer.consumer
        stuck.pause(*stuck.assignment())
        later = [make_event(1) for _ in range(4)]
        send(settings, [e.to_bytes() for e in later])
        deadline = time.monotonic() + 90
        while store.count() < 7 and time.monotonic() < deadline:
            consumer.poll_once()
        assert consumer.reopened == 1 and consumer.consumer is not stuck
        assert store.count() == 7 and all(store.get(str(e.event_id)) == e for e in later)
    finally:
        consumer.close()
        store.close()


def test_consumer_reads_a_restarted_broker_from_the_start(tmp_path: Path) -> None:
    """After the in-memory broker restarts empty, a running consumer must not resume at
    its old position on the new log (that would skip the events now sitting below it).

    Under load, kafka-python sometimes rejoins the new broker with its old member id and then
    waits for an assignment that never comes (seen in 2 of 3 runs beside a busy CPU, each
    waiting out the whole 180 s); the consumer then replaces itself after
    `kafka_stall_timeout_s` (10 s here) and reads the new log from the start."""
    from kaizen.core.broker import start_embedded_broker
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, kafka_stall_timeout_s=10)
    broker = start_embedded_broker(settings)
    ensure_topics(settings)
    store = PreferenceStore(settings.preferences_db)
    consumer = PreferenceConsumer(settings, store)
    try:
        before = [make_event(0) for _ in range(30)]
        send(settings, [e.to_bytes() for e in before])
        deadline = time.monotonic() + 60
        while store.count() < 30 and time.monotonic() < deadline:
            consumer.poll_once()
        assert store.count() == 30

        broker.kill()
        broker.wait()
        broker = start_embedded_broker(settings)
        ensure_topics(settings)
        after = [make_event(1) for _ in range(60)]  # the new log grows past the old position
        send(settings, [e.to_bytes() for e in after])
        deadline = time.monotonic() + 180  # reconnect back-off grows to 30 s under load
        while store.count() < 90 and time.monotonic() < deadline:
            try:
                consumer.poll_once()
            except Exception:  # noqa: BLE001 - reconnecting to the new broker
                time.sleep(0.5)
        assert {str(e.event_id) for e in after} <= {r[0] for r in store.db.execute("SELECT event_id FROM preferences")}
    finally:
        consumer.close()
        store.close()
        broker.kill()
        broker.wait()
