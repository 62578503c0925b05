"""The vLLM engine the chat API serves from, and how prompts reach it.

The API process holds one `AsyncLLM` (vLLM's V1 async engine; its EngineCore
runs in a spawned child process). Prompts are rendered here with the model's
own chat template and passed as token ids, so the template is the tokenizer's
and the prompt token count is known before generation starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from services.settings import Settings

log = logging.getLogger(__name__)


def configure_vllm_env(settings: Settings) -> None:
    """vLLM reads a few knobs from the environment; set them from our settings."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.engine_kv_cache_gib)
    # No usage reporting, no hub look-ups: nothing outside this machine is reachable.
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def engine_args(settings: Settings, model_dir: Path) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(
        model=str(model_dir),
        served_model_name=[settings.served_model_name],
        dtype=settings.engine_dtype,
        max_model_len=settings.engine_max_model_len,
        gpu_memory_utilization=settings.engine_memory_utilization,
        enforce_eager=settings.engine_enforce_eager,
        max_num_seqs=settings.engine_max_num_seqs,
        seed=settings.engine_seed,
        disable_log_stats=False,
    )


class Engine:
    """An `AsyncLLM` plus the tokenizer and the version label of its weights."""

    def __init__(self, settings: Settings, model_dir: Path, version: str) -> None:
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        configure_vllm_env(settings)
        self.settings = settings
        self.model_dir = model_dir
        self.version = version
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        self.llm = AsyncLLM.from_engine_args(engine_args(settings, model_dir))

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
