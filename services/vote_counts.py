"""Counting votes in the comparisons table: what the canary and the vote limit read.

The champion-vs-canary head-to-head (a plain count, and the per-user-capped `Tally` that
services/canary.py judges by, computed by the database) and one user's votes in a window (the
vote limit of POST /v1/feedback). Each function is a query on an open connection;
`ComparisonStore` (services/comparisons.py) runs them in a read-only transaction.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, case, func, literal, select

from services import db
from services.canary import Tally


def _pair_votes_since(champion: str, canary: str, since: datetime | None) -> tuple[ColumnElement[bool], ...]:
    """Voted comparisons of champion against canary (either side) voted since `since`."""
    c = db.comparisons
    return (c.c.choice.is_not(None), c.c.voted_at >= (since or datetime.min.replace(tzinfo=UTC)).isoformat(),
            ((c.c.version_a == champion) & (c.c.version_b == canary))
            | ((c.c.version_a == canary) & (c.c.version_b == champion)))


def head_to_head(conn: Connection, champion: str, canary: str, since: datetime | None) -> dict[str, int]:
    """Votes on champion-vs-canary pairs since `since`, from the canary's side."""
    out = {"votes": 0, "canary_wins": 0, "champion_wins": 0, "ties": 0, "both_bad": 0}
    c = db.comparisons
    rows = conn.execute(select(c.c.version_a, c.c.version_b, c.c.choice)
                        .where(*_pair_votes_since(champion, canary, since))).all()
    for left, right, choice in rows:
        out["votes"] += 1
        if choice == "tie":
            out["ties"] += 1
        elif choice == "both_bad":
            out["both_bad"] += 1
        else:
            winner = left if choice == "0" else right
            out["canary_wins" if winner == canary else "champion_wins"] += 1
    return out


def head_to_head_tally(conn: Connection, champion: str, canary: str, since: datetime | None,
                       max_per_user: int) -> Tally:
    """Votes on champion-vs-canary pairs since `since`, from the canary's side, each user's first
    `max_per_user` (in the order cast) counted: services/canary.py's `count_votes`, computed
    by the database (a window over the voted-at index) instead of row by row in Python."""
    c = db.comparisons
    canary_won = (((c.c.choice == "0") & (c.c.version_a == canary))
                  | ((c.c.choice == "1") & (c.c.version_b == canary)))
    side = case((c.c.choice.in_(("tie", "both_bad")), c.c.choice), (canary_won, literal("canary")),
                else_=literal("champion")).label("side")
    nth = func.row_number().over(partition_by=c.c.user, order_by=(c.c.voted_at, c.c.id)).label("nth")
    votes = select(c.c.user, side, nth).where(*_pair_votes_since(champion, canary, since)).subquery()
    counted_sum = func.sum(case((votes.c.nth <= max_per_user, 1), else_=0))
    by_side: Any = conn.execute(select(votes.c.side, counted_sum, func.count()).group_by(votes.c.side)).all()
    users = int(conn.execute(select(func.count(func.distinct(votes.c.user)))).scalar_one())
    counted = {str(side_): int(n) for side_, n, _ in by_side}
    return Tally(canary_wins=counted.get("canary", 0), champion_wins=counted.get("champion", 0),
                 ties=counted.get("tie", 0), both_bad=counted.get("both_bad", 0), users=users,
                 cast=sum(int(total) for _, _, total in by_side))


def votes_in_windows(conn: Connection, users: list[str], since: datetime,
                     ) -> dict[str, tuple[int, datetime | None]]:
    """Votes each of `users` cast since `since`, and when the oldest of them was cast (the vote
    limit); users without a vote there are absent. One query for a batch of votes."""
    c = db.comparisons
    rows: Any = conn.execute(select(c.c.user, func.count(), func.min(c.c.voted_at))
                             .where(c.c.user.in_(users), c.c.voted_at >= since.isoformat())
                             .group_by(c.c.user)).all()
    return {user: (int(n), datetime.fromisoformat(oldest) if oldest else None) for user, n, oldest in rows}
