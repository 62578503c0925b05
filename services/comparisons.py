"""Paired answers and votes: the API's durable SQLite store and its outbox.

A comparison (two answers to one conversation) is stored when it is served.
A vote validates against it and, in the same transaction that marks the
comparison voted, writes the Preference event into the `outbox` table, so an
accepted vote is never lost and never doubled: the relay (Preference pipeline
issue) delivers outbox rows to Kafka and marks them delivered afterwards.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.events import Answer, Choice, Message, PreferenceEvent

SCHEMA = """
CREATE TABLE IF NOT EXISTS comparisons (
    id          TEXT PRIMARY KEY,
    user        TEXT NOT NULL,
    served_at   TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    messages    TEXT NOT NULL,      -- JSON, the conversation up to the answered turn
    answers     TEXT NOT NULL,      -- JSON, two Answer objects
    voted_at    TEXT,
    event_id    TEXT
);
CREATE INDEX IF NOT EXISTS comparisons_expiry ON comparisons (expires_at);
CREATE TABLE IF NOT EXISTS outbox (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id      TEXT NOT NULL UNIQUE,
    comparison_id TEXT NOT NULL,
    payload       BLOB NOT NULL,    -- the Preference event, JSON bytes as sent to Kafka
    created_at    TEXT NOT NULL,
    delivered_at  TEXT
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (delivered_at, seq);
CREATE TABLE IF NOT EXISTS relay_state (  -- highest offset the broker acknowledged, per partition
    partition   INTEGER PRIMARY KEY,
    max_offset  INTEGER NOT NULL
);
"""


class VoteError(Exception):
    """A vote that cannot be accepted; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class OutboxFull(Exception):
    """The outbox holds `limit` undelivered events: refuse new votes rather than drop any."""


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    comparison_id: str
    payload: bytes


def new_comparison_id() -> str:
    return f"cmp-{uuid.uuid4().hex}"


class ComparisonStore:
    """One connection shared by the API's threads behind a lock (writes are sub-millisecond in WAL)."""

    def __init__(self, path: Path, ttl: timedelta, max_pending: int = 1_000_000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.ttl = ttl
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash; only an OS crash can
        # lose the last transactions. FULL would fsync on every vote.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(comparisons)")}
        if "choice" not in columns:  # added with the live head-to-head (Rollout)
            self.db.execute("ALTER TABLE comparisons ADD COLUMN choice TEXT")

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def record(
        self, user: str, messages: list[dict[str, Any]], answers: list[Answer],
        served_at: datetime | None = None, comparison_id: str | None = None,
    ) -> str:
        """Store a served pair; return its id."""
        cid = comparison_id or new_comparison_id()
        served = served_at or datetime.now(UTC)
        with self._lock:
            self.db.execute(
                "INSERT INTO comparisons (id, user, served_at, expires_at, messages, answers) "
                "VALUES (?,?,?,?,?,?)",
                (cid, user, served.isoformat(), (served + self.ttl).isoformat(), json.dumps(messages),
                 json.dumps([a.model_dump(mode="json") for a in answers])),
            )
        return cid

    def vote(self, comparison_id: str, user: str, choice: Choice, reason: str | None) -> PreferenceEvent:
        """Accept one vote: write its event to the outbox and mark the comparison, atomically."""
        now = datetime.now(UTC)
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                row = self.db.execute(
                    "SELECT user, served_at, expires_at, messages, answers, voted_at FROM comparisons "
                    "WHERE id = ?", (comparison_id,),
                ).fetchone()
                if row is None:
                    raise VoteError(404, "comparison_not_found", f"no comparison {comparison_id!r}")
                owner, served_at, expires_at, messages, answers, voted_at = row
                if owner != user:
                    raise VoteError(403, "not_your_comparison", "this comparison was served to another user")
                if voted_at is not None:
                    raise VoteError(409, "already_voted", "this comparison already has a vote")
                if datetime.fromisoformat(expires_at) <= now:
                    raise VoteError(410, "comparison_expired", "this comparison has expired")
                if self._pending_upper_bound() >= self.max_pending:
                    raise OutboxFull(f"{self.max_pending} votes are waiting for the broker")
                event = PreferenceEvent(
                    comparison_id=comparison_id, user=user, served_at=datetime.fromisoformat(served_at),
                    voted_at=now, messages=[Message.model_validate(m) for m in json.loads(messages)],
                    answers=[Answer.model_validate(a) for a in json.loads(answers)],
                    choice=choice, reason=reason,
                )
                self.db.execute(
                    "INSERT INTO outbox (event_id, comparison_id, payload, created_at) VALUES (?,?,?,?)",
                    (str(event.event_id), comparison_id, event.to_bytes(), now.isoformat()),
                )
                self.db.execute("UPDATE comparisons SET voted_at = ?, event_id = ?, choice = ? WHERE id = ?",
                                (now.isoformat(), str(event.event_id), str(choice), comparison_id))
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        return event

    def head_to_head(self, champion: str, canary: str, since: datetime | None) -> dict[str, int]:
        """Votes on champion-vs-canary pairs since `since`, from the canary's side."""
        out = {"votes": 0, "canary_wins": 0, "champion_wins": 0, "ties": 0, "both_bad": 0}
        with self._lock:
            rows = self.db.execute(
                "SELECT json_extract(answers, '$[0].model_version'), json_extract(answers, '$[1].model_version'),"
                " choice FROM comparisons WHERE choice IS NOT NULL AND voted_at >= ?",
                ((since or datetime.min.replace(tzinfo=UTC)).isoformat(),)).fetchall()
        for left, right, choice in rows:
            if {left, right} != {champion, canary}:
                continue
            out["votes"] += 1
            if choice == "tie":
                out["ties"] += 1
            elif choice == "both_bad":
                out["both_bad"] += 1
            else:
                winner = left if choice == "0" else right
                out["canary_wins" if winner == canary else "champion_wins"] += 1
        return out

    def _pending_upper_bound(self) -> int:
        # seq grows by one per event, so (newest - oldest undelivered + 1) bounds the
        # backlog from above using the index alone; a COUNT would scan it per vote.
        lo, hi = self.db.execute(
            "SELECT (SELECT MIN(seq) FROM outbox WHERE delivered_at IS NULL), (SELECT MAX(seq) FROM outbox)"
        ).fetchone()
        return 0 if lo is None else int(hi) - int(lo) + 1

    # -- the relay's side ---------------------------------------------------------
    def pending(self, limit: int) -> list[OutboxRow]:
        with self._lock:
            rows = self.db.execute(
                "SELECT seq, comparison_id, payload FROM outbox WHERE delivered_at IS NULL ORDER BY seq LIMIT ?",
                (limit,)).fetchall()
        return [OutboxRow(int(r[0]), r[1], bytes(r[2])) for r in rows]

    def mark_delivered(self, seqs: list[int], offsets: dict[int, int]) -> None:
        now = datetime.now(UTC).isoformat()
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany("UPDATE outbox SET delivered_at = ? WHERE seq = ?", [(now, s) for s in seqs])
                self.db.executemany(
                    "INSERT INTO relay_state (partition, max_offset) VALUES (?, ?) ON CONFLICT (partition) "
                    "DO UPDATE SET max_offset = MAX(max_offset, excluded.max_offset)", list(offsets.items()))
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def max_acked_offsets(self) -> dict[int, int]:
        with self._lock:
            return {int(p): int(o) for p, o in self.db.execute("SELECT partition, max_offset FROM relay_state")}

    def redeliver_all(self) -> int:
        """The broker lost data: every retained event becomes pending again."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            cur = self.db.execute("UPDATE outbox SET delivered_at = NULL WHERE delivered_at IS NOT NULL")
            self.db.execute("DELETE FROM relay_state")
            self.db.execute("COMMIT")
        return int(cur.rowcount)

    def prune_delivered(self, before: datetime) -> int:
        with self._lock:
            cur = self.db.execute("DELETE FROM outbox WHERE delivered_at IS NOT NULL AND delivered_at < ?",
                                  (before.isoformat(),))
        return int(cur.rowcount)

    def outbox_backlog(self) -> tuple[int, datetime | None]:
        """Undelivered events and when the oldest of them was accepted."""
        with self._lock:
            n, oldest = self.db.execute(
                "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE delivered_at IS NULL").fetchone()
        return int(n), datetime.fromisoformat(oldest) if oldest else None

    def outbox_events(self) -> list[PreferenceEvent]:
        """Every event in the outbox, oldest first (delivered or not)."""
        with self._lock:
            rows = self.db.execute("SELECT payload FROM outbox ORDER BY seq").fetchall()
        return [PreferenceEvent.model_validate_json(r[0]) for r in rows]

    def purge_expired(self, now: datetime | None = None) -> int:
        """Delete unvoted comparisons expired for longer than one TTL (until then a late
        vote is told 410, not 404); voted ones live on as outbox events."""
        cutoff = ((now or datetime.now(UTC)) - self.ttl).isoformat()
        with self._lock:
            cur = self.db.execute(
                "DELETE FROM comparisons WHERE expires_at <= ? AND voted_at IS NULL", (cutoff,))
        return int(cur.rowcount)
