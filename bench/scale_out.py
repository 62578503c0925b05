"""Votes per second through a load balancer: one API replica against three, on one PostgreSQL.

    python bench/scale_out.py --votes 3000 --clients 32

Starts a private PostgreSQL (tests/pg.py), the embedded broker, `kaizen train`
(rounds disabled: it only stores votes) and nginx in front of the replicas
(tests/lb.py, round robin). Each configuration gets its own fresh comparisons
(seeded straight into the shared database) and the same load generator as
bench/feedback.py (aiohttp, asyncio, `--clients` connections). Configurations,
in one run: 1 replica on SQLite (the default store, through the proxy), 1
replica on PostgreSQL, 3 replicas on PostgreSQL. Reports accepted votes/s,
request latency p50/p99 and how many votes reached the preference store.
A report, not a test: on one machine the replicas share its cores with the
load generator, the broker, PostgreSQL and nginx.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import free_port, percentile, provenance, start, stop, wait_ready  # noqa: E402
from bench.feedback import vote_all  # noqa: E402
from services.auth import user_id  # noqa: E402
from kaizen.core.broker import ensure_topics, start_embedded_broker  # noqa: E402
from services.comparisons import ComparisonStore  # noqa: E402
from kaizen.core.events import Answer  # noqa: E402
from services.models import build_tiny  # noqa: E402
from kaizen.core.settings import Settings  # noqa: E402
from kaizen.core.hardware import cpu_model  # noqa: E402

KEY = "bench-key"
from tests.lb import start_nginx, stop_nginx  # noqa: E402
from tests.pg import postgres_server  # noqa: E402


def seed(target: Path | str, n: int, tag: str) -> list[str]:
    store = ComparisonStore(target, timedelta(hours=1))
    user = user_id(b"bench", KEY)
    answers = [Answer(text="a", model_version="v0"), Answer(text="b", model_version="v0")]
    try:
        return [store.record(user, [{"role": "user", "content": f"{tag} q{i}"}], answers) for i in range(n)]
    finally:
        store.close()


def stored(prefs: Path, ids: set[str], timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    n = 0
    while time.monotonic() < deadline:
        if prefs.exists():
            with sqlite3.connect(prefs) as db:
                n = sum(1 for (c,) in db.execute("SELECT comparison_id FROM preferences") if c in ids)
            if n >= len(ids):
                break
        time.sleep(0.5)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--votes", type=int, default=3000, help="votes per configuration")
    ap.add_argument("--clients", type=int, default=32)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kaizen-bench-scale-"))
    base_settings = Settings(data_dir=tmp / "base", model=tmp / "tiny", broker_port=free_port())
    build_tiny(base_settings, tmp / "tiny")
    results: list[tuple[str, int, float, list[float], int]] = []
    with postgres_server() as pg:
        common = dict(model=tmp / "tiny", broker_port=base_settings.broker_port, api_keys=KEY,
                      user_id_secret="bench", rate_limit_rps=1e6, rate_limit_burst=10**6,
                      vote_limit_per_window=10**9,
                      engine_max_model_len=256, registry_dir=tmp / "registry", topic_partitions=3,
                      min_new_preferences=10**9,  # no training round: the trainer only stores votes
                      round_interval=timedelta(hours=250))  # child_env writes %g: keep it below 1e6 s
        broker = start_embedded_broker(base_settings)
        trainer_settings = Settings.model_validate({**common, "data_dir": tmp / "trainer",
                                                    "trainer_port": free_port()})
        ensure_topics(trainer_settings)
        trainer = start([sys.executable, "-m", "kaizen", "train"], trainer_settings.child_env(),
                        tmp / "trainer.log")
        try:
            configurations = (("1 replica, SQLite", 1, None), ("1 replica, PostgreSQL", 1, pg.url),
                              ("3 replicas, PostgreSQL", 3, pg.url))
            for name, replicas, database in configurations:
                results.append(run_configuration(name, replicas, database, common, tmp, args,
                                                 trainer_settings.preferences_db))
        finally:
            stop(trainer)
            broker.kill()
            broker.wait()
    report(results)


def run_configuration(name: str, replicas: int, database: str | None, common: dict[str, Any], tmp: Path,
                      args: argparse.Namespace,
                      preferences_db: Path) -> tuple[str, int, float, list[float], int]:
    """Start the replicas and nginx in front, seed comparisons, vote through the proxy: (name, votes,
    wall seconds, latencies, votes the trainer stored)."""
    tag = name.replace(" ", "").replace(",", "-")
    procs, ports = [], []
    for i in range(replicas):
        s = Settings.model_validate({**common, "data_dir": tmp / f"{tag}-{i}",
                                     "port": free_port(), "trainer_port": free_port(),
                                     "database_url": database})
        s.data_dir.mkdir(parents=True)
        procs.append(start([sys.executable, "-m", "kaizen", "serve"], s.child_env(),
                           s.data_dir / "serve.log"))
        ports.append(s.port)
    nginx = None
    try:
        for port, proc in zip(ports, procs, strict=True):
            wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
        ids = seed(database or tmp / f"{tag}-0" / "api.sqlite", args.votes, tag)
        proxy_port = free_port()
        nginx = start_nginx(tmp / f"nginx-{tag}", proxy_port, ports)
        print(f"{name}: {args.votes} votes with {args.clients} clients through nginx")
        proxy = f"http://127.0.0.1:{proxy_port}"
        votes = [(cid, KEY) for cid in ids]
        latencies, _, wall, errors = asyncio.run(vote_all(proxy, votes, args.clients))
        if errors:
            print(f"  {len(errors)} transport errors (not retried): {', '.join(sorted(set(errors))[:5])}")
        n_stored = stored(preferences_db, set(ids))
        return name, len(latencies), wall, latencies, n_stored
    finally:
        if nginx is not None:
            stop_nginx(nginx)
        for proc in procs:
            stop(proc)


def report(results: list[tuple[str, int, float, list[float], int]]) -> None:
    """The result lines (what bench/README.md records)."""
    print(f"\nscale-out benchmark ({provenance()}; {cpu_model()})")
    for name, n, wall, latencies, n_stored in results:
        print(f"  {name:<24} {n / wall:6.0f} votes/s ({n} in {wall:.2f} s), latency p50 "
              f"{percentile(latencies, 50) * 1000:.1f} ms, p99 {percentile(latencies, 99) * 1000:.1f} ms, "
              f"{n_stored}/{n} in the preference store")


if __name__ == "__main__":
    main()
