"""Paired answers and votes: the API's durable store and its outbox.

A comparison (two answers to one conversation) is stored when it is served.
A vote validates against it and, in the same transaction that marks the
comparison voted, writes the Preference event into the `outbox` table, so an
accepted vote is never lost and never doubled: the relay (services/outbox.py)
delivers outbox rows to Kafka and marks them delivered afterwards.

The store is SQLite in the data dir by default, or the PostgreSQL server named
by KAIZEN_DATABASE_URL that every API replica shares (services/db.py): a pair
served by one replica can be voted on through any other, and a second vote is
refused wherever it arrives (the comparison's row is locked for the check).

The vote counts read from the store (the canary's head-to-head, the vote limit) are queries in
services/vote_counts.py, run here in read-only transactions.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from services import db, vote_counts
from services.canary import Tally
from services.db import DatabaseUnavailable
from services.votes import (OutboxFull, VoteBatch, VoteError, VoteLimit, VoteLimited, VoteRequest,
                            write_votes)
from kaizen.core.events import Answer, Choice, PreferenceEvent
from kaizen.core.settings import Settings

RETENTION_BATCH = 1000
"""Rows one retention transaction deletes (the relay passes `retention_batch_size`)."""

__all__ = ["ComparisonStore", "DatabaseUnavailable", "OutboxFull", "OutboxRow", "VoteError", "VoteLimit",
           "VoteLimited", "VoteRequest"]


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    comparison_id: str
    payload: bytes
    key: str
    """Kafka key: the pseudonymous user, so one user's votes share a partition and stay in order."""


def new_comparison_id() -> str:
    return f"cmp-{uuid.uuid4().hex}"


class OutboxClaim:
    """Pending outbox rows held by one relay until `ComparisonStore.claim` returns.

    On PostgreSQL they are locked (`FOR UPDATE SKIP LOCKED`) in a transaction that
    also records their delivery, so several replicas' relays never send the same row
    at once; a relay that dies mid-batch releases its rows with its connection."""

    def __init__(self, store: ComparisonStore, conn: Connection | None, rows: list[OutboxRow]) -> None:
        self.store, self.conn, self.rows = store, conn, rows

    def mark_delivered(self, seqs: list[int], offsets: dict[int, int]) -> None:
        if self.conn is None:
            with self.store.transaction() as conn:
                self.store._mark_delivered(conn, seqs, offsets)
        else:
            with db.reachable(self.store.url):
                self.store._mark_delivered(self.conn, seqs, offsets)


