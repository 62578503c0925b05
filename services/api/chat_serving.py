"""Serving an admitted chat completion: generation across its parts, then the whole answer as one
JSON body or as an SSE stream (cf. vLLM `entrypoints/openai/serving_chat.py`).

Both paths fold the engine's outputs into one `Choices` accumulator (text, finish reason and
generated tokens per choice), which also builds the response's choices and usage. A pair is
recorded once both answers are complete: before the full answer is sent (an unreachable store
answers 503), after the stream has ended (then it only cannot be voted on).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from kaizen.core import metrics
from services.api.pairing import Part, PendingPair, choice_versions, record_pair, response_version
from services.comparisons import ComparisonStore, DatabaseUnavailable
from services.engine import EngineUnavailable
from services.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    Delta,
    ErrorInfo,
    ErrorResponse,
    Usage,
    dump,
)
from services.rollout import Rollout

log = logging.getLogger(__name__)

VERSION_HEADER = "X-Kaizen-Model-Version"


@dataclass
class Completion:
    """One admitted chat completion: its engine requests and what its answer is labelled with."""

    rollout: Rollout
    parts: list[Part]
    params: list[Any]
    """vLLM `SamplingParams`, one per part."""
    prompt_ids: list[int]
    request_id: str
    started: float
    """`time.perf_counter()` when the request arrived: time to first token counts from it."""
    pair: PendingPair | None
    model_name: str
    store: ComparisonStore

    @property
    def n(self) -> int:
        return sum(p.n for p in self.parts)

    def version(self) -> str:
        return response_version(self.parts)

    def release(self) -> None:
        """The engine requests are over (again is harmless); a part a swap resumed on other
        weights takes the label the engine gives it."""
        for p in self.parts:
            label = p.engine.release(p.request_id)
            if label is not None:
                p.version = label


def finish_reason(reason: str | None) -> Any:
    return reason if reason in ("stop", "length", "abort") else ("stop" if reason else None)


class Choices:
    """The choices of one completion as the engine's outputs arrive: text, finish reason and
    generated tokens of each. The full answer and the stream both fold their outputs in here."""

    def __init__(self, n: int) -> None:
        self.texts = [""] * n
        self.finish: list[str | None] = [None] * n
        self.tokens = [0] * n

    def add(self, part: Part, output: Any) -> int:
        """Fold in one vLLM `CompletionOutput` of `part`; return the response's index of its choice."""
        i: int = part.offset + output.index
        self.tokens[i] += len(output.token_ids)
        self.texts[i] += output.text
        self.finish[i] = output.finish_reason or self.finish[i]
        return i

    def count_generated(self, parts: list[Part]) -> None:
        for p in parts:
            generated = sum(self.tokens[p.offset:p.offset + p.n])
            metrics.GENERATED_TOKENS.labels(model_version=p.version).inc(generated)

    def usage(self, prompt_tokens: int) -> Usage:
        completion_tokens = sum(self.tokens)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)

    def choices(self) -> list[Choice]:
        return [Choice(index=i, message=AssistantMessage(content=text),
                       finish_reason=finish_reason(self.finish[i]))
                for i, text in enumerate(self.texts)]


class FirstTokens:
    """Observes each part's time to first token, once per part, for the metric and the canary's health."""

    def __init__(self, rollout: Rollout, started: float, parts: list[Part]) -> None:
        self.rollout, self.started = rollout, started
        self.waiting = {p.request_id for p in parts}

    def seen(self, part: Part, out: Any) -> None:
        if part.request_id in self.waiting and any(c.token_ids for c in out.outputs):
            self.waiting.discard(part.request_id)
            ttft = time.perf_counter() - self.started
            metrics.TIME_TO_FIRST_TOKEN.labels(model_version=part.version).observe(ttft)
            self.rollout.observe(part.version, ttft_s=ttft)


async def generate_parts(job: Completion) -> AsyncIterator[tuple[Part, Any]]:
    """Outputs of all parts as they come, with time to first token and errors per version.

    One part is iterated directly; two (a champion-vs-canary pair) run as tasks feeding
    one queue. Cancelling this iterator cancels the tasks, which aborts the engine requests."""
    first = FirstTokens(job.rollout, job.started, job.parts)
    if len(job.parts) == 1:
        part = job.parts[0]
        try:
            async for out in part.engine.generate(job.prompt_ids, job.params[0], part.request_id):
                first.seen(part, out)
                yield part, out
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception:
            job.rollout.observe(part.version, error=True)
            raise
        return

    queue: asyncio.Queue[tuple[Part, Any] | None] = asyncio.Queue()
    tasks = [asyncio.create_task(pump(job, part, p, queue))
             for part, p in zip(job.parts, job.params, strict=True)]
    try:
        done = 0
        while done < len(tasks):
            item = await queue.get()
            if item is None:
                done += 1
                continue
            part, out = item
            if isinstance(out, BaseException):
                raise out
            first.seen(part, out)
            yield part, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def pump(job: Completion, part: Part, params: Any,
               queue: asyncio.Queue[tuple[Part, Any] | None]) -> None:
    """One side of a pair into the shared queue: its outputs, or its error, then None when done."""
    try:
        async for out in part.engine.generate(job.prompt_ids, params, part.request_id):
            await queue.put((part, out))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - handed to the consumer, generate_parts
        job.rollout.observe(part.version, error=True)
        await queue.put((part, exc))
    await queue.put(None)


