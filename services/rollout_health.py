"""Health numbers per model version: what one API replica counts, and what the fleet adds up to.

Each replica counts requests, engine errors and recent time to first token per version as it
answers (`VersionHealth`, kept by the rollout, services/rollout.py). At each registry poll it
shares its numbers for champion and canary in the shared store (`report`), so the replica that
decides canaries (the rollout lease holder) compares error rates and latency over every
replica's traffic (`fleet`), not its own share of it.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from services.comparisons import ComparisonStore
from services.db import DatabaseUnavailable
from kaizen.core.registry_schema import RegistryState

log = logging.getLogger(__name__)

#: Time-to-first-token samples kept per version for the latency comparison.
TTFT_WINDOW = 500

#: One replica's numbers for a version: requests, errors, median time to first token (or None).
Numbers = tuple[int, int, float | None]


@dataclass
class VersionHealth:
    """Requests, engine errors and recent time-to-first-token of one version in this process."""

    requests: int = 0
    errors: int = 0
    ttft: deque[float] = field(default_factory=lambda: deque(maxlen=TTFT_WINDOW))

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors,
                "error_rate": self.errors / self.requests if self.requests else None,
                "ttft_p50_s": statistics.median(self.ttft) if self.ttft else None}

    def numbers(self) -> Numbers:
        """What this replica shares: requests, errors and its median time to first token."""
        return self.requests, self.errors, statistics.median(self.ttft) if self.ttft else None


def report(comparisons: ComparisonStore, holder: str, health: dict[str, VersionHealth],
           state: RegistryState) -> None:
    """Share this replica's numbers for champion and canary, for whichever replica judges."""
    numbers: dict[str, Numbers] = {}
    for version in (state.champion, state.canary):
        if version is not None:
            numbers[version] = health.get(version, VersionHealth()).numbers()
    try:
        comparisons.report_health(holder, numbers)
    except DatabaseUnavailable as exc:
        log.warning("could not share health numbers: %s", exc)


def fleet(comparisons: ComparisonStore, holder: str, health: dict[str, VersionHealth],
          versions: list[str]) -> dict[str, VersionHealth]:
    """Every replica's health numbers per version: requests and errors summed, time to first token
    the request-weighted median of the replicas' medians (an approximation). This replica (`holder`,
    its live numbers in `health`) counts with its live numbers; if the store is away, they are all
    there is."""
    local = {v: health.get(v, VersionHealth()) for v in versions}
    try:
        reports = comparisons.health(versions)
    except DatabaseUnavailable:
        return local
    out = {}
    for version in versions:
        numbers: dict[str, Numbers] = {**reports[version], holder: local[version].numbers()}
        p50 = _weighted_median(numbers.values())
        out[version] = VersionHealth(requests=sum(n for n, _, _ in numbers.values()),
                                     errors=sum(e for _, e, _ in numbers.values()),
                                     ttft=deque([p50] if p50 is not None else [], maxlen=TTFT_WINDOW))
    return out


def _weighted_median(numbers: Iterable[Numbers]) -> float | None:
    """The replicas' median times to first token, weighted by their requests: the median of them."""
    timed = sorted((t, n) for n, _, t in numbers if t is not None and n > 0)
    half, seen = sum(n for _, n in timed) / 2, 0
    for ttft, n in timed:
        seen += n
        if seen >= half:
            return ttft
    return None