class ComparisonStore:
    """Comparisons and the vote outbox in SQLite (one process) or PostgreSQL (every replica).

    `target` is a SQLite file or a database URL (`ComparisonStore.from_settings` picks it)."""

    def __init__(self, target: Path | str, ttl: timedelta, max_pending: int = 1_000_000,
                 settings: Settings | None = None) -> None:
        self.url = target if isinstance(target, str) else f"sqlite:///{target}"
        self.path = target if isinstance(target, Path) else None
        self.ttl = ttl
        self.max_pending = max_pending
        self.engine = db.make_engine(self.url, settings)
        self.shared = self.engine.dialect.name == "postgresql"
        # SQLite: the relay's claim holds no transaction (a vote must not wait on Kafka); this lock keeps
        # two claims of one process apart (there is one relay per process, and one process per file)
        self._claim_lock = threading.Lock()
        try:
            with db.reachable(self.url):
                db.migrate(self.engine)
        except Exception:
            self.engine.dispose()
            raise

    @classmethod
    def from_settings(cls, settings: Settings) -> ComparisonStore:
        return cls(db.url_of(settings), settings.comparison_ttl, settings.outbox_max_pending, settings)

    @property
    def where(self) -> str:
        """The store, password hidden (for logs)."""
        return db.masked(self.url)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A transaction on the store; connection failures raise `DatabaseUnavailable`."""
        with db.reachable(self.url), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A transaction that only reads: on SQLite it takes no write lock (WAL readers never wait
        for a writer), so the judge's and the vote limit's reads do not queue behind votes."""
        with db.reachable(self.url), self.engine.connect() as conn:
            conn = conn.execution_options(**{db.READ_ONLY: True})
            with conn.begin():
                yield conn

    def record(
        self, user: str, messages: list[dict[str, Any]], answers: list[Answer],
        served_at: datetime | None = None, comparison_id: str | None = None,
    ) -> str:
        """Store a served pair; return its id."""
        cid = comparison_id or new_comparison_id()
        served = served_at or datetime.now(UTC)
        with self.transaction() as conn:
            conn.execute(insert(db.comparisons).values(
                id=cid, user=user, served_at=served.isoformat(), expires_at=(served + self.ttl).isoformat(),
                messages=json.dumps(messages),
                answers=json.dumps([a.model_dump(mode="json") for a in answers]),
                version_a=answers[0].model_version, version_b=answers[1].model_version))
        return cid

    def vote(self, comparison_id: str, user: str, choice: Choice, reason: str | None) -> PreferenceEvent:
        """Accept one vote (no vote limit): `vote_many` with a batch of one; raises its refusal."""
        result = self.vote_many([VoteRequest(comparison_id, user, choice, reason)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def vote_many(self, votes: Sequence[VoteRequest], limit: VoteLimit | None = None,
                  ) -> list[PreferenceEvent | Exception]:
        """Accept a batch of votes in one transaction (group commit, services/vote_writer.py).

        Each vote is judged on its own, in order, as if cast alone (services/votes.py); the accepted
        ones' events go into the outbox and their comparisons are marked, atomically. The result per
        vote is its event or its refusal. A database error raises for the whole batch, and then none
        was taken."""
        now = datetime.now(UTC)
        c = db.comparisons
        with self.transaction() as conn:
            # FOR UPDATE, in id order: two replicas' batches queue on a shared comparison, and the
            # later sees voted_at set (SQLite: BEGIN IMMEDIATE already made this the only writer)
            rows: dict[str, Any] = {r.id: r for r in conn.execute(
                select(c.c.id, c.c.user, c.c.expires_at, c.c.messages, c.c.answers, c.c.served_at,
                       c.c.voted_at)
                .where(c.c.id.in_(sorted({v.comparison_id for v in votes}))).order_by(c.c.id)
                .with_for_update())}
            window = (vote_counts.votes_in_windows(conn, sorted({v.user for v in votes}), now - limit.window)
                      if limit else {})
            batch = VoteBatch(rows, window, limit, room=self.max_pending - self._pending_upper_bound(conn),
                              max_pending=self.max_pending, now=now)
            results = [batch.judge(v) for v in votes]
            if batch.taken:
                write_votes(conn, batch.taken, now)
        return results

    # -- counting votes (services/vote_counts.py holds the queries) -------------------------
    def head_to_head(self, champion: str, canary: str, since: datetime | None) -> dict[str, int]:
        """Votes on champion-vs-canary pairs since `since`, from the canary's side."""
        with self.reading() as conn:
            return vote_counts.head_to_head(conn, champion, canary, since)

    def head_to_head_tally(self, champion: str, canary: str, since: datetime | None,
                           max_per_user: int) -> Tally:
        """Votes on champion-vs-canary pairs since `since`, each user's first `max_per_user` counted
        (services/canary.py's `count_votes`, computed by the database)."""
        if max_per_user < 1:
            raise ValueError(f"max_per_user must be at least 1, got {max_per_user}")
        with self.reading() as conn:
            return vote_counts.head_to_head_tally(conn, champion, canary, since, max_per_user)

    def _pending_upper_bound(self, conn: Connection) -> int:
        # seq grows by one per event, so (newest - oldest undelivered + 1) bounds the
        # backlog from above using the index alone; a COUNT would scan it per vote.
        o = db.outbox
        bounds: Any = conn.execute(select(
            select(func.min(o.c.seq)).where(o.c.delivered_at.is_(None)).scalar_subquery(),
            select(func.max(o.c.seq)).scalar_subquery())).one()
        lo, hi = bounds
        return 0 if lo is None else int(hi) - int(lo) + 1

    # -- the relay's side ---------------------------------------------------------
    @contextmanager
    def claim(self, limit: int) -> Iterator[OutboxClaim]:
        """The oldest `limit` undelivered rows, held for this relay until the block ends (see OutboxClaim).

        SQLite: read without holding a transaction (a vote must not wait for Kafka)."""
        o = db.outbox
        query = (select(o.c.seq, o.c.comparison_id, o.c.payload, o.c.key)
                 .where(o.c.delivered_at.is_(None)).order_by(o.c.seq).limit(limit))
        if not self.shared:
            with self._claim_lock:
                with self.transaction() as conn:
                    rows = [self._row(r) for r in conn.execute(query)]
                yield OutboxClaim(self, None, rows)
            return
        with self.transaction() as conn:
            rows = [self._row(r) for r in conn.execute(query.with_for_update(skip_locked=True))]
            yield OutboxClaim(self, conn, rows)

    @staticmethod
    def _row(r: Any) -> OutboxRow:
        return OutboxRow(int(r[0]), r[1], bytes(r[2]), r[3] or r[1])

    def pending(self, limit: int) -> list[OutboxRow]:
        """Undelivered rows, oldest first (a snapshot; relays use `claim`)."""
        o = db.outbox
        with self.reading() as conn:
            return [self._row(r) for r in conn.execute(
                select(o.c.seq, o.c.comparison_id, o.c.payload, o.c.key)
                .where(o.c.delivered_at.is_(None)).order_by(o.c.seq).limit(limit))]

    def mark_delivered(self, seqs: list[int], offsets: dict[int, int]) -> None:
        with self.transaction() as conn:
            self._mark_delivered(conn, seqs, offsets)

    def _mark_delivered(self, conn: Connection, seqs: list[int], offsets: dict[int, int]) -> None:
        now = datetime.now(UTC).isoformat()
        o, r = db.outbox, db.relay_state
        if seqs:
            conn.execute(update(o).where(o.c.seq.in_(seqs)).values(delivered_at=now))
        for partition, offset in sorted(offsets.items()):  # sorted: relays lock rows in one order
            if self.shared:
                stmt = postgresql.insert(r).values(partition=partition, max_offset=offset)
                conn.execute(stmt.on_conflict_do_update(
                    index_elements=[r.c.partition],
                    set_={"max_offset": func.greatest(r.c.max_offset, stmt.excluded.max_offset)}))
            else:
                lite = sqlite.insert(r).values(partition=partition, max_offset=offset)
                conn.execute(lite.on_conflict_do_update(
                    index_elements=[r.c.partition],
                    set_={"max_offset": func.max(r.c.max_offset, lite.excluded.max_offset)}))

    def max_acked_offsets(self) -> dict[int, int]:
        with self.reading() as conn:
            rows: Any = conn.execute(select(db.relay_state)).all()
        return {int(p): int(o) for p, o in rows}

    def redeliver_all(self) -> int:
        """The broker lost data: every retained event becomes pending again."""
        o = db.outbox
        with self.transaction() as conn:
            n: Any = conn.execute(
                update(o).where(o.c.delivered_at.is_not(None)).values(delivered_at=None)).rowcount
            conn.execute(delete(db.relay_state))
        return int(n)

    def prune_delivered(self, before: datetime, batch: int = RETENTION_BATCH) -> int:
        o = db.outbox
        return self._delete_in_batches(o, o.c.seq, (o.c.delivered_at.is_not(None),
                                                    o.c.delivered_at < before.isoformat()), batch)

    def _delete_in_batches(self, table: Any, key: Any, where: tuple[Any, ...], batch: int) -> int:
        """Delete the matching rows `batch` at a time, one short transaction each: a retention
        pass over a large backlog must not hold the write lock (and every vote) for seconds."""
        total = 0
        while True:
            with self.transaction() as conn:
                doomed = select(key).where(*where).limit(batch)
                n = int(conn.execute(delete(table).where(key.in_(doomed))).rowcount)
            total += n
            if n < batch:
                return total

    def outbox_backlog(self) -> tuple[int, datetime | None]:
        """Undelivered events and when the oldest of them was accepted."""
        o = db.outbox
        with self.reading() as conn:
            backlog: Any = conn.execute(select(func.count(), func.min(o.c.created_at))
                                        .where(o.c.delivered_at.is_(None))).one()
        n, oldest = backlog
        return int(n), datetime.fromisoformat(oldest) if oldest else None

    def outbox_events(self) -> list[PreferenceEvent]:
        """Every event in the outbox, oldest first (delivered or not)."""
        o = db.outbox
        with self.reading() as conn:
            rows = conn.execute(select(o.c.payload).order_by(o.c.seq)).all()
        return [PreferenceEvent.model_validate_json(r[0]) for r in rows]

    def purge_expired(self, now: datetime | None = None, batch: int = RETENTION_BATCH) -> int:
        """Delete unvoted comparisons expired for longer than one TTL (until then a late
        vote is told 410, not 404); voted ones live on as outbox events."""
        cutoff = ((now or datetime.now(UTC)) - self.ttl).isoformat()
        c = db.comparisons
        return self._delete_in_batches(c, c.c.id, (c.c.expires_at <= cutoff, c.c.voted_at.is_(None)), batch)

    def purge_voted(self, before: datetime, batch: int = RETENTION_BATCH) -> int:
        """Delete voted comparisons (their full prompts and answers) voted before `before`:
        `comparison_retention`. Their events live on in the trainer's store until its own
        retention; the canary's head-to-head only reads votes since the canary started."""
        c = db.comparisons
        return self._delete_in_batches(
            c, c.c.id, (c.c.voted_at.is_not(None), c.c.voted_at < before.isoformat()), batch)

    def erase_user(self, user: str) -> dict[str, int]:
        """Delete everything stored about one pseudonymous user: their comparisons (voted or
        not) and their votes in the outbox, delivered or not (`kaizen prefs erase`)."""
        c, o = db.comparisons, db.outbox
        with self.transaction() as conn:
            theirs = select(c.c.id).where(c.c.user == user)  # outbox rows from before `key` existed
            votes = int(conn.execute(
                delete(o).where((o.c.key == user) | o.c.comparison_id.in_(theirs))).rowcount)
            pairs = int(conn.execute(delete(c).where(c.c.user == user)).rowcount)
        return {"comparisons": pairs, "outbox_events": votes}

    # -- health numbers of the replicas (the rollout leader's judge) ---------------------------------
    def report_health(self, replica: str, numbers: dict[str, tuple[int, int, float | None]]) -> None:
        """This replica's (requests, errors, median time to first token) per version, replacing its last
        report."""
        h = db.version_health
        now = time.time()
        with self.transaction() as conn:
            for version, (requests, errors, ttft) in sorted(numbers.items()):
                values = {"replica": replica, "version": version, "requests": requests, "errors": errors,
                          "ttft_p50_s": ttft, "updated_at": now}
                update_cols = {k: v for k, v in values.items() if k not in ("replica", "version")}
                if self.shared:
                    conn.execute(postgresql.insert(h).values(**values).on_conflict_do_update(
                        index_elements=[h.c.replica, h.c.version], set_=update_cols))
                else:
                    conn.execute(sqlite.insert(h).values(**values).on_conflict_do_update(
                        index_elements=[h.c.replica, h.c.version], set_=update_cols))

    def health(self, versions: list[str]) -> dict[str, dict[str, tuple[int, int, float | None]]]:
        """Each replica's last report per version: {version: {replica: (requests, errors, ttft p50)}}."""
        h = db.version_health
        with self.reading() as conn:
            rows: Any = conn.execute(
                select(h.c.version, h.c.replica, h.c.requests, h.c.errors, h.c.ttft_p50_s)
                .where(h.c.version.in_(versions))).all()
        out: dict[str, dict[str, tuple[int, int, float | None]]] = {v: {} for v in versions}
        for r in rows:
            out[r.version][r.replica] = (int(r.requests), int(r.errors), r.ttft_p50_s)
        return out
