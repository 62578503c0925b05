"""A request with its own `seed` must never kill a vLLM engine on the CPU backend.

vLLM 0.32 rewinds a seeded request's random generator after a partial prefill
(`gpu_model_runner._bookkeeping_sync`: `gen.set_offset(gen.get_offset() - 4)`), and CPU
generators refuse that ("CPU Generator does not use offset"): the engine core dies and every
later request fails. A prefill is partial when chunked prefill splits a prompt over two steps,
which happens whenever the step's token budget runs out mid-prompt: long prompts arriving
together. Any API user can send a seed, and PPO rollouts seed every request, so Kaizen's
engines run with chunked prefill off and a step budget that holds any whole prompt
(`kaizen.core.engine_config.scheduling_args`).
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import httpx
import pytest

from kaizen.core.engine_config import RPC_PREFIX, scheduling_args, serving_dtype
from kaizen.core.settings import Settings
from tests.conftest import USER_KEY

WORDS = ("apple river stone cloud green quick silent paper window orange music light table summer garden "
         "north copper velvet").split()


def long_prompt(rng: random.Random, words: int = 320) -> str:
    return " ".join(rng.choices(WORDS, k=words))


def test_seeded_long_prompts_arriving_together_leave_the_chat_engine_alive(api_server: tuple[str, Settings]) -> None:
    """24 seeded requests of ~350 prompt tokens at once: more than a step's default budget, so
    with chunked prefill some would be split, and the first split seeded one killed the engine."""
    base, settings = api_server
    rng = random.Random(0)
    auth = {"Authorization": f"Bearer {USER_KEY}"}

    async def one(client: httpx.AsyncClient, i: int) -> int:
        r = await client.post(f"{base}/v1/chat/completions", headers=auth, timeout=120, json={
            "model": settings.served_model_name, "max_tokens": 4, "temperature": 1.0, "seed": 1000 + i,
            "messages": [{"role": "user", "content": long_prompt(rng)}]})
        return r.status_code

    async def burst() -> list[int]:
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(one(client, i) for i in range(24)))

    codes = asyncio.run(burst())
    assert codes == [200] * 24, codes
    after = httpx.post(f"{base}/v1/chat/completions", headers=auth, timeout=60, json={
        "model": settings.served_model_name, "max_tokens": 4, "seed": 7,
        "messages": [{"role": "user", "content": "Still there?"}]})
    assert after.status_code == 200, after.text  # the engine is alive


@pytest.mark.slow
def test_the_rollout_engine_never_splits_a_prefill_and_vllm_would(tiny_model: Path, tmp_path: Path) -> None:
    """The rollout engine runs the guard (read back from the engine), and seeded rollouts with
    prompts longer than vLLM's own small-budget chunks succeed there; the same requests on an
    engine with chunked prefill and a 32-token budget kill it (the hazard the guard removes:
    should a vLLM release fix the rewind, this half fails and the guard can go)."""
    from vllm import LLM, SamplingParams

    from tests.conftest import make_settings
    from trainer.rollout_engine import RolloutEngine

    settings = make_settings(tmp_path, engine_max_model_len=512)
    prompts = [list(range(100 + i, 400 + i)) for i in range(6)]  # 300 tokens each
    engine = RolloutEngine(settings, tiny_model, max_model_len=512)
    try:
        # vLLM's socket files are in this process's own folder (kaizen/core/engine_config.py, rpc_dir)
        rpc = Path(os.environ["VLLM_RPC_BASE_PATH"])
        assert rpc.name.startswith(RPC_PREFIX) and any(p.is_socket() for p in rpc.iterdir()), rpc
        scheduler = engine.llm.llm_engine.vllm_config.scheduler_config
        assert scheduler.enable_chunked_prefill is False and scheduler.max_num_batched_tokens >= 512
        # and it runs in the dtype resolved for this machine (float32 on any CPU)
        assert str(engine.llm.llm_engine.vllm_config.model_config.dtype) == f"torch.{serving_dtype(settings)}"
        samples = engine.generate(prompts, max_tokens=4, temperature=1.0, seed=5)
        assert len(samples) == 6 and all(s.token_ids for s in samples)
    finally:
        engine.shutdown()
    assert scheduling_args(settings, 512) == {"enable_chunked_prefill": False, "max_num_batched_tokens": 2048}

    hazard = LLM(model=str(tiny_model), dtype="float32", enforce_eager=True, max_model_len=512,
                 gpu_memory_utilization=settings.engine_memory_utilization, enable_chunked_prefill=True,
                 max_num_batched_tokens=32, disable_log_stats=True)
    try:
        with pytest.raises(Exception) as dead:
            hazard.generate([{"prompt_token_ids": p} for p in prompts],  # type: ignore[misc]
                            [SamplingParams(max_tokens=4, seed=i) for i in range(6)], use_tqdm=False)
        assert "EngineDead" in type(dead.value).__name__ or "dead" in str(dead.value).lower(), dead.value
    finally:
        core = getattr(hazard.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown(timeout=10)
