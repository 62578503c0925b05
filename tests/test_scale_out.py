"""Three API replicas behind a round-robin nginx behave as one service.

    .venv/bin/python -m pytest tests/test_scale_out.py -q

Real parts: a PostgreSQL server (Debian's package, a temp dir, a loopback port),
the embedded broker, three `kaizen serve` processes on the tiny model sharing
that database and one registry folder, nginx in front, and the trainer's own
consumer writing the preference store. Pairs and votes go through the proxy,
so a vote usually reaches another replica than the one that served its pair.

In order: 60 pairs and votes → 60 votes in the preference store, none lost or
doubled; a second vote on each → 409 wherever it lands; a canary judged from
votes that arrive on all three replicas → one decision, applied by all three;
one replica SIGKILLed while votes flow → every vote answered 202 is stored.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from kaizen.core.registry import Registry
from kaizen.core.settings import Settings
from tests.conftest import ADMIN_TOKEN, ROOT, free_port, make_settings, stop_group, wait_http
from tests.lb import start_nginx, stop_nginx
from tests.pg import postgres_server
from tests.test_rollout import make_version

pytestmark = pytest.mark.slow

REPLICAS = 3
KEYS = [f"scale-user-{i:02d}" for i in range(12)]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def auth(i: int) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[i % len(KEYS)]}"}


class Cluster:
    """The replicas, the proxy and the preference store of this module."""

    def __init__(self, db_url: str, proxy: str, replicas: list[tuple[Settings, subprocess.Popen[bytes]]],
                 prefs: Path) -> None:
        self.db_url, self.proxy, self.replicas, self.prefs = db_url, proxy, replicas, prefs

    def base(self, i: int) -> str:
        return f"http://127.0.0.1:{self.replicas[i][0].port}"

    def stored(self) -> list[tuple[str, str]]:
        """(comparison_id, event_id) of every vote in the preference store."""
        if not self.prefs.exists():
            return []
        with sqlite3.connect(self.prefs) as db:
            return db.execute("SELECT comparison_id, event_id FROM preferences").fetchall()

    def wait_stored(self, ids: set[str], timeout_s: float = 90) -> list[tuple[str, str]]:
        deadline = time.monotonic() + timeout_s
        while True:
            rows = [r for r in self.stored() if r[0] in ids]
            if {r[0] for r in rows} >= ids or time.monotonic() > deadline:
                time.sleep(1.0)  # anything beyond would be a double
                return [r for r in self.stored() if r[0] in ids]
            time.sleep(0.3)

    def versions(self, cid: str) -> tuple[str, str]:
        with psycopg.connect(self.db_url) as conn:
            row = conn.execute("SELECT version_a, version_b FROM comparisons WHERE id = %s",
                               (cid,)).fetchone()
        assert row is not None, cid
        return row[0], row[1]


def pair(http: httpx.Client, proxy: str, i: int) -> tuple[str, str]:
    """A forced pair through the proxy: (comparison_id, replica that served it)."""
    r = http.post(f"{proxy}/v1/chat/completions", headers=auth(i), json={
        "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 4, "comparison": "force"})
    assert r.status_code == 200, r.text
    return r.json()["comparison_id"], r.headers["x-kaizen-upstream"]


class PreferenceConsumerThread(threading.Thread):
    """The trainer's consumer (trainer/consumer.py) into its SQLite store, as `kaizen train` runs it."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings, self.stop_flag = settings, threading.Event()

    def run(self) -> None:
        from trainer.consumer import PreferenceConsumer
        from trainer.store import PreferenceStore

        store = PreferenceStore(self.settings.preferences_db)
        consumer = PreferenceConsumer(self.settings, store)
        try:
            while not self.stop_flag.is_set():
                consumer.poll_once()
        finally:
            consumer.close()
            store.close()


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, broker: Settings,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("scale-out")
    suffix = uuid.uuid4().hex[:6]
    common: dict[str, Any] = dict(
        model=tiny_model, broker_port=broker.broker_port, registry_dir=root / "registry",
        api_keys=",".join(KEYS), admin_token=ADMIN_TOKEN, user_id_secret="one-secret-for-all-replicas",
        rate_limit_rps=1000, rate_limit_burst=1000, auto_rollout=True, canary_fraction=0.5,
        canary_min_votes=10, registry_poll_interval_s=0.5, rollout_lease_s=3.0, topic_partitions=3,
        topic_preferences=f"kaizen.preferences.scale-{suffix}",
        topic_model_events=f"kaizen.model-events.scale-{suffix}",
        outbox_poll_interval_s=0.2, consumer_group=f"scale-{suffix}")
    with postgres_server() as pg:
        procs: list[tuple[Settings, subprocess.Popen[bytes]]] = []
        nginx = None
        consumer = None
        try:
            for i in range(REPLICAS):  # started together: three engines on two cores start slowly
                s = make_settings(root / f"replica-{i}", database_url=pg.url, **common)
                s.data_dir.mkdir(parents=True)
                with open(s.data_dir / "serve.log", "wb") as log:
                    procs.append((s, subprocess.Popen(
                        [sys.executable, "-m", "kaizen", "serve"], env=s.child_env(), cwd=ROOT, stdout=log,
                        stderr=subprocess.STDOUT, start_new_session=True)))
            for s, proc in procs:
                try:
                    wait_http(f"http://127.0.0.1:{s.port}/readyz", 480, proc)
                except Exception:
                    print((s.data_dir / "serve.log").read_text()[-5000:])
                    raise
            port = free_port()
            nginx = start_nginx(root / "nginx", port, [s.port for s, _ in procs])
            trainer = make_settings(root / "trainer", **common)
            consumer = PreferenceConsumerThread(trainer)
            consumer.start()
            yield Cluster(pg.url, f"http://127.0.0.1:{port}", procs, trainer.preferences_db)
        finally:
            if consumer is not None:
                consumer.stop_flag.set()
                consumer.join(30)
            if nginx is not None:
                stop_nginx(nginx)
            for _, proc in procs:
                stop_group(proc, grace_s=10)


