"""The engines of the chat API process, kept in step with the model registry.

The process hosts up to two vLLM engines: the champion's, always, into which a new champion's
weights are swapped in place (`Engine.swap`), and a canary's while a canary runs, a second engine
in the same process (services/rollout.py says more). The registry (kaizen/core/registry.py) is the
truth: `RolloutEngines` loads what it names at start, and at each reconcile swaps the champion's
weights, starts or retires the canary engine. A version whose files do not match its manifest, or
do not fit the serving engine, or that does not load, is refused (metric, log, `refused` event)
and the current weights keep serving.
"""

from __future__ import annotations

import asyncio
import logging

from kaizen.core import metrics
from services.comparisons import ComparisonStore
from services.engine import Engine, SwapFailed
from kaizen.core.registry import Registry
from kaizen.core.registry_schema import STAGES, CorruptVersion, RegistryError, RegistryState
from services.rollout_events import emit_in_background
from kaizen.core.settings import Settings
from kaizen.core.version_folder import SHAPE_FIELDS, model_shape

log = logging.getLogger(__name__)


class RolloutEngines:
    """Champion and canary engine of this process, loaded, swapped and retired as the registry says."""

    def __init__(self, settings: Settings, comparisons: ComparisonStore) -> None:
        self.settings = settings
        self.registry = Registry(settings.registry_path)
        self.comparisons = comparisons
        self.champion: Engine | None = None
        self.canary: Engine | None = None
        self.canary_fraction = 0.0
        self.refused: dict[str, str] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    # -- the first load ---------------------------------------------------------------------

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

    def engine_named(self, version: str) -> Engine | None:
        for engine in (self.champion, self.canary):
            if engine is not None and engine.version == version:
                return engine
        return None

    # -- checking a version before it serves ------------------------------------------------

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

    # -- following the registry -------------------------------------------------------------

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
            await engine.retire(self.settings.canary_retire_drain_s)
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