async def full_response(job: Completion) -> JSONResponse:
    """The whole answer in one body; a pair is recorded first (DatabaseUnavailable answers 503)."""
    acc = Choices(job.n)
    try:
        async for part, out in generate_parts(job):
            for c in out.outputs:
                acc.add(part, c)
    finally:
        job.release()
    version = job.version()  # names both versions if a swap resumed it on new weights
    acc.count_generated(job.parts)
    comparison_id = None
    if job.pair is not None:
        # in a thread: on PostgreSQL a few network round trips; DatabaseUnavailable answers 503
        comparison_id = await asyncio.to_thread(record_pair, job.store, job.pair, acc.texts, acc.finish,
                                                choice_versions(job.parts))
    body = ChatCompletionResponse(id=job.request_id, model=job.model_name, model_version=version,
                                  comparison_id=comparison_id, choices=acc.choices(),
                                  usage=acc.usage(len(job.prompt_ids)))
    return JSONResponse(dump(body), headers={VERSION_HEADER: version})


def stream_response(job: Completion, include_usage: bool) -> EventSourceResponse:
    """The answer as server-sent events; the engine requests are released however the stream ends."""
    return EventSourceResponse(stream_chunks(job, include_usage), headers={VERSION_HEADER: job.version()},
                               sep="\n", ping=15, background=BackgroundTask(job.release))


class Chunks:
    """The `data:` payloads of one streamed completion: chunks sharing its id, creation time and labels."""

    def __init__(self, job: Completion) -> None:
        self.job = job
        self.created = int(time.time())
        self.version = job.version()

    def chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        pair = self.job.pair
        return json.dumps(dump(ChatCompletionChunk(
            id=self.job.request_id, created=self.created, model=self.job.model_name,
            choices=choices, usage=usage, model_version=self.version,
            comparison_id=pair.comparison_id if pair else None,
        )))

    @staticmethod
    def error(exc: EngineUnavailable) -> str:
        """The engine died mid-answer: the 503 as a stream's error event."""
        metrics.ENGINE_UNAVAILABLE.labels(code=exc.reason).inc()
        return json.dumps(dump(ErrorResponse(error=ErrorInfo(
            message=str(exc), type="service_unavailable", param=None, code=exc.reason))))


async def stream_chunks(job: Completion, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI stream chunks as SSE `data:` payloads, ending with `[DONE]`.

    If the client goes away, sse-starlette cancels this generator; vLLM's
    `generate` aborts the request on cancellation, so nothing keeps running.
    """
    chunks = Chunks(job)
    acc = Choices(job.n)
    done = False
    try:
        for i in range(job.n):
            yield chunks.chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
        try:
            async for part, out in generate_parts(job):
                for c in out.outputs:
                    i = acc.add(part, c)
                    if c.text:
                        yield chunks.chunk([ChunkChoice(index=i, delta=Delta(content=c.text))])
                    if c.finish_reason is not None:
                        yield chunks.chunk([ChunkChoice(index=i, delta=Delta(),
                                                        finish_reason=finish_reason(c.finish_reason))])
        except EngineUnavailable as exc:  # the engine died mid-answer: the 503 as a stream's error event
            yield chunks.error(exc)
            yield "[DONE]"
            return
        finally:
            job.release()
            acc.count_generated(job.parts)
        chunks.version = job.version()  # names both versions if a swap resumed it on new weights
        if job.pair is not None:  # only a pair the client received whole can be voted on
            await record_streamed_pair(job, job.pair, acc)
        if include_usage:
            yield chunks.chunk([], acc.usage(len(job.prompt_ids)))
        done = True
        yield "[DONE]"
    except (asyncio.CancelledError, GeneratorExit):  # the client left before [DONE], even if the
        if not done:  # engine had finished (on a stalled machine it often has)
            metrics.CLIENT_DISCONNECTS.inc()
        raise
    finally:
        job.release()


async def record_streamed_pair(job: Completion, pair: PendingPair, acc: Choices) -> None:
    try:
        await asyncio.to_thread(record_pair, job.store, pair, acc.texts, acc.finish,
                                choice_versions(job.parts))
    except DatabaseUnavailable as exc:  # the answer is streamed already: finish it, unvotable
        metrics.DATABASE_ERRORS.inc()
        log.warning("paired answer %s not recorded (a vote on it will get 404): %s", pair.comparison_id, exc)
