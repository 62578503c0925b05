"""Which engines answer a chat completion, and the comparison pairs among them.

A request opts into comparisons with `"comparison": "allow"` (paired at KAIZEN_COMPARISON_RATE)
or `"force"` (`should_pair`). `plan_parts` splits the answer into engine requests (`Part`s): the
pinned champion, champion vs canary for a pair while a canary runs, else the user's sticky engine.
`admit_parts` admits them all or none; a pair both of whose answers reached the client is
recorded (`record_pair`) so that a vote on it can be taken.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kaizen.core import metrics
from services.api.deps import Caller
from services.comparisons import ComparisonStore, new_comparison_id
from services.engine import Engine, EngineUnavailable
from kaizen.core.events import Answer
from services.protocol import ChatCompletionRequest
from services.rollout import Rollout
from kaizen.core.settings import Settings

ADMIT_REPLANS = 2
"""How often a request whose engine was retired before it was admitted is planned again."""


def should_pair(req: ChatCompletionRequest, settings: Settings) -> bool:
    """Answer with two choices to vote on: always for `force`, at the configured rate for `allow`."""
    return req.comparison == "force" or (
        req.comparison == "allow" and random.random() < settings.comparison_rate)


@dataclass
class Part:
    """One engine request of a chat completion: all its choices, or one side of a pair."""

    engine: Engine
    n: int
    offset: int
    """Index of this part's first choice in the response."""
    request_id: str
    version: str = ""


def pinned_engine(rollout: Rollout, model: str | None) -> Engine | None:
    """The engine a request's `model: "vN"` pins: only the champion's version (#19 item 2).

    The canary's version is answered as an unknown model: pinning it would let any key sample the
    canary at will (outside its share of users) and match the answers of a pair to versions."""
    champion = rollout.champion
    return champion if champion is not None and model is not None and champion.version == model else None


def plan_parts(rollout: Rollout, caller: Caller, req: ChatCompletionRequest, paired: bool,
               request_id: str) -> list[Part]:
    """Which engine(s) answer: the pinned champion, champion vs canary for a pair while a
    canary runs, else the user's sticky engine."""
    pinned = pinned_engine(rollout, req.model)
    if pinned is not None:
        return [Part(pinned, 2 if paired else req.n, 0, request_id)]
    if paired:
        pair = rollout.pair_engines()
        if pair is not None:
            return [Part(pair[0], 1, 0, f"{request_id}-a"), Part(pair[1], 1, 1, f"{request_id}-b")]
        return [Part(rollout.engine_for(caller.user), 2, 0, request_id)]
    return [Part(rollout.engine_for(caller.user), req.n, 0, request_id)]


async def admit_parts(parts: list[Part]) -> None:
    """Admit every part (each waits, bounded, while a swap or a restart holds new requests);
    all or none: on `EngineUnavailable` the parts already admitted are released."""
    for i, p in enumerate(parts):
        try:
            p.version = await p.engine.admit(p.request_id)
        except EngineUnavailable:
            for q in parts[:i]:
                q.engine.release(q.request_id)
            raise


async def admit_or_replan(parts: list[Part], replan: Callable[[], list[Part]]) -> list[Part]:
    """Admit the planned parts; return the parts admitted, planned again by `replan` (at most
    ADMIT_REPLANS times) when an engine retired between planning and admission (a canary promoted
    or withdrawn, here or by another replica): they then run on what is served now."""
    for attempt in range(ADMIT_REPLANS + 1):
        try:
            await admit_parts(parts)
            return parts
        except EngineUnavailable as exc:
            if exc.reason != "engine_stopped" or attempt == ADMIT_REPLANS:
                raise
            parts = replan()
    raise AssertionError(f"unreachable: {ADMIT_REPLANS} replans neither admitted nor raised")


def response_version(parts: list[Part]) -> str:
    """The label of a response: its version, or both of a champion-vs-canary pair (sorted,
    so the label does not say which side is which)."""
    versions = sorted({p.version for p in parts}, key=lambda v: (len(v), v))
    return ",".join(versions)


def choice_versions(parts: list[Part]) -> list[str]:
    """The version that answered each choice, in choice order."""
    return [p.version for p in parts for _ in range(p.n)]


@dataclass(frozen=True)
class PendingPair:
    """A paired answer being generated; stored once both answers are complete."""

    comparison_id: str
    user: str
    messages: list[dict[str, str]]
    sampling: dict[str, Any]
    served_at: datetime

    @classmethod
    def start(cls, user: str, messages: list[dict[str, str]], sampling: dict[str, Any]) -> PendingPair:
        """A new comparison, served now."""
        return cls(new_comparison_id(), user, messages, sampling, datetime.now(UTC))


def record_pair(store: ComparisonStore, pair: PendingPair, texts: list[str], finish: list[str | None],
                versions: list[str]) -> str:
    answers = [Answer(text=texts[i], model_version=versions[i], finish_reason=finish[i],
                      sampling=pair.sampling) for i in range(2)]
    store.record(pair.user, pair.messages, answers, served_at=pair.served_at,
                 comparison_id=pair.comparison_id)
    for v in sorted(set(versions)):
        metrics.COMPARISONS_SERVED.labels(model_version=v).inc()
    return pair.comparison_id
