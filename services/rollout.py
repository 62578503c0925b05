"""Which weights answer whom: champion, canary, hot-swaps and the live head-to-head.

The chat API process hosts up to two vLLM engines:

* the **champion** engine, always; a new champion's weights are swapped into it
  in place (`Engine.swap`: hold new requests, let in-flight answers finish,
  pause, `reload_weights`, resume), so no request fails and no answer mixes
  versions;
* a **canary** engine while a canary runs: a second `AsyncLLM` in the same
  process (its EngineCore is its own child process), serving the canary's
  weights to a sticky share of users. On CPU a second small engine costs its
  weights plus `KAIZEN_ENGINE_KV_CACHE_GIB`; in Kubernetes each replica hosts
  both the same way (a separate canary Deployment is the alternative for big
  models: see README, operator guide).

The registry (kaizen/core/registry.py) is the truth. This module reconciles the
process with it: at start, whenever a model event arrives on
`kaizen.model-events`, and every `KAIZEN_REGISTRY_POLL_INTERVAL_S` in case an
event was missed. A version whose files do not match its manifest, or that
does not load, is refused (metric, log, `refused` event) and the current
weights keep serving.

While a canary runs, paired answers are champion-vs-canary (positions
randomised), so votes are a live head-to-head. With `KAIZEN_AUTO_ROLLOUT` the
same loop promotes the canary when the anytime-valid interval of its win rate
(ties and "both bad" count half; services/canary.py, valid however often it is
re-checked) lies above 0.5, and rolls it back when the interval lies below 0.5,
both only after `KAIZEN_CANARY_MIN_VOTES` counted votes from
`KAIZEN_CANARY_MIN_USERS` users (each user's first
`KAIZEN_CANARY_MAX_VOTES_PER_USER` votes count); also when its error rate or
time to first token regress, or when it has run longer than
`KAIZEN_CANARY_MAX_DURATION`. It also puts each newly published candidate on
canary.

With several API replicas exactly one decides: the replica holding the
`rollout` lease in the shared store (services/leader.py) judges the
head-to-head from every replica's votes (they share the comparisons table)
and applies its decision to the registry as a compare-and-set on the state it
judged; it publishes the decision for the others' operator pages. The other
replicas only follow the registry and the model events. Every replica shares
its error and latency numbers per version in the store at each poll, so the
leader's error-rate and time-to-first-token checks cover all replicas' traffic.

The parts: services/rollout_engines.py loads, swaps, refuses and retires the engines as the
registry says; services/rollout_decisions.py judges the canary and acts on the registry;
services/rollout_health.py counts each version's health and adds up the fleet's;
services/rollout_events.py emits and follows model events. This module puts them together:
`Rollout` routes each request to its engine and runs the reconcile loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from typing import Any

from services import engine_health
from kaizen.core import metrics
from services.comparisons import ComparisonStore
from services.engine import Engine, EngineUnavailable
from kaizen.core.registry_schema import RegistryState
from services.rollout_decisions import RolloutDecisions
from services.rollout_events import ModelEventFollower
from services.rollout_health import VersionHealth
from kaizen.core.settings import Settings

log = logging.getLogger(__name__)


def canary_share(user: str, canary: str) -> float:
    """A user's fixed position in [0, 1) for this canary: below the fraction → canary."""
    digest = hashlib.sha256(f"{canary}:{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Rollout(RolloutDecisions):
    """The engines of this process and their reconciliation with the registry."""

    def __init__(self, settings: Settings, comparisons: ComparisonStore) -> None:
        super().__init__(settings, comparisons)
        self._lock = asyncio.Lock()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._follower: ModelEventFollower | None = None

    # -- start and stop (`start`, the blocking first load, is in services/rollout_engines.py) -------

    def run_in_background(self) -> None:
        """Start the reconcile loop, the engine watchdog (restarts a dead engine, heartbeats for the
        probes: services/engine_health.py) and the model-event follower (call from the event loop)."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="kaizen-rollout")
        self._watchdog = asyncio.create_task(engine_health.watch(
            self.settings, lambda: [e for e in (self.champion, self.canary) if e is not None],
            lambda: self.champion), name="kaizen-engine-watchdog")
        self._follower = ModelEventFollower(self.settings, self.wake)
        self._follower.start()

    def wake(self) -> None:
        """Reconcile now (thread-safe: the event follower calls it)."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.registry_poll_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must outlive any one failure
                log.exception("rollout reconcile failed; retrying at the next poll")

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.stop()
        for task in (self._task, self._watchdog):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001
                    pass
        for task in list(self._retiring):
            task.cancel()
        for engine in (self.canary, self.champion):
            if engine is not None:
                await engine.stop()
        self.canary = self.champion = None
        await asyncio.to_thread(self.lease.release)
        metrics.ROLLOUT_LEADER.set(0)

    # -- routing ------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.champion is not None

    def engine_for(self, user: str) -> Engine:
        """The engine that answers this user: the canary for a sticky share of users."""
        if self.champion is None:  # get_rollout refuses before the load; this is a request racing `stop`
            raise EngineUnavailable("engine_stopped", "the model is not loaded: the server is stopping")
        canary = self.canary
        if canary is not None and canary_share(user, canary.version) < self.canary_fraction:
            return canary
        return self.champion

    def pair_engines(self) -> list[Engine] | None:
        """Champion and canary in random order (left/right) while a canary runs, else None."""
        if self.champion is None or self.canary is None:
            return None
        pair = [self.champion, self.canary]
        random.shuffle(pair)
        return pair

    def observe(self, version: str, ttft_s: float | None = None, error: bool = False) -> None:
        h = self.health.setdefault(version, VersionHealth())
        if ttft_s is not None:
            h.ttft.append(ttft_s)
        if error:
            h.errors += 1
            metrics.CHAT_ERRORS.labels(model_version=version).inc()

    def count_request(self, version: str) -> None:
        self.health.setdefault(version, VersionHealth()).requests += 1
        metrics.CHAT_REQUESTS.labels(model_version=version).inc()

    # -- reconciliation --------------------------------------------------------------------

    async def reconcile(self) -> RegistryState:
        async with self._lock:
            state = await asyncio.to_thread(self.registry.state)
            await self._sync_champion(state)
            await self._sync_canary(state)
            if state.canary is not None:
                await asyncio.to_thread(self.report_health, state)
            if self.settings.auto_rollout and not await asyncio.to_thread(self.lead):
                self.decision = await asyncio.to_thread(self.leader_decision)
            elif self.settings.auto_rollout:
                if self.decision.get("leader") != self.lease.holder:
                    # just took the lease (its info was cleared): the last decision read as a
                    # follower is republished as this replica's, so every replica names one leader
                    await self._publish({k: v for k, v in self.decision.items() if k != "leader"})
                changed = await self._auto(state)
                if changed is not None:
                    state = changed
                    await self._sync_champion(state)
                    await self._sync_canary(state)
            self._record_stage_metrics(state)
            return state

    # -- what operators see -------------------------------------------------------------------

    def _health_status(self, state: RegistryState) -> dict[str, Any]:
        """Champion's and canary's health over every replica (this replica's alone without a canary)."""
        if state.champion is None or state.canary is None:
            champion = self.health.get(state.champion or "", VersionHealth())
            return {"champion": champion.as_dict(), "canary": None}
        fleet = self.fleet_health([state.champion, state.canary])
        return {"champion": fleet[state.champion].as_dict(), "canary": fleet[state.canary].as_dict()}

    def status(self, state: RegistryState | None = None) -> dict[str, Any]:
        state = state or self.registry.state()
        return {
            "champion": state.champion,
            "canary": state.canary,
            "canary_fraction": state.canary_fraction,
            "canary_started": state.canary_started.isoformat() if state.canary_started else None,
            "auto_rollout": self.settings.auto_rollout,
            "serving": {"champion": self.champion.version if self.champion else None,
                        "canary": self.canary.version if self.canary else None,
                        "canary_fraction": self.canary_fraction if self.canary else 0.0},
            "head_to_head": self.head_to_head(state),
            "health": self._health_status(state),
            "decision": {**(self.decision if self.settings.auto_rollout else
                            dict(zip(("state", "reason"), self.judge(state), strict=True))),
                         "automatic": self.settings.auto_rollout, "min_votes": self.settings.canary_min_votes,
                         "min_users": self.settings.canary_min_users, "alpha": self.settings.canary_alpha,
                         "max_votes_per_user": self.settings.canary_max_votes_per_user},
            "refused": self.refused,
            "generation": state.generation,
        }
