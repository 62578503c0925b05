"""Wall-clock seconds per named phase, as a context manager.

    timer = PhaseTimer()
    with timer("rollout"): ...          # timer.seconds == {"rollout": 1.23}

A PPO iteration times rollout, scoring, training and sync with one (trainer/ppo.py); a training
round its engine start, reward-model refresh, PPO, gate and publish (trainer/round_phases.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class PhaseTimer:
    """Seconds per named phase: `with timer("rollout"): ...`; `timer.seconds` maps name -> s.

    A phase timed twice adds up. `seconds`: a dict to fill (a round's record keeps it), else a new one."""

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        self.seconds: dict[str, float] = {} if seconds is None else seconds

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - started
