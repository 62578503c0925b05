"""Votes per second at POST /v1/feedback, and vote-to-store latency.

    python bench/feedback.py --votes 6000 --clients 32

Starts a real embedded broker, `kaizen serve` (tiny model: the engine is idle
here) and `kaizen train` in a temporary data dir, seeds one comparison per
vote into the API's store, then votes with 32 concurrent HTTP clients.
Reports accepted votes/s, request latency p50/p99, and the time from a 202 to
the vote being in the trainer's store (p50/p99). A report, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import free_port, percentile, provenance, start, stop, wait_ready  # noqa: E402
from services.auth import user_id  # noqa: E402
from kaizen.core.broker import ensure_topics, start_embedded_broker  # noqa: E402
from services.comparisons import ComparisonStore  # noqa: E402
from kaizen.core.events import Answer  # noqa: E402
from services.models import build_tiny  # noqa: E402
from kaizen.core.settings import Settings  # noqa: E402

KEY = "bench-key"


async def vote_all(base: str, ids: list[str], clients: int,
                   ) -> tuple[list[float], dict[str, float], float, list[str]]:
    """Every vote once; latencies of the accepted, when each was accepted, the wall time, and the
    transport errors (counted, not retried: a load generator that stops at the first one measures
    nothing)."""
    latencies: list[float] = []
    accepted_at: dict[str, float] = {}
    errors: list[str] = []
    queue: asyncio.Queue[str] = asyncio.Queue()
    for cid in ids:
        queue.put_nowait(cid)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    with Progress() as progress:
        task = progress.add_task("votes", total=len(ids))
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30,
                                     headers={"Authorization": f"Bearer {KEY}"}) as http:
            async def worker() -> None:
                while not queue.empty():
                    cid = queue.get_nowait()
                    t0 = time.perf_counter()
                    try:
                        r = await http.post("/v1/feedback", json={"comparison_id": cid, "choice": 0})
                    except httpx.TransportError as exc:
                        errors.append(f"{type(exc).__name__} after {time.perf_counter() - t0:.2f} s")
                        progress.advance(task)
                        continue
                    latencies.append(time.perf_counter() - t0)
                    assert r.status_code == 202, r.text
                    accepted_at[cid] = time.time()
                    progress.advance(task)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            wall = time.perf_counter() - started
    return latencies, accepted_at, wall, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--votes", type=int, default=6000)
    ap.add_argument("--clients", type=int, default=32)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kaizen-bench-feedback-"))
    settings = Settings(data_dir=tmp / "data", model=tmp / "tiny", port=free_port(), trainer_port=free_port(),
                        broker_port=free_port(), api_keys=KEY, user_id_secret="bench",  # type: ignore[arg-type]
                        rate_limit_rps=1e6, rate_limit_burst=10**6, vote_limit_per_window=10**9, engine_max_model_len=256)
    build_tiny(settings, tmp / "tiny")
    store = ComparisonStore(settings.api_db, timedelta(hours=1))
    user = user_id(b"bench", KEY)
    answers = [Answer(text="a", model_version="v0"), Answer(text="b", model_version="v0")]
    ids = [store.record(user, [{"role": "user", "content": f"q{i}"}], answers) for i in range(args.votes)]
    store.close()
    broker = start_embedded_broker(settings)
    ensure_topics(settings)
    env = settings.child_env()
    api = start([sys.executable, "-m", "kaizen", "serve"], env, tmp / "api.log")
    trainer = start([sys.executable, "-m", "kaizen", "train"], env, tmp / "trainer.log")
    base = f"http://127.0.0.1:{settings.port}"
    try:
        wait_ready(f"{base}/readyz", api)
        latencies, accepted_at, wall, errors = asyncio.run(vote_all(base, ids, args.clients))
        deadline = time.monotonic() + 120
        rows: list[tuple[str, str]] = []
        while time.monotonic() < deadline:
            if settings.preferences_db.exists():
                with sqlite3.connect(settings.preferences_db) as db:
                    rows = db.execute("SELECT comparison_id, received_at FROM preferences").fetchall()
                if len(rows) >= len(accepted_at):
                    break
            time.sleep(0.5)
        to_store = [datetime.fromisoformat(r.replace("Z", "+00:00")).timestamp() - accepted_at[c]
                    for c, r in rows if c in accepted_at]
    finally:
        for proc in (api, trainer):
            stop(proc)
        broker.kill()
        broker.wait()
    print(f"\nfeedback benchmark ({provenance()})")
    print(f"  votes accepted      {len(latencies)} with {args.clients} clients in {wall:.2f} s "
          f"= {len(latencies) / wall:.0f} votes/s")
    if errors:
        print(f"  transport errors    {len(errors)} (not retried): {', '.join(sorted(set(errors))[:5])}")
    print(f"  request latency     p50 {percentile(latencies, 50) * 1000:.1f} ms, "
          f"p99 {percentile(latencies, 99) * 1000:.1f} ms")
    print(f"  vote-to-store       p50 {percentile(to_store, 50):.2f} s, p99 {percentile(to_store, 99):.2f} s "
          f"({len(to_store)} of {len(accepted_at)} accepted stored)")


if __name__ == "__main__":
    main()
