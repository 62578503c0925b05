"""Votes survive crashes of every part: nothing lost, nothing doubled.

Real processes (broker, `kaizen serve` on the tiny model, `kaizen train`), real
HTTP votes, SIGKILL for each in turn. Comparisons are seeded straight into the
API's SQLite store (the engine is not what is under test), votes go over HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from kafka import KafkaConsumer, KafkaProducer

from services.auth import user_id
from kaizen.core.broker import ensure_topics, start_embedded_broker
from services.comparisons import ComparisonStore
from kaizen.core.events import Answer
from kaizen.core.settings import Settings
from tests.conftest import ROOT, USER_KEY, make_settings, stop_group, wait_http
from tests.test_trainer_consumer import make_event
from trainer.store import PreferenceStore

N_VOTES = 2000
AUTH = {"Authorization": f"Bearer {USER_KEY}"}


def start(args: list[str], settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "kaizen", *args], env=settings.child_env(), cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class Voter(threading.Thread):
    """Votes on every comparison once, retrying through outages like a real client."""

    def __init__(self, base: str, ids: list[str]) -> None:
        super().__init__(daemon=True)
        self.base, self.ids = base, ids
        self.accepted: dict[str, str] = {}  # comparison_id -> event_id from a 202
        self.conflicts: set[str] = set()  # 409: accepted earlier, the 202 was lost in a crash
        self.unexpected: list[str] = []  # any other answer: the test fails with it
        self.done = 0

    def run(self) -> None:
        with httpx.Client(timeout=10) as http:
            for i, cid in enumerate(self.ids):
                while True:
                    try:
                        r = http.post(f"{self.base}/v1/feedback", headers=AUTH,
                                      json={"comparison_id": cid, "choice": [0, 1, "tie", "both_bad"][i % 4]})
                    except httpx.HTTPError:
                        time.sleep(0.2)
                        continue
                    if r.status_code == 202:
                        self.accepted[cid] = r.json()["event_id"]
                        break
                    if r.status_code == 409:
                        self.conflicts.add(cid)
                        break
                    if r.status_code not in (429, 503):
                        self.unexpected.append(f"{cid}: {r.status_code} {r.text[:200]}")
                        break
                    time.sleep(0.2)
                self.done = i + 1


def wait_until(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_no_vote_lost_or_doubled_across_crashes(tiny_model: Path, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", model=tiny_model, api_keys=USER_KEY,
                             user_id_secret="fault-test-secret", rate_limit_rps=10_000, rate_limit_burst=10_000,
                             vote_limit_per_window=1_000_000,  # one key casts every vote: not what this tests
                             outbox_check_interval_s=1.0, outbox_poll_interval_s=0.2, outbox_backoff_max_s=1.0)
    logs = tmp_path / "logs"
    logs.mkdir()
    user = user_id(b"fault-test-secret", USER_KEY)
    seed = ComparisonStore(settings.api_db, timedelta(hours=1))
    answers = [Answer(text="left", model_version="v0"), Answer(text="right", model_version="v0")]
    ids = [seed.record(user, [{"role": "user", "content": f"question {i}"}], answers) for i in range(N_VOTES)]
    seed.close()

    broker = start_embedded_broker(settings)
    ensure_topics(settings)
    api = start(["serve"], settings, logs / "api.log")
    trainer = start(["train"], settings, logs / "trainer.log")
    base = f"http://127.0.0.1:{settings.port}"
    voter = Voter(base, ids)
    try:
        wait_http(f"{base}/readyz", 240, api)
        voter.start()

        wait_until(lambda: voter.done >= 400, 120, "400 votes")
        broker.kill()
        broker.wait()
        time.sleep(1)
        broker = start_embedded_broker(settings)

        wait_until(lambda: voter.done >= 900, 120, "900 votes")
        kill(api)
        api = start(["serve"], settings, logs / "api.log")

        wait_until(lambda: voter.done >= 1400, 240, "1400 votes")
        kill(trainer)
        trainer = start(["train"], settings, logs / "trainer.log")

        voter.join(240)
        assert not voter.is_alive()
        assert voter.unexpected == []

        def stored() -> int:
            store = PreferenceStore(settings.preferences_db)
            try:
                return store.count()
            finally:
                store.close()

        def diagnosis() -> str:
            api_store = ComparisonStore(settings.api_db, timedelta(hours=1))
            pending, _ = api_store.outbox_backlog()
            marks = api_store.max_acked_offsets()
            api_store.close()
            return f"the store to hold every vote: has {stored()}, outbox pending {pending}, acked marks {marks}"

        wait_until(lambda: stored() >= N_VOTES, 180, diagnosis)
        time.sleep(3)  # anything late would be a double

        api_store = ComparisonStore(settings.api_db, timedelta(hours=1))
        accepted = {e.comparison_id: e for e in api_store.outbox_events()}
        api_store.close()
        store = PreferenceStore(settings.preferences_db)
        try:
            assert store.count() == N_VOTES == len(accepted)
            assert set(voter.accepted) | voter.conflicts == set(ids)
            for cid, event in accepted.items():
                assert store.get(str(event.event_id)) == event  # field for field
                if cid in voter.accepted:
                    assert voter.accepted[cid] == str(event.event_id)
            rows = store.db.execute("SELECT COUNT(DISTINCT comparison_id) FROM preferences").fetchone()[0]
            assert rows == N_VOTES  # no comparison voted twice
        finally:
            store.close()
    finally:
        for proc in (api, trainer):
            stop_group(proc)
        broker.kill()
        broker.wait()
        for f in logs.iterdir():
            print(f"--- {f.name}\n{f.read_text()[-3000:]}")


def test_malformed_events_go_to_the_dlq_and_valid_ones_behind_them_are_stored(
    broker: Settings, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    settings = broker.model_copy(update={
        "data_dir": tmp_path, "consumer_group": f"faults-{tag}", "topic_preferences": f"prefs.{tag}",
        "topic_preferences_dlq": f"prefs.{tag}.dlq"})
    ensure_topics(settings)
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    valid = [make_event(i % 2) for i in range(10)]
    for i in range(200):
        junk = [b"", b"[]", b"\xff\xfe", json.dumps({"schema_version": 1, "choice": 0}).encode()][i % 4]
        producer.send(settings.topic_preferences, value=junk)
    for ev in valid:
        producer.send(settings.topic_preferences, value=ev.to_bytes())
    producer.flush()
    producer.close()

    proc = start(["train"], settings.model_copy(update={"trainer_port": make_settings(tmp_path).trainer_port}),
                 tmp_path / "trainer.log")
    try:
        def stored_ids() -> set[str]:
            store = PreferenceStore(settings.preferences_db)
            try:
                return {r[0] for r in store.db.execute("SELECT event_id FROM preferences")}
            finally:
                store.close()

        wait_until(lambda: stored_ids() == {str(e.event_id) for e in valid}, 90, "the valid events")
    finally:
        stop_group(proc)
    dlq = KafkaConsumer(settings.topic_preferences_dlq, bootstrap_servers=settings.bootstrap_servers,
                        auto_offset_reset="earliest", group_id=f"dlq-{tag}",
                        session_timeout_ms=settings.kafka_session_timeout_ms,
                        max_poll_interval_ms=settings.kafka_max_poll_interval_ms)
    dead = []
    deadline = time.monotonic() + 30
    while len(dead) < 200 and time.monotonic() < deadline:
        for records in dlq.poll(timeout_ms=500).values():
            dead.extend(json.loads(r.value) for r in records)
    dlq.close()
    assert len(dead) == 200 and all(d["reason"] for d in dead)
