"""The vLLM engine the chat API serves from, and how prompts reach it.

The API process holds one `AsyncLLM` (vLLM's V1 async engine; its EngineCore
runs in a spawned child process). Prompts are rendered here with the model's
own chat template and passed as token ids, so the template is the tokenizer's
and the prompt token count is known before generation starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from services.settings import Settings

log = logging.getLogger(__name__)


def configure_vllm_env(settings: Settings) -> None:
    """vLLM reads a few knobs from the environment; set them from our settings."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.engine_kv_cache_gib)
    if settings.engine_reserved_cpus is not None:
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(settings.engine_reserved_cpus)
    # No usage reporting, no hub look-ups: nothing outside this machine is reachable.
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def scheduling_args(settings: Settings, max_model_len: int) -> dict[str, Any]:
    """Scheduler options that keep one request from killing a CPU engine.

    vLLM 0.32 rewinds a seeded request's generator after a partial prefill
    (`_bookkeeping_sync`: `gen.set_offset(gen.get_offset() - 4)`); CPU generators refuse
    ("CPU Generator does not use offset"), the engine core dies and every later request fails.
    A prefill is partial when chunked prefill splits a prompt because the step's token budget
    ran out, e.g. long prompts arriving together. Any user may send `seed` and PPO seeds every
    rollout, so on the CPU backend chunked prefill is off and a step's budget holds any whole
    prompt: a prompt that does not fit this step waits for the next one instead of being split
    (tests/test_engine_seeds.py). GPU generators rewind fine: nothing changes there.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    return {"enable_chunked_prefill": False,
            "max_num_batched_tokens": max(max_model_len, settings.engine_max_num_batched_tokens)}


VllmDtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]


def serving_dtype(settings: Settings) -> VllmDtype:
    """engine_dtype with `auto` resolved for this machine (services/hardware.py), logged."""
    from services.hardware import choose_dtype

    choice = choose_dtype(settings.engine_dtype, serving=True)
    log.info("engine dtype %s", choice)
    return cast(VllmDtype, choice.dtype)


def engine_args(settings: Settings, model_dir: Path, log_stats: bool = True) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(
        **scheduling_args(settings, settings.engine_max_model_len),
        model=str(model_dir),
        served_model_name=[settings.served_model_name],
        dtype=serving_dtype(settings),
        max_model_len=settings.engine_max_model_len,
        gpu_memory_utilization=settings.engine_memory_utilization,
        enforce_eager=settings.engine_enforce_eager,
        max_num_seqs=settings.engine_max_num_seqs,
        seed=settings.engine_seed,
        disable_log_stats=not log_stats,
    )


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
    """The new weights could not be loaded; the engine serves the old ones again."""


class Engine:
    """An `AsyncLLM` plus the tokenizer and the version label of its weights.

    Requests are *admitted* before they reach vLLM (`admit`/`release`): that is
    how a weight swap knows what is in flight and holds new requests back, so
    the version a response is labelled with is the one that generated it.
    """

    def __init__(self, settings: Settings, model_dir: Path, version: str, *, log_stats: bool = True) -> None:
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        configure_vllm_env(settings)
        self.settings = settings
        self.model_dir = model_dir
        self.version = version
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        self.llm = AsyncLLM.from_engine_args(engine_args(settings, model_dir, log_stats))
        self._open = asyncio.Event()
        self._open.set()
        self._swap_lock = asyncio.Lock()
        self._inflight: dict[str, float] = {}
        self._straddled: dict[str, str] = {}

    async def admit(self, request_id: str) -> str:
        """Wait while a swap holds new requests; register the request; return the version it gets."""
        await self._open.wait()
        self._inflight[request_id] = time.monotonic()
        return self.version

    def release(self, request_id: str) -> str | None:
        """The request is over. Returns its label if a swap resumed it on other weights."""
        self._inflight.pop(request_id, None)
        return self._straddled.pop(request_id, None)

    @property
    def admitted(self) -> int:
        return len(self._inflight)

    async def swap(self, model_dir: Path, version: str, drain_timeout_s: float) -> SwapResult:
        """Load other weights into the running engine without failing any request.

        New requests wait (`admit`) while in-flight ones finish, for up to
        `drain_timeout_s`; the engine is then paused with whatever remains frozen
        (vLLM `pause_generation(mode="keep")`), the weights are reloaded in place
        from `model_dir`, and generation resumes. If loading fails, the old
        weights are loaded back and `SwapFailed` is raised."""
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
                await self.llm.pause_generation(mode="keep", clear_cache=True)
                try:
                    try:
                        await self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
                    except Exception as exc:
                        log.error("loading %s failed (%s): loading %s back", model_dir, exc, old_dir)
                        await self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(old_dir)})
                        raise SwapFailed(f"could not load {version} from {model_dir}: {exc}") from exc
                    self.model_dir, self.version = model_dir, version
                    for rid in frozen:
                        self._straddled[rid] = f"{old_version}+{version}"
                finally:
                    await self.llm.resume_generation()
                loaded = time.perf_counter()
            finally:
                self._open.set()
            return SwapResult(old_version, version, drained - started, loaded - drained,
                              time.perf_counter() - started, len(frozen))

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
        """vLLM `RequestOutput`s in delta mode; cancelling the iteration aborts the request."""
        async for out in self.llm.generate(
            {"prompt_token_ids": prompt_ids}, params, request_id
        ):
            yield out

    def unfinished_requests(self) -> int:
        return int(self.llm.get_num_unfinished_requests())

    def shutdown(self) -> None:
        self.llm.shutdown()
