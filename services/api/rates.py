"""Recent chat requests and votes, for `/admin/stats`: rates over a sliding window, votes by choice.

The chat route counts requests, the feedback route counts votes; one `Rates` lives on `app.state`.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any


class Rates:
    """Timestamps of recent chat requests and votes, for rates over a sliding window."""

    def __init__(self, window_s: float = 300.0, max_events: int = 200_000) -> None:
        self.window_s = window_s
        self.requests: deque[float] = deque(maxlen=max_events)
        self.votes: deque[float] = deque(maxlen=max_events)
        self.by_choice: dict[str, int] = {"0": 0, "1": 0, "tie": 0, "both_bad": 0}
        self.requests_total = 0
        self.votes_total = 0

    def request(self) -> None:
        self.requests.append(time.monotonic())
        self.requests_total += 1

    def vote(self, choice: str) -> None:
        self.votes.append(time.monotonic())
        self.votes_total += 1
        self.by_choice[choice] = self.by_choice.get(choice, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        cutoff = time.monotonic() - self.window_s
        for q in (self.requests, self.votes):
            while q and q[0] < cutoff:
                q.popleft()
        return {"requests_per_s": len(self.requests) / self.window_s,
                "votes_per_s": len(self.votes) / self.window_s,
                "votes_by_choice": dict(self.by_choice), "requests_total": self.requests_total,
                "votes_total": self.votes_total, "window_s": self.window_s}
