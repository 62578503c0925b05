"""Votes per second at POST /v1/feedback, and vote-to-store latency.

    python bench/feedback.py --votes 8000 --clients 32

Starts a real embedded broker, `kaizen serve` (tiny model: the engine is idle
here) and `kaizen train` in a temporary data dir, seeds one comparison per
vote into the API's store, then votes with 32 concurrent HTTP clients as 100
users (API keys), each under the default vote limit.
Reports accepted votes/s, request latency p50/p99, the time from a 202 to
the vote being in the trainer's store (p50/p99), and the CPU the load generator
and the API each used. Runs once per `--batch-max` (group commit of at most that
many votes; 1 is one transaction per vote), side by side. A report, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
import psutil
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import free_port, percentile, provenance, start, stop, wait_ready  # noqa: E402
from services.auth import user_id  # noqa: E402
from kaizen.core.broker import ensure_topics, start_embedded_broker  # noqa: E402
from services.comparisons import ComparisonStore  # noqa: E402
from kaizen.core.events import Answer  # noqa: E402
from services.models import build_tiny  # noqa: E402
from kaizen.core.settings import Settings  # noqa: E402




async def vote_all(base: str, ids: list[tuple[str, str]], clients: int,
                   ) -> tuple[list[float], dict[str, float], float, list[str]]:
    """Every vote once; latencies of the accepted, when each was accepted, the wall time, and the
    transport errors (counted, not retried: a load generator that stops at the first one measures
    nothing).

    aiohttp, not httpx: on two cores the load generator shares the machine with the API, and
    httpx's client spent more CPU per request than the API did (the bench measured itself)."""
    latencies: list[float] = []
    accepted_at: dict[str, float] = {}
    errors: list[str] = []
    pending = iter(ids)
    conn = aiohttp.TCPConnector(limit=clients)
    with Progress() as progress:
        task = progress.add_task("votes", total=len(ids))
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(base, connector=conn, timeout=timeout) as http:
            async def worker() -> None:
                for cid, key in pending:
                    t0 = time.perf_counter()
                    try:
                        async with http.post("/v1/feedback", json={"comparison_id": cid, "choice": 0},
                                             headers={"Authorization": f"Bearer {key}"}) as r:
                            body = await r.read()
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        errors.append(f"{type(exc).__name__} after {time.perf_counter() - t0:.2f} s")
                        progress.advance(task)
                        continue
                    latencies.append(time.perf_counter() - t0)
                    assert r.status == 202, body
                    accepted_at[cid] = time.time()
                    progress.advance(task)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            wall = time.perf_counter() - started
    return latencies, accepted_at, wall, errors


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU time of a process and its children so far (user + system)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


@dataclass
class Result:
    batch_max: int
    accepted: int
    wall: float
    latencies: list[float]
    to_store: list[float]
    errors: list[str]
    cpu_generator: float
    cpu_api: float

    @property
    def rate(self) -> float:
        return self.accepted / self.wall


def run(votes: int, clients: int, users: int, batch_max: int, profile: Path | None = None) -> Result:
    """One API (group commit of at most `batch_max` votes), broker and trainer; every vote once,
    cast by `users` API keys in turn (each under the default vote limit when votes/users allows)."""
    tmp = Path(tempfile.mkdtemp(prefix="kaizen-bench-feedback-"))
    keys = [f"bench-key-{i}" for i in range(users)]
    settings = Settings(data_dir=tmp / "data", model=tmp / "tiny", port=free_port(), trainer_port=free_port(),
                        broker_port=free_port(), api_keys=",".join(keys),  # type: ignore[arg-type]
                        user_id_secret="bench",  # type: ignore[arg-type]
                        rate_limit_rps=1e6, rate_limit_burst=10**6, engine_max_model_len=256,
                        vote_batch_max=batch_max)
    build_tiny(settings, tmp / "tiny")
    store = ComparisonStore(settings.api_db, timedelta(hours=1))
    answers = [Answer(text="a", model_version="v0"), Answer(text="b", model_version="v0")]
    ids = [(store.record(user_id(b"bench", keys[i % users]), [{"role": "user", "content": f"q{i}"}], answers),
            keys[i % users]) for i in range(votes)]
    store.close()
    broker = start_embedded_broker(settings)
    ensure_topics(settings)
    env = settings.child_env()
    api = start([sys.executable, "-m", "kaizen", "serve"], env, tmp / "api.log")
    trainer = start([sys.executable, "-m", "kaizen", "train"], env, tmp / "trainer.log")
    base = f"http://127.0.0.1:{settings.port}"
    try:
        wait_ready(f"{base}/readyz", api)
        me, server = psutil.Process(), psutil.Process(api.pid)
        cpu_me, cpu_api = me.cpu_times(), cpu_seconds(server)
        spy = None if profile is None else subprocess.Popen(  # py-spy: `pip install py-spy`, not a dependency
            ["py-spy", "record", "-p", str(api.pid), "-r", "100", "-f", "raw", "--threads", "-o",
             str(profile.with_suffix(f".batch{batch_max}.txt"))], stdout=subprocess.DEVNULL)
        latencies, accepted_at, wall, errors = asyncio.run(vote_all(base, ids, clients))
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its samples on SIGINT
            spy.wait(60)
        cpu_me_after = me.cpu_times()
        cpu_api = cpu_seconds(server) - cpu_api
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
    generator = cpu_me_after.user + cpu_me_after.system - cpu_me.user - cpu_me.system
    return Result(batch_max, len(latencies), wall, latencies, to_store, errors, generator, cpu_api)


def report(r: Result, clients: int) -> None:
    print(f"  vote_batch_max={r.batch_max}")
    print(f"    votes accepted      {r.accepted} with {clients} clients in {r.wall:.2f} s "
          f"= {r.rate:.0f} votes/s")
    print(f"    CPU while voting    load generator {r.cpu_generator / r.wall:.0%} of a core, API (with its "
          f"engine) {r.cpu_api / r.wall:.0%}: "
          f"{r.accepted / max(r.cpu_api, 1e-9):.0f} votes per API core-second")
    if r.errors:
        print(f"    transport errors    {len(r.errors)} (not retried): "
              f"{', '.join(sorted(set(r.errors))[:5])}")
    print(f"    request latency     p50 {percentile(r.latencies, 50) * 1000:.1f} ms, "
          f"p99 {percentile(r.latencies, 99) * 1000:.1f} ms")
    print(f"    vote-to-store       p50 {percentile(r.to_store, 50):.2f} s, "
          f"p99 {percentile(r.to_store, 99):.2f} s "
          f"({len(r.to_store)} of {r.accepted} accepted stored)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--votes", type=int, default=8000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--users", type=int, default=100, help="API keys casting the votes in turn")
    ap.add_argument("--batch-max", type=int, nargs="+",
                    default=[1, Settings.model_fields["vote_batch_max"].default],
                    help="vote_batch_max of each run, side by side (1: one transaction per vote)")
    ap.add_argument("--profile", type=Path, help="py-spy the API while it takes votes; raw samples to "
                    "PROFILE.batchN.txt (needs py-spy on PATH)")
    args = ap.parse_args()
    results = [run(args.votes, args.clients, args.users, b, args.profile) for b in args.batch_max]
    print(f"\nfeedback benchmark ({provenance()})")
    for r in results:
        report(r, args.clients)
    if len(results) > 1:
        print(f"  ratio (last / first)  {results[-1].rate / results[0].rate:.2f}x votes/s")


if __name__ == "__main__":
    main()