def test_sixty_votes_through_the_proxy_are_stored_once(cluster: Cluster) -> None:
    with httpx.Client(timeout=120) as http:
        with ThreadPoolExecutor(4) as pool:
            pairs = list(pool.map(lambda i: pair(http, cluster.proxy, i), range(60)))
        http.get(f"{cluster.proxy}/healthz")  # shifts round robin by one: a vote goes elsewhere than its pair
        moved = 0
        for i, (cid, served_by) in enumerate(pairs):
            r = http.post(f"{cluster.proxy}/v1/feedback", headers=auth(i),
                          json={"comparison_id": cid, "choice": i % 2})
            assert r.status_code == 202, r.text
            moved += r.headers["x-kaizen-upstream"] != served_by
    assert len({s for _, s in pairs}) == REPLICAS  # round robin: every replica served pairs
    assert moved >= 20, moved  # most votes reached another replica than the one that served the pair
    ids = {cid for cid, _ in pairs}
    rows = cluster.wait_stored(ids)
    assert len(rows) == 60 and {r[0] for r in rows} == ids  # none lost, none doubled

    # a second vote on each comparison, through whichever replica → 409
    with httpx.Client(timeout=60) as http:
        again = [http.post(f"{cluster.proxy}/v1/feedback", headers=auth(i),
                           json={"comparison_id": cid, "choice": 0}) for i, (cid, _) in enumerate(pairs)]
    assert [r.status_code for r in again] == [409] * 60, [r.text for r in again if r.status_code != 409][:3]
    assert len({r.headers["x-kaizen-upstream"] for r in again}) == REPLICAS
    assert len(cluster.wait_stored(ids, timeout_s=2)) == 60


def serving(cluster: Cluster, i: int) -> dict[str, Any]:
    """What replica i serves (the operators' route: probes name no versions)."""
    # /admin/rollout also reads the head-to-head and every replica's health from the store: not 5 s
    # on a machine busy starting three canary engines
    return dict(httpx.get(f"{cluster.base(i)}/admin/rollout", headers=ADMIN, timeout=60).json()["serving"])


