"""/healthz and vote latency while a canary is judged over a store of many voted rows.

    python bench/store_load.py --rows 1000000 --canary-rows 20000 --seconds 20

#19 item 9: the canary's judge reads every champion-vs-canary vote since the canary started,
every `registry_poll_interval_s`; a vote checks the voter's recent votes (the vote limit). Both
must stay off the event loop and cheap enough that the server's latency does not grow with the
store. For an empty store and one of --rows voted comparisons from before the canary plus
--canary-rows cast during it (the judge tallies these on every look), this starts the embedded broker and a real `kaizen serve` (tiny model, idle engine) in
a fresh data dir, publishes a second version (the canary), fills the API's SQLite store, then
for --seconds probes /healthz back to back while --voters clients vote on fresh pairs. It
prints p50/p99 of both and the ratio of each size's p99 to the empty store's, side by side in
one run. A report, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import free_port, percentile, provenance, start, stop, wait_ready  # noqa: E402
from services.auth import user_id  # noqa: E402
from kaizen.core.broker import start_embedded_broker  # noqa: E402
from services.comparisons import ComparisonStore  # noqa: E402
from kaizen.core.events import Answer  # noqa: E402
from services.models import build_tiny  # noqa: E402
from kaizen.core.registry import Registry  # noqa: E402
from kaizen.core.settings import Settings  # noqa: E402

ADMIN = "bench-admin-token-0123456789abcdef"
KEY = "bench-key"
USERS = 1000


def fill(db: Path, rows: int, champion: str, canary: str, since: datetime, tag: str) -> None:
    """`rows` voted champion-vs-canary comparisons by USERS users, all ties (the judge keeps
    collecting: nothing ends the canary mid-run), voted from `since` on, a microsecond apart."""
    rng = random.Random(0)
    con = sqlite3.connect(db, timeout=60)
    batch = 20_000
    messages = json.dumps([{"role": "user", "content": "What is a good name for a cat?"}])
    with Progress() as progress:
        task = progress.add_task(f"filling {rows:,} voted rows ({tag})", total=rows)
        for lo in range(0, rows, batch):
            values = []
            for i in range(lo, min(rows, lo + batch)):
                t = (since + timedelta(microseconds=i)).isoformat()
                a, b = (champion, canary) if rng.random() < 0.5 else (canary, champion)
                answers = json.dumps([{"text": "Mittens", "model_version": a},
                                      {"text": "Biscuit", "model_version": b}])
                values.append((f"cmp-{tag}-{i}", f"u-{rng.randrange(USERS):024x}", t, t, messages, answers, t,
                               str(uuid.uuid4()), "tie", a, b))
            con.executemany("INSERT INTO comparisons (id, user, served_at, expires_at, messages, answers, voted_at,"
                            " event_id, choice, version_a, version_b) VALUES (?,?,?,?,?,?,?,?,?,?,?)", values)
            con.commit()
            progress.advance(task, len(values))
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # else the server's next write checkpoints our 1M rows
    con.close()


async def probe_and_vote(base: str, seconds: float, voters: int, pairs: list[str]) -> tuple[list[float], list[float]]:
    probes: list[float] = []
    votes: list[float] = []
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=base, timeout=60,
                                 headers={"Authorization": f"Bearer {KEY}"}) as http:
        async def prober() -> None:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                r = await http.get("/healthz")
                probes.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text

        async def voter() -> None:
            while time.monotonic() < deadline and pairs:
                cid = pairs.pop()
                t0 = time.perf_counter()
                r = await http.post("/v1/feedback", json={"comparison_id": cid, "choice": "tie"})
                votes.append(time.perf_counter() - t0)
                assert r.status_code == 202, r.text

        await asyncio.gather(prober(), *[voter() for _ in range(voters)])
    return probes, votes


def run_one(rows: int, during: int, model: Path, root: Path, broker_port: int, seconds: float,
            voters: int) -> dict[str, float]:
    data = root / f"rows-{rows}"
    settings = Settings(data_dir=data, model=model, port=free_port(), trainer_port=free_port(),
                        broker_port=broker_port, api_keys=KEY, admin_token=ADMIN, rate_limit_rps=100_000,
                        rate_limit_burst=100_000, vote_limit_per_window=1_000_000, auto_rollout=True,
                        registry_poll_interval_s=1.0, engine_max_model_len=512)
    env = {**settings.child_env(), "KAIZEN_LOG_LEVEL": "warning"}
    proc = start([sys.executable, "-m", "kaizen", "serve"], env, root / f"serve-{rows}.log")
    base = f"http://127.0.0.1:{settings.port}"
    try:
        wait_ready(f"{base}/readyz", proc)
        Registry(settings.registry_path).publish(model, parent="v0", who="bench", why="store load")
        admin = {"Authorization": f"Bearer {ADMIN}"}
        deadline = time.monotonic() + 600
        while httpx.get(f"{base}/admin/rollout", headers=admin, timeout=30).json()["serving"].get("canary") != "v1":
            if time.monotonic() > deadline:
                raise TimeoutError("the canary did not start")
            time.sleep(1)
        state = Registry(settings.registry_path).state()
        started = state.canary_started or datetime.now(UTC)
        fill(settings.api_db, rows, "v0", "v1", started - timedelta(days=1), "before")  # earlier votes, kept
        fill(settings.api_db, during, "v0", "v1", started, "canary")  # the judge reads these on every look
        # fresh pairs to vote on during the measurement, recorded as the API records them
        store = ComparisonStore.from_settings(settings)
        me = user_id((data / "user-id.secret").read_text().strip().encode(), KEY)
        pairs = [store.record(me, [{"role": "user", "content": "Hi"}],
                              [Answer(text="a", model_version="v0"), Answer(text="b", model_version="v1")])
                 for _ in range(5000)]
        store.close()
        time.sleep(3 * settings.registry_poll_interval_s)  # the judge has read the full store
        probes, votes = asyncio.run(probe_and_vote(base, seconds, voters, pairs))
        status = httpx.get(f"{base}/admin/rollout", headers=admin, timeout=60).json()
        assert status["serving"].get("canary") == "v1", status  # still judging: the measurement is valid
    finally:
        stop(proc)
    return {"probes": len(probes), "probe_p50": percentile(probes, 50), "probe_p99": percentile(probes, 99),
            "votes": len(votes), "vote_p50": percentile(votes, 50), "vote_p99": percentile(votes, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="voted rows from before the canary")
    parser.add_argument("--canary-rows", type=int, default=20_000, help="voted rows during the canary")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--voters", type=int, default=4)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kaizen-store-load-"))
    model = build_tiny(Settings(), root / "tiny")
    broker_settings = Settings(data_dir=root / "broker", broker_port=free_port())
    broker = start_embedded_broker(broker_settings)
    try:
        results = {rows: run_one(rows, during, model, root, broker_settings.broker_port, args.seconds, args.voters)
                   for rows, during in ((0, 0), (args.rows, args.canary_rows))}
    finally:
        broker.terminate()
        broker.wait()
    empty = results[0]
    print(f"\n/healthz and POST /v1/feedback during a canary with {args.canary_rows:,} votes so far "
          f"({provenance()})")
    print(f"{'voted rows':>12} {'probes':>7} {'p50 ms':>8} {'p99 ms':>8} {'p99 ratio':>9} "
          f"{'votes':>6} {'p50 ms':>8} {'p99 ms':>8} {'p99 ratio':>9}")
    for rows, r in results.items():
        print(f"{rows:>12,} {r['probes']:>7} {r['probe_p50'] * 1e3:>8.1f} {r['probe_p99'] * 1e3:>8.1f} "
              f"{r['probe_p99'] / empty['probe_p99']:>9.2f} {r['votes']:>6} {r['vote_p50'] * 1e3:>8.1f} "
              f"{r['vote_p99'] * 1e3:>8.1f} {r['vote_p99'] / empty['vote_p99']:>9.2f}")


if __name__ == "__main__":
    main()
