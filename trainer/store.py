"""The preference store: one SQLite row per vote event (WAL mode).

    kaizen prefs stats

The event's `event_id` is the primary key, so a redelivered event is ignored,
not counted twice. Chosen/rejected pairs are derived from rows on read.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kaizen.core.events import PreferenceEvent

SCHEMA = """
CREATE TABLE IF NOT EXISTS preferences (
    event_id      TEXT PRIMARY KEY,
    comparison_id TEXT NOT NULL,
    user          TEXT NOT NULL,
    served_at     TEXT NOT NULL,
    voted_at      TEXT NOT NULL,
    choice        TEXT NOT NULL,
    version_a     TEXT NOT NULL,
    version_b     TEXT NOT NULL,
    event         TEXT NOT NULL,          -- the whole event, JSON
    received_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS preferences_received ON preferences (received_at);
CREATE INDEX IF NOT EXISTS preferences_user ON preferences (user);
-- rows are deleted (retention, erasure) but rowids must keep growing: see `_next_rowid`
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
-- users whose data was erased: their events, if Kafka delivers them again, are not stored again
CREATE TABLE IF NOT EXISTS erased_users (user TEXT PRIMARY KEY, erased_at TEXT NOT NULL);
"""

HIGH_WATER = "rowid_high_water"


def sqlite_time(when: datetime) -> str:
    """`when` as the store writes `received_at` (SQLite's strftime), so the two compare as text."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class AddResult:
    stored: int
    duplicates: int
    erased: int = 0
    """Events of an erased user, voted before the erasure: not stored (again)."""


class PreferenceStore:
    """Thread-confined SQLite connection to the store; open one per thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed vote survives power loss
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def add_many(self, events: Iterable[PreferenceEvent]) -> AddResult:
        """Insert events in one transaction; an event already stored is skipped, and so is
        one an erased user cast before their erasure."""
        stored = duplicates = erased = 0
        with self.transaction() as db:
            gone = dict(db.execute("SELECT user, erased_at FROM erased_users").fetchall())
            rowid = self._next_rowid(db)
            for ev in events:
                if ev.user in gone and ev.voted_at <= datetime.fromisoformat(gone[ev.user]):
                    erased += 1
                    continue
                cur = db.execute(
                    "INSERT OR IGNORE INTO preferences (rowid, event_id, comparison_id, user, served_at, "
                    "voted_at, choice, version_a, version_b, event) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        rowid, str(ev.event_id), ev.comparison_id, ev.user, ev.served_at.isoformat(),
                        ev.voted_at.isoformat(), str(ev.choice), ev.answers[0].model_version,
                        ev.answers[1].model_version, ev.model_dump_json(),
                    ),
                )
                if cur.rowcount == 1:
                    stored += 1
                    rowid += 1
                else:
                    duplicates += 1
        return AddResult(stored, duplicates, erased)

    @staticmethod
    def _next_rowid(db: sqlite3.Connection) -> int:
        """One above every rowid the table ever held. SQLite alone would hand a deleted newest
        rowid out again, and a round's mark (`last_rowid`) at or above it would skip that row."""
        newest, high = db.execute(
            "SELECT (SELECT COALESCE(MAX(rowid), 0) FROM preferences), "
            "(SELECT COALESCE(MAX(value), 0) FROM store_meta WHERE key = ?)", (HIGH_WATER,)).fetchone()
        return int(max(newest, high)) + 1

    def _delete(self, db: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> int:
        db.execute("INSERT INTO store_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                   "SET value = MAX(value, excluded.value)", (HIGH_WATER, self._next_rowid(db) - 1))
        return int(db.execute(f"DELETE FROM preferences WHERE {where}", args).rowcount)

    def prune(self, before: datetime) -> int:
        """Delete votes received before `before` (`preference_retention`)."""
        with self.transaction() as db:
            return self._delete(db, "received_at < ?", (sqlite_time(before),))

    def erase_user(self, user: str, when: datetime | None = None) -> int:
        """Delete one pseudonymous user's votes, and refuse their earlier votes if Kafka delivers
        them again (`kaizen prefs erase`). Returns the rows deleted."""
        stamp = (when or datetime.now(UTC)).isoformat()
        with self.transaction() as db:
            db.execute("INSERT INTO erased_users (user, erased_at) VALUES (?, ?) ON CONFLICT (user) "
                       "DO UPDATE SET erased_at = excluded.erased_at", (user, stamp))
            return self._delete(db, "user = ?", (user,))

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM preferences").fetchone()[0])

    def get(self, event_id: str) -> PreferenceEvent | None:
        row = self.db.execute("SELECT event FROM preferences WHERE event_id = ?", (event_id,)).fetchone()
        return PreferenceEvent.model_validate_json(row[0]) if row else None

    def stats(self) -> dict[str, Any]:
        by_choice = dict(self.db.execute("SELECT choice, COUNT(*) FROM preferences GROUP BY choice").fetchall())
        by_pair = {
            f"{a} vs {b}": n
            for a, b, n in self.db.execute(
                "SELECT version_a, version_b, COUNT(*) FROM preferences GROUP BY 1, 2 ORDER BY 3 DESC"
            ).fetchall()
        }
        per_day = dict(self.db.execute(
            "SELECT substr(voted_at, 1, 10), COUNT(*) FROM preferences GROUP BY 1 ORDER BY 1").fetchall())
        total = sum(by_choice.values())
        return {
            "per_day": per_day,
            "total": total,
            "by_choice": by_choice,
            "by_version_pair": by_pair,
            "tie_share": by_choice.get("tie", 0) / total if total else 0.0,
            "both_bad_share": by_choice.get("both_bad", 0) / total if total else 0.0,
        }


    # -- reads for the reward model (trainer/reward.py) ----------------------------
    # Rows are marked by their rowid: it only grows (`_next_rowid`, even when rows are deleted),
    # and unlike `received_at` (millisecond text) two rows never share one.

    def last_rowid(self) -> int:
        """The newest row's mark (0 for an empty store); never goes down when rows are deleted."""
        return self._next_rowid(self.db) - 1

    def events_between(self, after: int = 0, through: int | None = None) -> list[tuple[int, PreferenceEvent]]:
        """(rowid, event) with `after < rowid <= through`, oldest first."""
        return list(self.iter_events(after, through))

    def iter_events(self, after: int = 0,
                    through: int | None = None) -> Iterator[tuple[int, PreferenceEvent]]:
        """`events_between` one row at a time (a cursor, not a list of the whole store): for a
        reader that keeps less than every event. Consume it before the store is closed."""
        through = self.last_rowid() if through is None else through
        cursor = self.db.execute(
            "SELECT rowid, event FROM preferences WHERE rowid > ? AND rowid <= ? ORDER BY rowid",
            (after, through),
        )
        for rowid, event in cursor:
            yield int(rowid), PreferenceEvent.model_validate_json(event)


def holdout_share(key: str) -> float:
    """A stable number in [0, 1) for `key` (a prompt key): the same on every run and machine.

    `holdout_share(prompt_key(messages)) < fraction` puts a prompt in the held-out slice for
    good, so a vote held out once is never trained on later.
    """
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def prompt_key(messages: Any) -> str:
    """The conversation a vote answered, as one canonical string (what held-out splits hash).

    By prompt, not by comparison: voters see the same prompt many times (the simulated users'
    prompt file, a popular question), and a prompt whose votes fell on both sides of a split
    lets a reward model score its held-out votes from memory."""
    turns = [{"role": str(m["role"] if isinstance(m, dict) else m.role),
              "content": str(m["content"] if isinstance(m, dict) else m.content)} for m in messages]
    return json.dumps(turns, sort_keys=True, ensure_ascii=False)


def held_out(event: PreferenceEvent, fraction: float) -> bool:
    """Whether a vote belongs to the slice no reward model trains on (and the gate's prompts)."""
    return holdout_share(prompt_key(event.messages)) < fraction
