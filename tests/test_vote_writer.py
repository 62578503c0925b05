"""Group commit of votes (services/vote_writer.py, `ComparisonStore.vote_many`) on real SQLite.

A batch judges each vote as if it were cast alone, commits the accepted ones together, and
takes none when its transaction fails; the writer batches what queues up while it commits,
keeps the vote limit exact under concurrency, and commits what was queued when it stops.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy.exc import IntegrityError

from kaizen.core.events import Answer, PreferenceEvent
from services.comparisons import (ComparisonStore, OutboxFull, VoteError, VoteLimit, VoteLimited,
                                  VoteRequest)
from services.vote_writer import VoteWriter, WriterStopped
from tests.conftest import make_settings

ANSWERS = [Answer(text="a", model_version="v0"), Answer(text="b", model_version="v0")]


def seed(store: ComparisonStore, user: str, served_at: datetime | None = None) -> str:
    return store.record(user, [{"role": "user", "content": "q"}], ANSWERS, served_at=served_at)


def outbox_ids(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [r[0] for r in db.execute("SELECT comparison_id FROM outbox ORDER BY seq")]


def voted_ids(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT id FROM comparisons WHERE voted_at IS NOT NULL")}


def test_a_batch_judges_each_vote_as_if_cast_alone(tmp_path: Path) -> None:
    path = tmp_path / "api.sqlite"
    store = ComparisonStore(path, timedelta(hours=1))
    mine, mine2, theirs = seed(store, "u-1"), seed(store, "u-1"), seed(store, "u-2")
    old = seed(store, "u-1", served_at=datetime.now(UTC) - timedelta(hours=2))
    limited = [seed(store, "u-3") for _ in range(3)]
    votes = [
        VoteRequest(mine, "u-1", 0, None),
        VoteRequest(mine, "u-1", 1, None),  # the same comparison again in the same batch
        VoteRequest("cmp-missing", "u-1", 0, None),
        VoteRequest(theirs, "u-1", 0, None),
        VoteRequest(old, "u-1", 0, None),
        VoteRequest(mine2, "u-1", "tie", "both fine"),
        *(VoteRequest(cid, "u-3", 0, None) for cid in limited),  # u-3 may cast 2 in the window
    ]
    results = store.vote_many(votes, VoteLimit(per_window=2, window=timedelta(minutes=10)))
    kinds = [type(r).__name__ if isinstance(r, Exception) else "event" for r in results]
    assert kinds == ["event", "VoteError", "VoteError", "VoteError", "VoteError", "event",
                     "event", "event", "VoteLimited"], kinds
    codes = [r.code for r in results if isinstance(r, VoteError)]
    assert codes == ["already_voted", "comparison_not_found", "not_your_comparison", "comparison_expired"]
    wait = results[-1]
    assert isinstance(wait, VoteLimited) and 500 < wait.wait_s <= 600, wait
    # exactly the accepted ones are in the outbox, in the order cast, and their comparisons marked
    assert outbox_ids(path) == [mine, mine2, limited[0], limited[1]]
    assert voted_ids(path) == {mine, mine2, limited[0], limited[1]}
    tie = results[5]
    assert isinstance(tie, PreferenceEvent) and tie.choice == "tie" and tie.reason == "both fine"
    # a later batch sees the committed votes: the vote counts and the double vote hold across batches
    extra = seed(store, "u-3")
    again = store.vote_many([VoteRequest(mine, "u-1", 0, None), VoteRequest(limited[2], "u-3", 0, None),
                             VoteRequest(extra, "u-3", 0, None)],
                            VoteLimit(per_window=3, window=timedelta(minutes=10)))
    assert [type(r).__name__ for r in again] == ["VoteError", "PreferenceEvent", "VoteLimited"]
    store.close()


def test_a_full_outbox_refuses_the_votes_past_its_room(tmp_path: Path) -> None:
    path = tmp_path / "api.sqlite"
    store = ComparisonStore(path, timedelta(hours=1), max_pending=3)
    store.vote(seed(store, "u-1"), "u-1", 0, None)
    ids = [seed(store, "u-1") for _ in range(4)]
    results = store.vote_many([VoteRequest(cid, "u-1", 0, None) for cid in ids])
    assert [type(r).__name__ for r in results] == ["PreferenceEvent", "PreferenceEvent", "OutboxFull",
                                                   "OutboxFull"]
    assert isinstance(results[2], OutboxFull)
    assert voted_ids(path) == {*outbox_ids(path)} and len(outbox_ids(path)) == 3
    store.close()


def test_a_failed_batch_takes_none_of_its_votes(tmp_path: Path) -> None:
    """The fault is real: a trigger makes SQLite abort the outbox insert of one comparison, so the
    whole transaction fails after the other votes' rows were written in it."""
    path = tmp_path / "api.sqlite"
    store = ComparisonStore(path, timedelta(hours=1))
    good, poison = seed(store, "u-1"), seed(store, "u-1")
    with sqlite3.connect(path) as db:
        db.execute(f"CREATE TRIGGER refuse BEFORE INSERT ON outbox WHEN NEW.comparison_id = '{poison}' "
                   "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    writer = VoteWriter(make_settings(tmp_path), store)

    async def cast() -> list[object]:
        votes = [VoteRequest(cid, "u-1", 0, None) for cid in (good, poison)]
        return await asyncio.gather(*(writer.submit(v) for v in votes), return_exceptions=True)

    results = asyncio.run(cast())
    assert all(isinstance(r, IntegrityError) for r in results), results
    assert outbox_ids(path) == [] and voted_ids(path) == set()
    # the writer lives on: once the fault is gone, the same votes are taken, once each
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER refuse")
    results = asyncio.run(cast())
    assert all(isinstance(r, PreferenceEvent) for r in results), results
    assert sorted(outbox_ids(path)) == sorted([good, poison])
    writer.stop()
    store.close()


def batches_so_far() -> float:
    return REGISTRY.get_sample_value("kaizen_vote_batch_size_count") or 0.0


def test_votes_queued_during_a_commit_share_the_next_and_the_limit_is_exact(tmp_path: Path) -> None:
    """While another writer holds SQLite's write lock, 40 votes of one user queue up; they commit in
    few transactions, and with a limit of 5 exactly 5 are accepted (checked before the vote in its
    own transaction, as before, up to 40 could have slipped past together)."""
    path = tmp_path / "api.sqlite"
    store = ComparisonStore(path, timedelta(hours=1))
    ids = [seed(store, "u-1") for _ in range(40)]
    writer = VoteWriter(make_settings(tmp_path, vote_limit_per_window=5), store)
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # the writer's first batch waits for this lock
    released = threading.Timer(0.5, blocker.rollback)
    before = batches_so_far()

    async def cast() -> list[object]:
        futures = [writer.submit(VoteRequest(cid, "u-1", 0, None)) for cid in ids]
        released.start()
        return await asyncio.gather(*futures, return_exceptions=True)

    started = time.monotonic()
    results = asyncio.run(cast())
    assert time.monotonic() - started >= 0.4  # the lock really held the first batch back
    accepted = [r for r in results if isinstance(r, PreferenceEvent)]
    limited = [r for r in results if isinstance(r, VoteLimited)]
    assert len(accepted) == 5 and len(limited) == 35, results
    assert [e.comparison_id for e in accepted] == ids[:5]  # in the order cast
    batches = batches_so_far() - before
    assert 1 <= batches <= 3, batches  # one vote alone first (it took the lock), then the rest together
    writer.stop()
    blocker.close()
    store.close()


def test_stop_commits_what_was_queued_and_refuses_what_comes_after(tmp_path: Path) -> None:
    path = tmp_path / "api.sqlite"
    store = ComparisonStore(path, timedelta(hours=1))
    ids = [seed(store, "u-1") for _ in range(10)]
    writer = VoteWriter(make_settings(tmp_path), store)
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")

    async def cast() -> tuple[list[object], list[object]]:
        queued = [writer.submit(VoteRequest(cid, "u-1", 0, None)) for cid in ids[:8]]
        threading.Timer(0.3, blocker.rollback).start()
        await asyncio.to_thread(writer.stop)  # waits for the queued votes to commit
        late = [writer.submit(VoteRequest(cid, "u-1", 0, None)) for cid in ids[8:]]
        return (await asyncio.gather(*queued, return_exceptions=True),
                await asyncio.gather(*late, return_exceptions=True))

    queued, late = asyncio.run(cast())
    assert all(isinstance(r, PreferenceEvent) for r in queued), queued
    assert all(isinstance(r, WriterStopped) for r in late), late
    assert sorted(outbox_ids(path)) == sorted(ids[:8])
    blocker.close()
    store.close()


@pytest.mark.parametrize("batch_max", [1, 3])
def test_batches_never_exceed_their_bound(tmp_path: Path, batch_max: int) -> None:
    path = tmp_path / "api.sqlite"
    store = ComparisonStore(path, timedelta(hours=1))
    ids = [seed(store, "u-1") for _ in range(9)]
    writer = VoteWriter(make_settings(tmp_path, vote_batch_max=batch_max), store)
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    before = batches_so_far()

    async def cast() -> list[object]:
        futures = [writer.submit(VoteRequest(cid, "u-1", 0, None)) for cid in ids]
        threading.Timer(0.3, blocker.rollback).start()
        return await asyncio.gather(*futures)

    assert len(asyncio.run(cast())) == 9
    assert batches_so_far() - before >= 9 / batch_max
    writer.stop()
    blocker.close()
    store.close()
