"""#19 item 13 (personal data): retention for every place that keeps message text, also while
Kafka is down; `kaizen prefs erase --user` removes one user's data everywhere it is kept; no
message text in dead-letter log lines. Real SQLite stores, the real broker, the real CLI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kafka import KafkaConsumer
from sqlalchemy import func, select

from services import db
from services.auth import user_id
from kaizen.core.broker import ensure_topics, topic_configs
from services.comparisons import ComparisonStore
from kaizen.core.events import Answer, PreferenceEvent
from services.outbox import OutboxRelay
from kaizen.core.settings import Settings
from tests.conftest import ROOT, free_port
from tests.test_trainer_consumer import isolated, make_event, send
from trainer.consumer import PreferenceConsumer
from trainer.store import PreferenceStore

SECRET = "a-32-byte-user-id-secret-for-tests"


def vote(store: ComparisonStore, user: str, text: str) -> PreferenceEvent:
    cid = store.record(user, [{"role": "user", "content": text}],
                       [Answer(text=f"{text} A", model_version="v0"), Answer(text=f"{text} B", model_version="v1")])
    return store.vote(cid, user, 0, None)  # type: ignore[arg-type]


def rows(store: ComparisonStore, table: object, where: object = None) -> int:
    with store.transaction() as conn:
        query = select(func.count()).select_from(table)  # type: ignore[arg-type]
        return int(conn.execute(query if where is None else query.where(where)).scalar_one())


def test_prefs_erase_removes_one_user_everywhere_and_for_good(tmp_path: Path) -> None:
    """#19 item 13: `kaizen prefs erase --user <key>` deletes the user's comparisons, outbox votes
    (delivered or not) and stored preferences, leaves other users' alone, and the trainer's
    store refuses the user's earlier votes when Kafka delivers them again."""
    settings = Settings(data_dir=tmp_path, user_id_secret=SECRET)
    alice, bob = user_id(SECRET.encode(), "sk-alice"), user_id(SECRET.encode(), "sk-bob")
    comparisons = ComparisonStore.from_settings(settings)
    store = PreferenceStore(settings.preferences_db)
    try:
        alice_votes = [vote(comparisons, alice, f"alice's secret {i}") for i in range(3)]
        bob_votes = [vote(comparisons, bob, "bob's question")]
        comparisons.record(alice, [{"role": "user", "content": "unvoted"}],
                           [Answer(text="x", model_version="v0"), Answer(text="y", model_version="v0")])
        delivered = comparisons.pending(10)[:2]  # two of the outbox rows already went to Kafka
        comparisons.mark_delivered([r.seq for r in delivered], {})
        assert store.add_many(bob_votes + alice_votes).stored == 4  # an erased row is the newest
        mark = store.last_rowid()

        proc = subprocess.run([sys.executable, "-m", "kaizen", "prefs", "erase", "--user", "sk-alice"], cwd=ROOT,
                              env={**settings.child_env(), "KAIZEN_USER_ID_SECRET": SECRET},
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        report = json.loads(proc.stdout)
        assert report["user"] == alice
        assert report["deleted"] == {"comparisons": 4, "outbox_events": 3, "preferences": 3}

        c, o = db.comparisons, db.outbox
        assert rows(comparisons, c, c.c.user == alice) == 0
        assert rows(comparisons, o) == 1 and rows(comparisons, c) == 1  # bob's
        assert [e.comparison_id for e in comparisons.outbox_events()] == [bob_votes[0].comparison_id]
        assert store.count() == 1 and store.get(str(bob_votes[0].event_id)) is not None
        assert all(alice not in e.model_dump_json() for _, e in store.events_between(0))

        again = store.add_many(alice_votes)  # Kafka delivers them again (a consumer re-reads)
        assert (again.stored, again.erased) == (0, 3) and store.count() == 1
        # marks only grow: a vote after the erasure gets a row above every earlier mark
        later = vote(comparisons, alice, "a new question, after the erasure")
        assert store.add_many([later]).stored == 1
        assert [rowid for rowid, _ in store.events_between(mark)] == [mark + 1]

        # by pseudonym too, and the anonymous id of an open server is refused with a reason
        proc = subprocess.run([sys.executable, "-m", "kaizen", "prefs", "erase", "--user", bob], cwd=ROOT,
                              env=settings.child_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and json.loads(proc.stdout)["deleted"]["preferences"] == 1, proc.stderr
        proc = subprocess.run([sys.executable, "-m", "kaizen", "prefs", "erase", "--user", "anonymous"], cwd=ROOT,
                              env=settings.child_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "every caller" in proc.stderr
    finally:
        comparisons.close()
        store.close()


def test_retention_runs_while_kafka_is_down(tmp_path: Path) -> None:
    """#19 item 13: voted comparisons are deleted after `comparison_retention` and delivered
    outbox rows after `outbox_retention`, by the API's relay, even while no broker answers
    (the relay only pruned after a successful, idle delivery pass, and never voted comparisons)."""
    settings = Settings(data_dir=tmp_path, broker_port=free_port(),  # nothing listens there
                        comparison_retention=timedelta(0), outbox_retention=timedelta(0),
                        retention_check_interval_s=0.2, kafka_request_timeout_ms=1000,
                        outbox_backoff_max_s=0.5)
    store = ComparisonStore.from_settings(settings)
    relay = OutboxRelay(settings, store)
    try:
        delivered = vote(store, "u-" + "a" * 24, "old voted question")
        kept = vote(store, "u-" + "b" * 24, "vote still waiting for Kafka")
        seqs = [r.seq for r in store.pending(10) if r.comparison_id == delivered.comparison_id]
        store.mark_delivered(seqs, {})
        relay.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and rows(store, db.comparisons):
            time.sleep(0.2)
        assert rows(store, db.comparisons) == 0
        assert [r.comparison_id for r in store.pending(10)] == [kept.comparison_id]  # undelivered: kept
        assert [e.comparison_id for e in store.outbox_events()] == [kept.comparison_id]
    finally:
        relay.stop()
        store.close()


def test_trainer_store_retention(broker: Settings, tmp_path: Path) -> None:
    """#19 item 13: the trainer's consumer deletes votes past `preference_retention`."""
    settings = isolated(broker, tmp_path).model_copy(update={"preference_retention": timedelta(days=30)})
    store = PreferenceStore(settings.preferences_db)
    consumer = PreferenceConsumer(settings, store)
    try:
        old, new = make_event(0), make_event(1)
        store.add_many([old, new])
        store.db.execute("UPDATE preferences SET received_at = '2020-01-01T00:00:00.000Z' WHERE event_id = ?",
                         (str(old.event_id),))
        consumer.poll_once()
        assert store.get(str(old.event_id)) is None and store.get(str(new.event_id)) == new
        assert consumer.stats.pruned == 1
    finally:
        consumer.close()
        store.close()


def test_dead_letter_log_lines_carry_no_message_text(broker: Settings, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """#19 item 13: a malformed event's reason (logged, and kept in the DLQ record) names what is
    wrong without the text; the raw message stays only in the DLQ record, for its retention."""
    settings = isolated(broker, tmp_path)
    secret = f"my card number {uuid.uuid4().hex}"
    event = json.loads(make_event(0).to_bytes())
    event["messages"] = [{"content": secret}]  # no role: pydantic's error carries the dict as input
    ensure_topics(settings)
    send(settings, [json.dumps(event).encode()])
    store = PreferenceStore(settings.preferences_db)
    consumer = PreferenceConsumer(settings, store)
    try:
        with caplog.at_level(logging.DEBUG, logger="trainer"):
            deadline = time.monotonic() + 60
            while consumer.stats.dead_lettered == 0 and time.monotonic() < deadline:
                consumer.poll_once()
    finally:
        consumer.close()
        store.close()
    assert consumer.stats.dead_lettered == 1
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("trainer", "services", "kaizen")))
    assert "dead-lettering" in ours and "messages" in ours and secret not in ours
    dlq = KafkaConsumer(settings.topic_preferences_dlq, bootstrap_servers=settings.bootstrap_servers,
                        auto_offset_reset="earliest", consumer_timeout_ms=20_000)
    try:
        dead = json.loads(next(iter(dlq)).value)
    finally:
        dlq.close()
    assert secret not in dead["reason"] and secret in dead["raw"]


def test_topics_are_created_with_their_retention(broker: Settings, tmp_path: Path) -> None:
    """#19 item 13: Kaizen creates its topics with `retention.ms` from the settings (the DLQ's
    from `dlq_retention`). The embedded broker accepts topic configs but does not report them,
    so this checks the requests Kaizen sends; a real Kafka applies them."""
    settings = isolated(broker, tmp_path).model_copy(update={"dlq_retention": timedelta(hours=2)})
    assert topic_configs(settings, settings.topic_preferences_dlq) == {"retention.ms": str(2 * 3600 * 1000)}
    assert topic_configs(settings, settings.topic_preferences) == {"retention.ms": str(7 * 24 * 3600 * 1000)}
    assert set(ensure_topics(settings)) == {settings.topic_preferences, settings.topic_preferences_dlq,
                                            settings.topic_model_events}



def test_retention_deletes_a_backlog_in_short_transactions(tmp_path: Path) -> None:
    """#19 items 9 and 13: a retention pass over many rows deletes them `batch` at a time (so
    votes are written in between), and all of them."""
    store = ComparisonStore(tmp_path / "api.sqlite", timedelta(hours=1))
    try:
        for i in range(25):
            vote(store, f"u-{i:024x}", f"question {i}")
        seqs = [r.seq for r in store.pending(100)]
        store.mark_delivered(seqs, {})
        future = datetime.now(UTC) + timedelta(seconds=1)
        assert store.purge_voted(future, batch=10) == 25 and rows(store, db.comparisons) == 0
        assert store.prune_delivered(future, batch=7) == 25 and rows(store, db.outbox) == 0
    finally:
        store.close()
