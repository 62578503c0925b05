"""Judging a batch of votes: each as if cast alone, in the order cast (`ComparisonStore.vote_many`).

A vote is refused for its user's vote limit (`VoteLimited`), for its comparison (`VoteError`:
missing, another user's, voted already, expired) or for a full outbox (`OutboxFull`); an
accepted one becomes its Preference event. `VoteBatch` keeps the batch's own effects (the
comparisons it voted, the votes it counted), so a second vote on one comparison or one vote
past the limit is refused inside a batch exactly as it would be across two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, insert, update

from kaizen.core.events import Answer, Choice, Message, PreferenceEvent
from services import db
from services.canary import vote_limit_wait


class VoteError(Exception):
    """A vote that cannot be accepted; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class VoteLimited(Exception):
    """The user cast `vote_limit_per_window` votes in the window; `wait_s` until one leaves it."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"vote limit reached; retry in {wait_s:.0f} s")
        self.wait_s = wait_s


@dataclass(frozen=True)
class VoteRequest:
    """One vote as `POST /v1/feedback` received it."""
    comparison_id: str
    user: str
    choice: Choice
    reason: str | None


@dataclass(frozen=True)
class VoteLimit:
    """At most `per_window` votes per user in any `window` (the settings' `vote_limit_*`)."""
    per_window: int
    window: timedelta


class OutboxFull(Exception):
    """The outbox holds `limit` undelivered events: refuse new votes rather than drop any."""


@dataclass
class VoteBatch:
    """One batch's view: its comparisons' rows (by id), each user's votes in the limit's window
    before the batch, the outbox's room, and what the batch took so far."""
    rows: dict[str, Any]
    window: dict[str, tuple[int, datetime | None]]
    limit: VoteLimit | None
    room: int
    max_pending: int
    now: datetime
    taken: list[PreferenceEvent] = field(default_factory=list)
    voted: set[str] = field(default_factory=set)

    def judge(self, v: VoteRequest) -> PreferenceEvent | Exception:
        """The vote's event (and it counts as taken), or its refusal."""
        try:
            self._check_limit(v.user)
            event = self._event(v)
            if len(self.taken) >= self.room:
                raise OutboxFull(f"{self.max_pending} votes are waiting for the broker")
        except (VoteLimited, VoteError, OutboxFull) as exc:
            return exc
        self.taken.append(event)
        self.voted.add(v.comparison_id)
        cast, oldest = self.window.get(v.user, (0, None))
        self.window[v.user] = (cast + 1, oldest or self.now)
        return event

    def _check_limit(self, user: str) -> None:
        if self.limit is None:
            return
        cast, oldest = self.window.get(user, (0, None))
        wait = vote_limit_wait(cast, oldest, self.now, self.limit.per_window, self.limit.window)
        if wait > 0:
            raise VoteLimited(wait)

    def _event(self, v: VoteRequest) -> PreferenceEvent:
        row = self.rows.get(v.comparison_id)
        if row is None:
            raise VoteError(404, "comparison_not_found", f"no comparison {v.comparison_id!r}")
        if row.user != v.user:
            raise VoteError(403, "not_your_comparison", "this comparison was served to another user")
        if row.voted_at is not None or v.comparison_id in self.voted:
            raise VoteError(409, "already_voted", "this comparison already has a vote")
        if datetime.fromisoformat(row.expires_at) <= self.now:
            raise VoteError(410, "comparison_expired", "this comparison has expired")
        return PreferenceEvent(
            comparison_id=v.comparison_id, user=v.user, served_at=datetime.fromisoformat(row.served_at),
            voted_at=self.now, messages=[Message.model_validate(m) for m in json.loads(row.messages)],
            answers=[Answer.model_validate(a) for a in json.loads(row.answers)],
            choice=v.choice, reason=v.reason,
        )


def write_votes(conn: Connection, events: list[PreferenceEvent], now: datetime) -> None:
    """The events into the outbox and their comparisons marked voted: two statements a batch."""
    c, at = db.comparisons, now.isoformat()
    conn.execute(insert(db.outbox), [
        {"event_id": str(e.event_id), "comparison_id": e.comparison_id, "key": e.user,
         "payload": e.to_bytes(), "created_at": at} for e in events])
    conn.execute(
        update(c).where(c.c.id == bindparam("b_id"), c.c.voted_at.is_(None))
        .values(voted_at=at, event_id=bindparam("b_event"), choice=bindparam("b_choice")),
        [{"b_id": e.comparison_id, "b_event": str(e.event_id), "b_choice": str(e.choice)} for e in events])
