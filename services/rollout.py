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

The registry (services/registry.py) is the truth. This module reconciles the
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
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services import engine_health, metrics, model_events
from services.canary import CanaryDecision, canary_decision
from services.comparisons import ComparisonStore, DatabaseUnavailable
from services.engine import Engine, EngineUnavailable, SwapFailed
from services.leader import Lease
from services.registry import Registry
from services.registry_schema import STAGES, CorruptVersion, RegistryError, RegistryState
from services.settings import Settings
from services.version_folder import SHAPE_FIELDS, model_shape

log = logging.getLogger(__name__)

#: Time-to-first-token samples kept per version for the latency comparison.
TTFT_WINDOW = 500


def canary_share(user: str, canary: str) -> float:
    """A user's fixed position in [0, 1) for this canary: below the fraction → canary."""
    digest = hashlib.sha256(f"{canary}:{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


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


def emit_in_background(settings: Settings, type_: Any, version: str | None, **details: Any) -> None:
    """Model events never hold up a request or a swap (a missing broker would, for seconds)."""
    threading.Thread(target=model_events.emit, args=(settings, type_, version), kwargs=details,
                     name="kaizen-model-event", daemon=True).start()


class Rollout:
    """The engines of this process and their reconciliation with the registry."""

    def __init__(self, settings: Settings, comparisons: ComparisonStore) -> None:
        self.settings = settings
        self.registry = Registry(settings.registry_path)
        self.comparisons = comparisons
        self.champion: Engine | None = None
        self.canary: Engine | None = None
        self.canary_fraction = 0.0
        self.refused: dict[str, str] = {}
        self.health: dict[str, VersionHealth] = {}
        self.decision: dict[str, Any] = {"state": "none", "reason": "no canary"}
        self.lease = Lease(comparisons, "rollout", settings.rollout_lease_s)
        self._lock = asyncio.Lock()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._follower: ModelEventFollower | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    # -- start and stop -----------------------------------------------------------------

    def start(self) -> None:
        """Register v0 if the registry is empty and load the champion (and canary). Blocking."""
        base = self.settings.model_dir
        self.registry.init_base(base, who="chat-api")
        state = self.registry.state()
        version = self._servable_champion(state)
        log.info("loading champion %s from %s", version, self.registry.path(version))
        self.champion = Engine(self.settings, self.registry.path(version), version)
        if state.canary is not None:
            try:
                self.registry.verify(state.canary)
                self.canary = Engine(self.settings, self.registry.path(state.canary), state.canary,
                                     log_stats=False)
                self.canary_fraction = state.canary_fraction
                log.info("resumed canary %s at fraction %.2f", state.canary, state.canary_fraction)
            except Exception as exc:  # noqa: BLE001 - refuse, keep serving the champion
                self._refuse(state.canary, str(exc))
        self._record_stage_metrics(state)

    def _servable_champion(self, state: RegistryState) -> str:
        """The registry's champion if its files verify; else the newest earlier one that does."""
        candidates = [state.champion, *reversed(state.previous_champions), "v0"]
        for version in [v for v in candidates if v is not None]:
            try:
                self.registry.verify(version)
                return version
            except RegistryError as exc:
                self._refuse(version, str(exc))
        raise RuntimeError(f"no servable champion in {self.registry.root}: {self.refused}")

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
                engine.shutdown()
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

    def engine_named(self, version: str) -> Engine | None:
        for engine in (self.champion, self.canary):
            if engine is not None and engine.version == version:
                return engine
        return None

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
                changed = await self._auto(state)
                if changed is not None:
                    state = changed
                    await self._sync_champion(state)
                    await self._sync_canary(state)
            self._record_stage_metrics(state)
            return state

    def lead(self) -> bool:
        """Take or renew the rollout lease: True on the one replica that decides."""
        try:
            held = self.lease.hold()
        except DatabaseUnavailable as exc:
            log.warning("rollout lease: %s; not deciding until the store answers", exc)
            self.lease.held = held = False
        metrics.ROLLOUT_LEADER.set(1 if held else 0)
        return held

    def report_health(self, state: RegistryState) -> None:
        """Share this replica's numbers for champion and canary, for whichever replica judges."""
        numbers = {}
        for version in (state.champion, state.canary):
            if version is not None:
                h = self.health.get(version, VersionHealth())
                numbers[version] = (h.requests, h.errors, statistics.median(h.ttft) if h.ttft else None)
        try:
            self.comparisons.report_health(self.lease.holder, numbers)
        except DatabaseUnavailable as exc:
            log.warning("could not share health numbers: %s", exc)

    def fleet_health(self, versions: list[str]) -> dict[str, VersionHealth]:
        """Every replica's health numbers per version: requests and errors summed, time to first token
        the request-weighted median of the replicas' medians (an approximation). This replica counts
        with its live numbers; if the store is away, they are all there is."""
        local = {v: self.health.get(v, VersionHealth()) for v in versions}
        try:
            reports = self.comparisons.health(versions)
        except DatabaseUnavailable:
            return local
        out = {}
        for version in versions:
            mine = local[version]
            numbers = {**reports[version], self.lease.holder: (
                mine.requests, mine.errors, statistics.median(mine.ttft) if mine.ttft else None)}
            timed = sorted((t, n) for _, (n, _, t) in numbers.items() if t is not None and n > 0)
            half, seen, p50 = sum(n for _, n in timed) / 2, 0, None
            for ttft, n in timed:
                seen += n
                if seen >= half:
                    p50 = ttft
                    break
            out[version] = VersionHealth(requests=sum(n for n, _, _ in numbers.values()),
                                         errors=sum(e for _, e, _ in numbers.values()),
                                         ttft=deque([p50] if p50 is not None else [], maxlen=TTFT_WINDOW))
        return out

    def leader_decision(self) -> dict[str, Any]:
        """The decision the lease holder last published (what a follower shows operators)."""
        try:
            lease = self.lease.read()
        except DatabaseUnavailable:
            return {"state": "unknown", "reason": "the shared store is unavailable"}
        info = lease["info"] or {"state": "none", "reason": "no decision published yet"}
        return {**info, "leader": lease["holder"]}

    def _refuse(self, version: str, reason: str) -> None:
        if self.refused.get(version) == reason:
            return
        self.refused[version] = reason
        metrics.SWAPS.labels(result="refused").inc()
        log.error("refusing version %s: %s", version, reason)
        emit_in_background(self.settings, "refused", version, who="chat-api", reason=reason)

    async def preflight(self, version: str) -> None:
        """Raise `CorruptVersion` unless the files match the manifest and fit the serving engine."""
        await asyncio.to_thread(self.registry.verify, version)
        if self.champion is not None:
            new, old = model_shape(self.registry.path(version)), model_shape(self.champion.model_dir)
            if new != old:
                diff = {k: (old[k], new[k]) for k in SHAPE_FIELDS if old[k] != new[k]}
                raise CorruptVersion(version, f"does not fit the serving engine: {diff}")

    async def _check(self, version: str) -> bool:
        """`preflight`, refusing the version (once, reported) on failure."""
        if version in self.refused:
            return False
        try:
            await self.preflight(version)
        except RegistryError as exc:
            self._refuse(version, str(exc))
            return False
        return True

    async def _sync_champion(self, state: RegistryState) -> None:
        engine = self.champion
        target = state.champion
        if engine is None or target is None or engine.version == target:
            return
        if not engine.alive or engine.restarting:  # swap once it is back (next reconcile)
            return
        if not await self._check(target):
            return
        log.info("swapping champion %s → %s", engine.version, target)
        try:
            result = await engine.swap(self.registry.path(target), target, self.settings.swap_drain_timeout_s)
        except SwapFailed as exc:
            metrics.SWAPS.labels(result="failed").inc()
            self.refused[target] = str(exc)
            log.error("%s; still serving %s", exc, engine.version)
            emit_in_background(self.settings, "refused", target, who="chat-api", reason=str(exc))
            return
        metrics.SWAPS.labels(result="ok").inc()
        metrics.SWAP_DURATION.observe(result.held_s)
        metrics.MODEL_INFO.clear()
        metrics.MODEL_INFO.labels(model_version=target).set(1)
        log.info("now serving %s (drain %.2f s, load %.2f s, held %.2f s, %d frozen)", target,
                 result.drain_s, result.load_s, result.held_s, result.frozen)
        emit_in_background(self.settings, "swapped", target, who="chat-api", previous=result.old_version,
                           held_s=round(result.held_s, 3), frozen=result.frozen)

    async def _sync_canary(self, state: RegistryState) -> None:
        current = self.canary
        target = state.canary if state.canary != state.champion else None
        if current is not None and current.version != target:
            self.canary = None  # no new requests; in-flight ones finish, then the engine stops
            self.canary_fraction = 0.0
            self._retire(current)
        if target is not None and self.canary is None:
            if not await self._check(target):
                return
            log.info("starting canary engine for %s", target)
            try:
                engine = await asyncio.to_thread(Engine, self.settings, self.registry.path(target), target,
                                                 log_stats=False)
            except Exception as exc:  # noqa: BLE001 - refuse, the champion keeps serving
                metrics.SWAPS.labels(result="failed").inc()
                self.refused[target] = f"failed to load: {exc}"
                log.exception("canary %s failed to load", target)
                return
            self.canary = engine
        if self.canary is not None:
            self.canary_fraction = state.canary_fraction
        metrics.CANARY_TRAFFIC_FRACTION.set(self.canary_fraction if self.canary is not None else 0.0)

    def _retire(self, engine: Engine) -> None:
        async def drain_then_stop() -> None:
            deadline = time.monotonic() + self.settings.swap_drain_timeout_s
            while engine.admitted and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(engine.shutdown)
            log.info("canary engine %s stopped", engine.version)

        task = asyncio.create_task(drain_then_stop())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _record_stage_metrics(self, state: RegistryState) -> None:
        counts = dict.fromkeys(STAGES, 0)
        for vs in state.versions.values():
            counts[vs.stage] += 1
        for stage, n in counts.items():
            metrics.VERSIONS_BY_STAGE.labels(stage=stage).set(n)

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
        champ, can = fleet[state.champion], fleet[state.canary]
        if champ.requests >= s.canary_min_requests and can.requests >= s.canary_min_requests:
            champ_err, can_err = champ.errors / champ.requests, can.errors / can.requests
            if can_err - champ_err > s.canary_max_error_rate_increase:
                return "rollback", f"error rate {can_err:.1%} vs champion {champ_err:.1%}"
            if champ.ttft and can.ttft:
                c50, k50 = statistics.median(champ.ttft), statistics.median(can.ttft)
                if c50 > 0 and k50 / c50 > s.canary_max_ttft_ratio and k50 - c50 > s.canary_min_ttft_increase_s:
                    return "rollback", f"median time to first token {k50:.3f} s vs champion {c50:.3f} s"
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


class ModelEventFollower(threading.Thread):
    """Reads `kaizen.model-events` from the end (no consumer group) and wakes the reconcile loop."""

    def __init__(self, settings: Settings, on_event: Any) -> None:
        super().__init__(name="kaizen-model-events", daemon=True)
        self.settings, self.on_event = settings, on_event
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        s = self.settings
        backoff = s.model_events_backoff_min_s
        while not self._stop.is_set():
            consumer = None
            try:
                consumer = KafkaConsumer(
                    **s.kafka_options(), client_id="kaizen-chat-model-events",
                    group_id=None, enable_auto_commit=False, request_timeout_ms=s.kafka_request_timeout_ms,
                    metadata_max_age_ms=s.kafka_metadata_max_age_ms)
                parts = consumer.partitions_for_topic(s.topic_model_events)
                if not parts:
                    raise RuntimeError(f"topic {s.topic_model_events} not found yet")
                tps = [TopicPartition(s.topic_model_events, p) for p in sorted(parts)]
                consumer.assign(tps)
                consumer.seek_to_end(*tps)
                backoff = s.model_events_backoff_min_s
                while not self._stop.is_set():
                    batch = consumer.poll(timeout_ms=500)
                    events = [model_events.parse(r.value) for recs in batch.values() for r in recs]
                    if events:
                        log.info("model events: %s", ", ".join(f"{e.type} {e.version}" for e in events if e))
                        self.on_event()
            except Exception as exc:  # noqa: BLE001 - the registry poll covers the gap
                log.warning("model-event follower: %s (retrying in %.1f s)", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, s.model_events_backoff_max_s)
            finally:
                if consumer is not None:
                    consumer.close()
