"""The live head-to-head and the automatic decisions on a canary.

While a canary runs, paired answers are champion-vs-canary, so votes are a live head-to-head.
`RolloutDecisions.judge` reads it: a canary whose error rate or median time to first token regressed
(over every replica's traffic: services/rollout_health.py) is rolled back; otherwise the votes'
verdict (services/canary.py: anytime-valid interval, counted votes and users) promotes or rolls back;
past `KAIZEN_CANARY_MAX_DURATION` without one, it is rolled back. With `KAIZEN_AUTO_ROLLOUT` the
replica holding the `rollout` lease (services/leader.py) applies that verdict to the registry as a
compare-and-set on the state it judged (`act`), puts each newly published candidate on canary, and
publishes its decision for the other replicas' operator pages. Operators' `kaizen models
canary|promote|rollback` go through the same `act`.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
from datetime import UTC, datetime
from typing import Any

from services import rollout_health
from kaizen.core import metrics
from services.canary import CanaryDecision, canary_decision
from services.comparisons import ComparisonStore
from services.db import DatabaseUnavailable
from services.leader import Lease
from kaizen.core.registry_schema import RegistryError, RegistryState
from services.rollout_engines import RolloutEngines
from services.rollout_events import emit_in_background
from services.rollout_health import VersionHealth
from kaizen.core.settings import Settings

log = logging.getLogger(__name__)


def health_regression(s: Settings, champ: VersionHealth, can: VersionHealth) -> tuple[str, str] | None:
    """("rollback", why) when the canary's error rate or median time to first token regressed against
    the champion's, once both served `canary_min_requests`; None when neither did."""
    if champ.requests >= s.canary_min_requests and can.requests >= s.canary_min_requests:
        champ_err, can_err = champ.errors / champ.requests, can.errors / can.requests
        if can_err - champ_err > s.canary_max_error_rate_increase:
            return "rollback", f"error rate {can_err:.1%} vs champion {champ_err:.1%}"
        if champ.ttft and can.ttft:
            c50, k50 = statistics.median(champ.ttft), statistics.median(can.ttft)
            if c50 > 0 and k50 / c50 > s.canary_max_ttft_ratio and k50 - c50 > s.canary_min_ttft_increase_s:
                return "rollback", f"median time to first token {k50:.3f} s vs champion {c50:.3f} s"
    return None


