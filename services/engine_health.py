"""Is the chat engine alive and serving? The watchdog behind `/readyz` and `/healthz`.

    curl -s localhost:8000/readyz    # {"status": "ready"}, or 503 while loading or restarting
    curl -s localhost:8000/healthz   # {"status": "ok"}, or 503: the process should be restarted

Every `KAIZEN_ENGINE_WATCHDOG_INTERVAL_S` the watchdog looks at each engine of the
process (champion and canary). A dead one (vLLM saw its EngineCore process exit:
killed, crashed, out of memory) is restarted on the same version
(`Engine.ensure_recovering`); a live one is asked a trivial question
(`Engine.heartbeat`), which the EngineCore answers between two steps.

* **Readiness** (take this replica out of the load balancer) fails while there is no
  champion yet, while the champion is dead or restarting, and while a heartbeat has gone
  unanswered for `KAIZEN_ENGINE_HEARTBEAT_TIMEOUT_S`.
* **Liveness** (restart the process) fails when the champion has shown no sign of life
  (an answered heartbeat, a start, a swap) for `KAIZEN_ENGINE_STALL_TIMEOUT_S`: a wedged
  EngineCore, a restart that never succeeds, or a watchdog that stopped. A process whose
  event loop is wedged does not answer the probe at all, which fails it too.

The probes are unauthenticated, so they name no versions; `/admin/rollout` does.
A dead canary is restarted the same way but does not make the replica unready:
the champion still serves everyone else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from kaizen.core import metrics
from services.engine import Engine
from kaizen.core.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """A probe's verdict: `code` is `ready`/`ok`, or why not (the 503's error code)."""

    ok: bool
    code: str
    message: str = ""


def readiness(champion: Engine | None, settings: Settings, now: float) -> Probe:
    """Can this replica answer chat requests now?"""
    if champion is None:
        return Probe(False, "loading", "the model is still loading")
    if champion.restarting or not champion.alive:
        return Probe(False, "engine_restarting", "the model engine stopped and is being restarted")
    waited = champion.unanswered_s(now)
    if waited > settings.engine_heartbeat_timeout_s:
        return Probe(False, "engine_unresponsive", f"the model engine has not answered for {waited:.0f} s")
    return Probe(True, "ready")


def liveness(champion: Engine | None, settings: Settings, now: float) -> Probe:
    """Should the orchestrator restart this process? Only when the engine has been silent too long."""
    if champion is None:  # loading (the startup probe's time) or shutting down
        return Probe(True, "ok")
    silent = now - champion.last_alive
    if silent > settings.engine_stall_timeout_s:
        return Probe(False, "engine_stalled",
                     f"the model engine has shown no sign of life for {silent:.0f} s")
    return Probe(True, "ok")


async def watch(settings: Settings, engines: Callable[[], list[Engine]],
                champion: Callable[[], Engine | None]) -> None:
    """Restart dead engines and send heartbeats, forever (cancel to stop)."""
    interval = settings.engine_watchdog_interval_s
    while True:
        try:
            current = engines()
            for engine in current:
                engine.ensure_recovering()
            await asyncio.gather(*(e.heartbeat(interval) for e in current if e.alive))
            metrics.ENGINE_READY.set(1 if readiness(champion(), settings, time.monotonic()).ok else 0)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the watchdog must outlive any one failure
            log.exception("engine watchdog check failed")
        await asyncio.sleep(interval)
