"""The loop benchmark's canaries and time (simulation/loop.py): a published version's rollout driven
by simulated votes, and how much of the loop's budget a round may spend.

    rollout_version(base, admin, "v1", votes, config, r)   # until promoted or rolled back
    round_minutes(config, elapsed, votes_rec, canaries)    # the round's round_max_minutes
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from simulation.loop import LoopConfig

log = logging.getLogger(__name__)

#: A batch of simulated votes: (number of votes, seed, progress label) -> the simulation's numbers.
Votes = Callable[..., dict[str, Any]]


def round_minutes(config: LoopConfig, elapsed: float, votes_rec: dict[str, Any],
                  canaries: list[float]) -> float:
    """The training round's time (setting round_max_minutes, in minutes): what the loop's budget has
    left after `elapsed` seconds, less the canary that follows the round: as long as the longest so
    far (`canaries`, seconds), or before the first, `canary_time_factor` x its votes at the rate this
    round's votes came (`votes_rec["votes_per_s"]`). At least `min_round_minutes`: the first round
    always runs, and a round that cannot fit still gets its one PPO iteration."""
    rate = votes_rec.get("votes_per_s") or 0.0
    canary = max(canaries) if canaries else (
        config.canary_time_factor * config.canary_votes / rate if rate else 0.0)
    return max(config.min_round_minutes, (config.budget_s - elapsed - canary) / 60)


def admin_status(base: str, admin: dict[str, str]) -> dict[str, Any]:
    """GET /admin/rollout: the champion, the canary and their head-to-head."""
    r = httpx.get(f"{base}/admin/rollout", headers=admin, timeout=30)
    r.raise_for_status()
    return dict(r.json())


def wait_outbox_empty(base: str, timeout_s: float = 60.0) -> None:
    """Until the API's relay has handed every vote to Kafka (kaizen_outbox_pending 0)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx.get(f"{base}/metrics/", timeout=10).text
        m = re.search(r"^kaizen_outbox_pending (\S+)$", text, re.M)
        if m and float(m.group(1)) == 0:
            return
        time.sleep(0.25)
    log.warning("votes still waiting in the outbox after %.0f s", timeout_s)


def rollout_version(base: str, admin: dict[str, str], version: str, votes: Votes,
                    config: LoopConfig, r: int) -> dict[str, Any]:
    """Wait for the automatic canary of `version`, vote until it is decided (or decide at the budget)."""
    deadline = time.monotonic() + 120
    while admin_status(base, admin)["serving"]["canary"] != version:
        if time.monotonic() > deadline:
            return {"result": "not canaried", "reason": json.dumps(admin_status(base, admin)["refused"])}
        time.sleep(0.5)
    spent, batch = 0, max(5, config.canary_votes // 6)
    while spent < config.canary_votes:
        votes(batch, config.seed * 1000 + 500 + r * 37 + spent, f"canary {version}: votes")
        spent += batch
        time.sleep(1.5)  # the reconcile loop judges every poll interval
        status = admin_status(base, admin)
        if status["canary"] is None:
            audit = httpx.get(f"{base}/admin/audit?limit=20", headers=admin, timeout=30).json()["data"]
            last = next((e for e in audit
                         if e["version"] == version and e["action"] in ("promote", "rollback")), None)
            result = "promoted" if status["champion"] == version else "rolled back"
            return {"result": result, "reason": last["why"] if last else "", "votes": spent,
                    "head_to_head": status["head_to_head"]}
    status = admin_status(base, admin)
    h = status["head_to_head"]
    action = "promote" if (h["win_rate"] or 0) > 0.5 else "rollback"
    why = f"loop vote budget spent ({h['votes']} votes, win rate {h['win_rate']})"
    httpx.post(f"{base}/admin/{action}", headers=admin, json={"reason": why, "who": "bench-loop"},
               timeout=180)
    return {"result": "promoted" if action == "promote" else "rolled back", "reason": why, "votes": spent,
            "head_to_head": h}
