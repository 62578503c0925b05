"""An engine that stops (a canary withdrawn or promoted, the server shutting down) never leaves
an answer waiting forever.

    .venv/bin/python -m pytest tests/test_engine_stop.py -q

Real parts: the chat API's `Engine` (a vLLM `AsyncLLM` and its EngineCore process) on the
tiny model, in this process's event loop, as `kaizen serve` runs it.

vLLM's shutdown cancels its output handler, and a cancelled handler does not end the answers
still open. On a busy machine the handler had not read the engine's final `abort` outputs by
then, so an answer in flight on a retired canary hung until the client gave up (the scale-out
test's pair through nginx: a 120 s ReadTimeout in CI). The first test makes the event loop
busy while the engine shuts down, which is that machine's condition, on purpose.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from services.engine import Engine, EngineUnavailable
from tests.conftest import make_settings

LONG = 400  # tokens an answer generates (ignore_eos): seconds on the tiny model, not milliseconds


async def answer(engine: Engine, request_id: str, max_tokens: int, first: asyncio.Event) -> tuple[int, str]:
    """Admit, generate and release one answer as the API does: (tokens, finish reason)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    await engine.admit(request_id)
    tokens, reason = 0, ""
    try:
        ids = engine.render([{"role": "user", "content": "tell me a long story"}])
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=1.0,
                                output_kind=RequestOutputKind.DELTA)  # as a stream asks
        async for out in engine.generate(ids, params, request_id):
            for c in out.outputs:
                tokens += len(c.token_ids)
                reason = c.finish_reason or reason
            first.set()
    finally:
        engine.release(request_id)
    return tokens, reason


def start_engine(tiny_model: Path, tmp_path: Path) -> Engine:
    return Engine(make_settings(tmp_path), tiny_model, "v1", log_stats=False)


def test_an_answer_open_when_its_engine_stops_under_a_busy_loop_ends_with_503(tiny_model: Path,
                                                                               tmp_path: Path) -> None:
    engine = start_engine(tiny_model, tmp_path)

    async def scenario() -> tuple[Any, str]:
        first = asyncio.Event()
        running = asyncio.create_task(answer(engine, "r1", LONG, first))
        await asyncio.wait_for(first.wait(), 60)
        stopping = asyncio.create_task(engine.stop())
        await asyncio.sleep(0)  # stop() closes the gate and hands vLLM's shutdown to a thread
        deadline = time.monotonic() + 60
        while not engine.llm.errored and time.monotonic() < deadline:
            time.sleep(0.05)  # the loop is busy (a loaded machine) while the engine shuts down
        time.sleep(0.5)  # ...and until vLLM has queued the cancellation of its output handler
        await asyncio.wait_for(stopping, 60)
        try:
            result: Any = await asyncio.wait_for(running, 30)  # before the fix: hung for good
        except EngineUnavailable as exc:
            result = exc
        with pytest.raises(EngineUnavailable) as refused:
            await engine.admit("r2")
        return result, refused.value.reason

    result, refused = asyncio.run(scenario())
    assert isinstance(result, EngineUnavailable), result  # not a silently short answer either
    assert result.reason == "engine_stopped", result.reason
    assert refused == "engine_stopped"
    assert engine.admitted == 0


def test_a_retired_engine_lets_the_answer_in_flight_finish_then_stops(tiny_model: Path, tmp_path: Path) -> None:
    engine = start_engine(tiny_model, tmp_path)

    async def scenario() -> tuple[tuple[int, str], bool]:
        first = asyncio.Event()
        running = asyncio.create_task(answer(engine, "r1", LONG, first))
        await asyncio.wait_for(first.wait(), 60)
        await asyncio.wait_for(engine.retire(drain_s=120), 180)  # returns once stopped
        return await asyncio.wait_for(running, 5), engine.alive

    (tokens, reason), alive = asyncio.run(scenario())
    assert (tokens, reason) == (LONG, "length")  # whole, not aborted by the stop
    assert not alive