class RolloutDecisions(RolloutEngines):
    """The engines plus the canary's judge: the rollout lease, the head-to-head, automatic actions."""

    def __init__(self, settings: Settings, comparisons: ComparisonStore) -> None:
        super().__init__(settings, comparisons)
        self.health: dict[str, VersionHealth] = {}
        self.decision: dict[str, Any] = {"state": "none", "reason": "no canary"}
        self.lease = Lease(comparisons, "rollout", settings.rollout_lease_s)

    # -- who decides, and on which numbers --------------------------------------------------

    def lead(self) -> bool:
        """Take or renew the rollout lease: True on the one replica that decides."""
        try:
            held = self.lease.hold()
        except DatabaseUnavailable as exc:
            log.warning("rollout lease: %s; not deciding until the store answers", exc)
            self.lease.held = held = False
        metrics.ROLLOUT_LEADER.set(1 if held else 0)
        return held

    def leader_decision(self) -> dict[str, Any]:
        """The decision the lease holder last published (what a follower shows operators)."""
        try:
            lease = self.lease.read()
        except DatabaseUnavailable:
            return {"state": "unknown", "reason": "the shared store is unavailable"}
        info = lease["info"] or {"state": "none", "reason": "no decision published yet"}
        return {**info, "leader": lease["holder"]}

    def report_health(self, state: RegistryState) -> None:
        """Share this replica's numbers for champion and canary, for whichever replica judges."""
        rollout_health.report(self.comparisons, self.lease.holder, self.health, state)

    def fleet_health(self, versions: list[str]) -> dict[str, VersionHealth]:
        """Every replica's health numbers per version (services/rollout_health.py, `fleet`)."""
        return rollout_health.fleet(self.comparisons, self.lease.holder, self.health, versions)

    # -- the live head-to-head and automatic decisions ----------------------------------------

    def head_to_head(self, state: RegistryState | None = None) -> dict[str, Any]:
        """The counted champion-vs-canary votes, their anytime interval and the votes' verdict.

        `votes`, the wins, `win_rate`, `lower` and `upper` are over the counted votes (each user's
        first `canary_max_votes_per_user`); `votes_cast` counts every vote, `users` the distinct
        voters counted. `verdict` and `reason` are what the votes alone say (services/canary.py)."""
        s = self.settings
        state = state or self.registry.state()
        empty: dict[str, Any] = {"votes": 0, "canary_wins": 0, "champion_wins": 0, "ties": 0, "both_bad": 0,
                                 "win_rate": None, "lower": None, "upper": None, "votes_cast": 0, "users": 0,
                                 "alpha": s.canary_alpha, "verdict": "collecting", "reason": "no canary"}
        if state.canary is None or state.champion is None:
            return empty
        tally = self.comparisons.head_to_head_tally(state.champion, state.canary, state.canary_started,
                                                    s.canary_max_votes_per_user)
        d: CanaryDecision = canary_decision(tally, alpha=s.canary_alpha, min_votes=s.canary_min_votes,
                                            min_users=s.canary_min_users, tuned_votes=s.canary_tuned_votes)
        out = {**empty, "votes": tally.votes, "canary_wins": tally.canary_wins,
               "champion_wins": tally.champion_wins, "ties": tally.ties, "both_bad": tally.both_bad,
               "votes_cast": tally.cast, "users": tally.users, "win_rate": d.win_rate, "lower": d.lower,
               "upper": d.upper, "verdict": d.verdict, "reason": d.reason}
        metrics.CANARY_VOTES.set(tally.votes)
        if d.win_rate is not None and d.lower is not None and d.upper is not None:
            metrics.CANARY_WIN_RATE.set(d.win_rate)
            metrics.CANARY_WIN_RATE_LOWER.set(d.lower)
            metrics.CANARY_WIN_RATE_UPPER.set(d.upper)
        return out

    def judge(self, state: RegistryState, h: dict[str, Any] | None = None) -> tuple[str, str]:
        """("promote" | "rollback" | "collecting" | "none", why) for the current canary; `h`: its
        `head_to_head`, when the caller read it already."""
        s = self.settings
        if state.canary is None or state.champion is None:
            return "none", "no canary"
        h = h if h is not None else self.head_to_head(state)
        fleet = self.fleet_health([state.champion, state.canary])  # every replica's traffic
        regressed = health_regression(s, fleet[state.champion], fleet[state.canary])
        if regressed is not None:
            return regressed
        if h["verdict"] in ("promote", "rollback"):
            return h["verdict"], h["reason"]
        started = state.canary_started
        if started is not None and datetime.now(UTC) - started > s.canary_max_duration:
            return "rollback", f"no decision after {s.canary_max_duration} ({h['votes']} counted votes)"
        return "collecting", h["reason"]

    async def _auto(self, state: RegistryState) -> RegistryState | None:
        """Apply an automatic decision, or start a canary for the newest candidate."""
        if state.canary is not None:
            # the votes are read in a thread: a long canary's tally must not hold up the event loop
            verdict, why = self.judge(state, await asyncio.to_thread(self.head_to_head, state))
            await self._publish({"state": verdict, "reason": why, "canary": state.canary,
                                 "generation": state.generation})
            if verdict == "promote":
                return await self._act_once("promote", why=why, version=state.canary, expect=state.generation)
            if verdict == "rollback":
                return await self._act_once("rollback", why=why, expect=state.generation)
            return None
        await self._publish({"state": "none", "reason": "no canary", "generation": state.generation})
        champion_n = int(state.champion[1:]) if state.champion else -1
        candidates = [v for v, vs in state.versions.items()
                      if vs.stage == "candidate" and int(v[1:]) > champion_n and v not in self.refused
                      and not self._imported(v)]
        if not candidates:
            return None
        newest = max(candidates, key=lambda v: int(v[1:]))
        return await self._act_once("canary", why="newly published candidate", version=newest,
                                    fraction=self.settings.canary_fraction, expect=state.generation)

    async def _publish(self, decision: dict[str, Any]) -> None:
        self.decision = {**decision, "leader": self.lease.holder}
        try:
            await asyncio.to_thread(self.lease.publish, self.decision)
        except DatabaseUnavailable as exc:
            log.warning("could not publish the rollout decision: %s", exc)

    async def _act_once(self, action: str, **kwargs: Any) -> RegistryState | None:
        """An automatic action, applied only if the registry is still at the generation judged."""
        try:
            return await self.act(action, who="auto", **kwargs)
        except RegistryError as exc:
            if exc.code != "stale_decision":
                raise
            log.info("automatic %s not applied: %s", action, exc)
            return None

    def _imported(self, version: str) -> bool:
        """Imported versions passed no gate here: an operator canaries them, never the automatic rollout."""
        try:
            return self.registry.manifest(version).imported
        except RegistryError:
            return False

    async def act(self, action: str, *, who: str, why: str, version: str | None = None,
                  fraction: float | None = None, expect: int | None = None) -> RegistryState:
        """Change the registry (canary / promote / rollback), emit the model event, count it."""
        actor = "auto" if who == "auto" else "operator"
        ev_version: str | None
        if action in ("canary", "promote"):
            target = version or (await asyncio.to_thread(self.registry.state)).canary
            if target is not None and self.engine_named(target) is None:
                await self.preflight(target)  # refuse before anything changes
        if action == "canary":
            assert version is not None and fraction is not None
            state = await asyncio.to_thread(self.registry.set_canary, version, fraction, who=who, why=why,
                                            expect=expect)
            event, ev_version = "canary", version
        elif action == "promote":
            state = await asyncio.to_thread(self.registry.promote, version, who=who, why=why, expect=expect)
            event, ev_version = "promoted", state.champion
        elif action == "rollback":
            before = await asyncio.to_thread(self.registry.state)
            state = await asyncio.to_thread(self.registry.rollback, who=who, why=why, expect=expect)
            event, ev_version = "rolled_back", before.canary or before.champion
        else:
            raise ValueError(action)
        metrics.ROLLOUT_DECISIONS.labels(action=action, actor=actor).inc()
        log.info("%s %s by %s: %s", action, ev_version, who, why)
        emit_in_background(self.settings, event, ev_version, who=who, reason=why, champion=state.champion,
                           canary=state.canary, fraction=state.canary_fraction)
        return state