def test_a_canary_is_decided_once_and_applied_by_every_replica(
        cluster: Cluster, tiny_model: Path, tmp_path: Path) -> None:
    settings = cluster.replicas[0][0]
    Registry(settings.registry_path).publish(make_version(tiny_model, tmp_path / "v1", seed=301), parent="v0",
                                             who="trainer", why="round 1")
    deadline = time.monotonic() + 240  # each replica starts a canary engine beside its champion
    while True:
        ready = [serving(cluster, i) for i in range(REPLICAS)]
        if all(r["canary"] == "v1" for r in ready):
            break
        assert time.monotonic() < deadline, ready
        time.sleep(0.5)
    voted_on: Counter[str] = Counter()
    with httpx.Client(timeout=120) as http:
        for i in range(40):
            cid, _ = pair(http, cluster.proxy, i)
            versions = cluster.versions(cid)
            if set(versions) != {"v0", "v1"}:
                break  # decided: pairs are no longer champion vs canary
            r = http.post(f"{cluster.proxy}/v1/feedback", headers=auth(i),
                          json={"comparison_id": cid, "choice": versions.index("v1")})
            assert r.status_code == 202, r.text
            voted_on[r.headers["x-kaizen-upstream"]] += 1
    assert len(voted_on) == REPLICAS and sum(voted_on.values()) >= 10, voted_on
    deadline = time.monotonic() + 120
    while True:
        ready = [serving(cluster, i) for i in range(REPLICAS)]
        if all(r["champion"] == "v1" and r["canary"] is None for r in ready):
            break
        assert time.monotonic() < deadline, ready
        time.sleep(0.5)
    audit = httpx.get(f"{cluster.proxy}/admin/audit", headers=ADMIN).json()["data"]
    decisions = [(e["action"], e["version"], e["who"]) for e in audit
                 if e["action"] in ("canary", "promote", "rollback")]
    assert sorted(decisions) == [("canary", "v1", "auto"), ("promote", "v1", "auto")], decisions
    leaders = [httpx.get(f"{cluster.base(i)}/metrics/").text.count("kaizen_rollout_leader 1.0")
               for i in range(REPLICAS)]
    assert sum(leaders) == 1, leaders  # one replica decides; the others follow
    statuses = [httpx.get(f"{cluster.base(i)}/admin/rollout", headers=ADMIN).json() for i in range(REPLICAS)]
    assert {s["decision"]["leader"] for s in statuses} == {statuses[0]["decision"]["leader"]}


def test_a_replica_killed_mid_stream_loses_no_accepted_vote(cluster: Cluster) -> None:
    with httpx.Client(timeout=120) as http:
        with ThreadPoolExecutor(4) as pool:
            ids = [cid for cid, _ in pool.map(lambda i: pair(http, cluster.proxy, i), range(60))]
    accepted: dict[str, str] = {}  # comparison_id -> event_id of a 202
    conflicts: set[str] = set()  # 409 on a retry: an earlier attempt was accepted, its answer lost
    unexpected: list[str] = []
    done = threading.Semaphore(0)

    def vote(chunk: list[tuple[int, str]]) -> None:
        with httpx.Client(timeout=30) as http:
            for i, cid in chunk:
                for _ in range(50):
                    try:
                        r = http.post(f"{cluster.proxy}/v1/feedback", headers=auth(i),
                                      json={"comparison_id": cid, "choice": "tie"})
                    except httpx.HTTPError:
                        time.sleep(0.2)
                        continue
                    if r.status_code == 202:
                        accepted[cid] = r.json()["event_id"]
                        break
                    if r.status_code == 409:
                        conflicts.add(cid)
                        break
                    if r.status_code not in (502, 503, 504):
                        unexpected.append(f"{r.status_code} {r.text[:200]}")
                        break
                    time.sleep(0.2)
                done.release()

    items = list(enumerate(ids))
    threads = [threading.Thread(target=vote, args=(items[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for _ in range(20):
        done.acquire()
    victim = cluster.replicas[REPLICAS - 1][1]
    os.killpg(victim.pid, signal.SIGKILL)  # mid-stream: no flush, no goodbye
    victim.wait()
    for t in threads:
        t.join(120)
    assert not unexpected, unexpected
    assert set(accepted) | conflicts == set(ids)
    rows = cluster.wait_stored(set(ids))
    stored = {event_id for _, event_id in rows}
    assert set(accepted.values()) <= stored  # every vote that got a 202 is in the preference store
    assert len(rows) == len({cid for cid, _ in rows}) == 60  # one per comparison, none doubled
