"""The vLLM engine the chat API serves from, and how prompts reach it.

The API process holds one `AsyncLLM` (vLLM's V1 async engine; its EngineCore
runs in a spawned child process). Prompts are rendered here with the model's
own chat template and passed as token ids, so the template is the tokenizer's
and the prompt token count is known before generation starts.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaizen.core import metrics
from kaizen.core.engine_config import configure_vllm_env, engine_args, running_config
from kaizen.core.settings import Settings

log = logging.getLogger(__name__)

_EXPORTED: Counter[str] = Counter()
"""Engines per version label of kaizen_engine_config_info."""


@dataclass(frozen=True)
class SwapResult:
    old_version: str
    new_version: str
    drain_s: float
    load_s: float
    held_s: float
    """How long new requests waited (drain + load + resume)."""
    frozen: int
    """In-flight answers that did not finish within the drain timeout and were resumed
    on the new weights; their label names both versions."""


class SwapFailed(Exception):
    """The new weights could not be loaded; the engine serves the old ones again (reloaded in
    place, or in a restarted engine when the reload hung or killed it)."""


class EngineUnavailable(Exception):
    """This engine cannot take or finish a request now; the API answers 503 with Retry-After.

    `reason` (the error code): `engine_busy` (waited `engine_admit_timeout_s` for a weight swap
    or a restart), `engine_queue_full` (`engine_max_waiting` requests wait already),
    `engine_dead` (the EngineCore died under the request; it is being restarted) or
    `engine_stopped` (the engine was retired: a canary withdrawn)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Engine:
    """An `AsyncLLM` plus the tokenizer and the version label of its weights.

    Requests are *admitted* before they reach vLLM (`admit`/`release`): that is
    how a weight swap knows what is in flight and holds new requests back, so
    the version a response is labelled with is the one that generated it. The
    same gate holds new requests while a dead engine is restarted; both waits are
    bounded (`engine_admit_timeout_s`, `engine_max_waiting`).

    Health: `alive` is false once vLLM has seen its EngineCore die; `heartbeat`
    (called by services/engine_health.py) asks the EngineCore a trivial question
    and `unanswered_s` says how long the pending question has gone unanswered;
    `last_alive` is when the engine last showed it works (an answer, a start, a swap).
    """

    def __init__(self, settings: Settings, model_dir: Path, version: str, *, log_stats: bool = True) -> None:
        from transformers import AutoTokenizer

        configure_vllm_env(settings)
        self.settings = settings
        self.model_dir = model_dir
        self.version = version
        self.log_stats = log_stats
        self.config: dict[str, str] = {}
        """What the running vLLM engine reports (`running_config`)."""
        self._exported: str | None = None
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        self.llm = self._start_llm(model_dir)
        self._open = asyncio.Event()
        self._open.set()
        self._swap_lock = asyncio.Lock()
        self._inflight: dict[str, float] = {}
        self._straddled: dict[str, str] = {}
        self._waiting = 0
        self._closed = False
        self.restarting = False
        self._recovery: asyncio.Task[None] | None = None
        self._ping: asyncio.Task[Any] | None = None
        self._ping_sent = 0.0
        self.last_alive = time.monotonic()

    def _start_llm(self, model_dir: Path) -> Any:
        """A new `AsyncLLM` (and its EngineCore process) on `model_dir`. Blocking: tens of seconds."""
        from vllm.v1.engine.async_llm import AsyncLLM

        llm = AsyncLLM.from_engine_args(engine_args(self.settings, model_dir, self.log_stats))
        self.config = running_config(llm)
        self._export_config(self.version)
        log.info("engine for %s runs with %s", self.version, self.config)
        return llm

    def _export_config(self, version: str | None) -> None:
        """Label kaizen_engine_config_info with `version` (None: this engine is gone). A series is
        removed when no engine serves its version any more (a promoted canary's version is also
        the champion's for a moment)."""
        if self._exported == version:
            return
        if self._exported is not None:
            _EXPORTED[self._exported] -= 1
            if _EXPORTED[self._exported] <= 0:
                del _EXPORTED[self._exported]
                metrics.ENGINE_CONFIG.remove(self._exported)
        if version is not None:
            _EXPORTED[version] += 1
            metrics.ENGINE_CONFIG.labels(model_version=version).info(self.config)
        self._exported = version

    # -- admission -------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """False once vLLM has noticed its EngineCore is gone (killed, crashed), or after shutdown."""
        return not self._closed and not self.llm.errored

    async def admit(self, request_id: str) -> str:
        """Wait while a swap or restart holds new requests (bounded); register the request;
        return the version it gets. Raises `EngineUnavailable` past the bounds."""
        s = self.settings
        deadline = time.monotonic() + s.engine_admit_timeout_s
        while not (self._open.is_set() and self.alive):
            if self._closed:
                raise EngineUnavailable("engine_stopped", "this model version is no longer served: retry")
            self.ensure_recovering()  # a dead engine nobody noticed yet: restart it, then wait
            if self._waiting >= s.engine_max_waiting:
                raise EngineUnavailable("engine_queue_full", f"{self._waiting} requests already wait while "
                                        f"the model is {self._holding()}: retry shortly")
            left = deadline - time.monotonic()
            self._waiting += 1
            try:
                await asyncio.wait_for(self._open.wait(), max(left, 0.0))
            except TimeoutError:
                raise EngineUnavailable("engine_busy", f"the model is {self._holding()}; waited "
                                        f"{s.engine_admit_timeout_s:g} s: retry shortly") from None
            finally:
                self._waiting -= 1
        self._inflight[request_id] = time.monotonic()
        return self.version

    def _holding(self) -> str:
        return "restarting" if self.restarting or not self.alive else "swapping weights"

    def release(self, request_id: str) -> str | None:
        """The request is over. Returns its label if a swap resumed it on other weights."""
        self._inflight.pop(request_id, None)
        return self._straddled.pop(request_id, None)

    @property
    def admitted(self) -> int:
        return len(self._inflight)

    @property
    def waiting(self) -> int:
        """Requests waiting at the gate for a swap or restart to end."""
        return self._waiting

    # -- weight swaps ----------------------------------------------------------------------

    async def swap(self, model_dir: Path, version: str, drain_timeout_s: float) -> SwapResult:
        """Load other weights into the running engine without failing any request.

        New requests wait (`admit`) while in-flight ones finish, for up to
        `drain_timeout_s`; the engine is then paused with whatever remains frozen
        (vLLM `pause_generation(mode="keep")`), the weights are reloaded in place
        from `model_dir`, and generation resumes. If loading fails, the old
        weights are loaded back and `SwapFailed` is raised. Each engine call is
        bounded by `swap_reload_timeout_s`: one that hangs (or an engine that dies
        meanwhile) leaves weights half loaded, so the engine is restarted on the
        old folder instead (frozen answers end with 503) and `SwapFailed` is raised."""
        bound = self.settings.swap_reload_timeout_s
        async with self._swap_lock:
            started = time.perf_counter()
            self._open.clear()
            try:
                deadline = started + drain_timeout_s
                while self._inflight and time.perf_counter() < deadline:
                    await asyncio.sleep(0.01)
                drained = time.perf_counter()
                frozen = list(self._inflight)
                old_version, old_dir = self.version, self.model_dir
                failed: SwapFailed | None = None
                try:
                    await asyncio.wait_for(self.llm.pause_generation(mode="keep", clear_cache=True), bound)
                    try:
                        await self._reload(model_dir, bound)
                    except Exception as exc:
                        if isinstance(exc, TimeoutError) or not self.alive:
                            raise  # a hung or dead core would not load the old weights either
                        log.error("loading %s failed (%s): loading %s back", model_dir, _why(exc), old_dir)
                        await self._reload(old_dir, bound)
                        failed = SwapFailed(f"could not load {version} from {model_dir}: {_why(exc)}")
                        failed.__cause__ = exc
                    await asyncio.wait_for(self.llm.resume_generation(), bound)
                except Exception as exc:  # hung or dead: weights unknown, restart on the old ones
                    log.error("swap to %s left the engine unusable (%s): restarting it on %s",
                              version, _why(exc), old_version)
                    await self._replace(old_dir, cause="swap_failed")
                    raise SwapFailed(f"could not load {version} from {model_dir}: {_why(exc)}; "
                                     f"the engine was restarted on {old_version}") from exc
                if failed is not None:
                    raise failed
                self.model_dir, self.version = model_dir, version
                self._export_config(version)
                self.last_alive = time.monotonic()
                for rid in frozen:
                    self._straddled[rid] = f"{old_version}+{version}"
                loaded = time.perf_counter()
            finally:
                if not self.restarting:
                    self._open.set()
            return SwapResult(old_version, version, drained - started, loaded - drained,
                              time.perf_counter() - started, len(frozen))

    async def _reload(self, model_dir: Path, bound: float) -> None:
        await asyncio.wait_for(
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)}), bound)

    # -- death and restarts ----------------------------------------------------------------

    def ensure_recovering(self) -> None:
        """If the EngineCore is dead, hold new requests and restart it on the same version (once)."""
        if self._closed or self.restarting or not self.llm.errored:
            return
        self.restarting = True
        self._open.clear()
        log.error("the engine serving %s died: restarting it", self.version)
        self._recovery = asyncio.create_task(self._recover(), name=f"kaizen-restart-{self.version}")

    async def _recover(self) -> None:
        async with self._swap_lock:  # after a swap in progress, which may have restarted it already
            if self.llm.errored and not self._closed:
                await self._replace(self.model_dir, cause="died")
            self.restarting = False
            if not self._closed:
                self._open.set()

    async def _replace(self, model_dir: Path, cause: str) -> None:
        """Stop this vLLM engine and start a new one on `model_dir` (caller holds the swap lock).

        In-flight requests end with `EngineUnavailable`; new ones wait at the closed gate.
        A start that fails is retried every `engine_watchdog_interval_s` until one works or
        the engine is shut down; liveness fails meanwhile once `engine_stall_timeout_s` passes."""
        self.restarting = True
        self._open.clear()
        old = self.llm
        end_open_answers(old)  # frozen or queued answers end now
        await asyncio.to_thread(old.shutdown)  # kills the EngineCore and its workers if they hang
        if self._ping is not None:
            self._ping.cancel()
            self._ping = None
        while not self._closed:
            try:
                new = await asyncio.to_thread(self._start_llm, model_dir)
            except Exception:  # noqa: BLE001 - keep trying; liveness reports a restart that never works
                metrics.ENGINE_RESTARTS.labels(cause=cause, result="failed").inc()
                log.exception("restarting the engine for %s failed; retrying", self.version)
                await asyncio.sleep(self.settings.engine_watchdog_interval_s)
                continue
            if self._closed:  # shut down while it started
                await asyncio.to_thread(new.shutdown)
                return
            self.llm, self.model_dir = new, model_dir
            self.last_alive = time.monotonic()
            self.restarting = False
            metrics.ENGINE_RESTARTS.labels(cause=cause, result="ok").inc()
            log.info("engine for %s restarted (%s)", self.version, cause)
            return

    # -- heartbeat -------------------------------------------------------------------------

    async def heartbeat(self, timeout_s: float) -> bool:
        """Ask the EngineCore a trivial question (is it paused?) and wait up to `timeout_s`.

        True when it answered (`last_alive` is now). An unanswered question stays pending, so
        a slow core gets one question at a time and `unanswered_s` grows until it answers."""
        if not self.alive or self.restarting:
            return False
        if self._ping is None:
            self._ping, self._ping_sent = asyncio.ensure_future(self.llm.is_paused()), time.monotonic()
        ping = self._ping
        done, _ = await asyncio.wait({ping}, timeout=timeout_s)
        if not done:
            return False
        self._ping = None
        if ping.cancelled() or ping.exception() is not None:
            return False
        self.last_alive = time.monotonic()
        return True

    def unanswered_s(self, now: float) -> float:
        """How long the pending heartbeat has waited for the EngineCore (0 when none is pending)."""
        return now - self._ping_sent if self._ping is not None and not self._ping.done() else 0.0

    def render(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of the conversation, ending with the assistant's turn prompt."""
        ids: Any = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    async def generate(
        self, prompt_ids: list[int], params: Any, request_id: str
    ) -> AsyncIterator[Any]:
        """vLLM `RequestOutput`s in delta mode; cancelling the iteration aborts the request.

        If the EngineCore dies under it: `EngineUnavailable("engine_dead")`, and a restart begins;
        if the engine is stopped under it (`stop`, `retire`): `EngineUnavailable("engine_stopped")`."""
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            async for out in self.llm.generate(
                {"prompt_token_ids": prompt_ids}, params, request_id
            ):
                if self._closed and any(c.finish_reason == "abort" for c in out.outputs):
                    raise _stopped_mid_answer()  # cut short by the stop: an error, not a short answer
                yield out
        except EngineDeadError:
            if self._closed:
                raise _stopped_mid_answer() from None
            self.ensure_recovering()
            raise EngineUnavailable("engine_dead", "the model engine stopped while answering; it is "
                                    "being restarted: retry shortly") from None

    def unfinished_requests(self) -> int:
        return int(self.llm.get_num_unfinished_requests())

    async def retire(self, drain_s: float) -> None:
        """Stop once the answers in flight are done, or after `drain_s` (the rest end with 503).
        The caller routes no new requests here any more (a canary withdrawn or promoted)."""
        deadline = time.monotonic() + drain_s
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.stop()

    async def stop(self) -> None:
        """Refuse new requests, stop the vLLM engine (in a thread: seconds), and end every answer
        it left unfinished with `EngineUnavailable("engine_stopped")`.

        That last step matters: vLLM's shutdown cancels its output handler, which ends open answers
        only on an error. If the event loop was busy meanwhile, the handler never read the engine's
        final `abort` outputs and those answers waited forever (a canary retired under load)."""
        self._closed = True
        self._open.set()  # requests waiting at the gate wake up and are refused (`engine_stopped`)
        await asyncio.to_thread(self._shutdown_llm)
        end_open_answers(self.llm)

    def _shutdown_llm(self) -> None:
        self._export_config(None)
        self.llm.shutdown()
        freeze_heap()  # this engine's client objects were frozen with the rest: collect them now


def end_open_answers(llm: Any) -> None:
    """End every answer still open on `llm` with `EngineDeadError` (in the event loop's thread)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    llm.output_processor.propagate_error(EngineDeadError())


def freeze_heap() -> None:
    """Collect, then freeze what is left: the cyclic GC's full collections skip a frozen heap.

    The heap after startup (torch, transformers, vLLM's client: millions of objects) is static.
    Unfrozen, every full collection walked all of it and stalled the event loop ~0.4 s, which was
    the p99 of bench/feedback.py at 1,000 votes/s. vLLM's own API server freezes after its startup
    too. Called once serving starts and after an engine shuts down (its objects leave the heap)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _stopped_mid_answer() -> EngineUnavailable:
    return EngineUnavailable("engine_stopped", "this model version stopped being served while answering: retry")


def _why(exc: BaseException) -> str:
    """An exception for a log line; a timeout has no message of its own."""
    return "timed out" if isinstance(exc, TimeoutError) else (str(exc) or type(exc).__name__)
