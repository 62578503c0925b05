"""Simulated users: chat through the public API, get paired answers, vote with a judge.

    kaizen simulate --votes 200 --users 8 --judge trainer.judges:rubric
    kaizen simulate --judge my_judges.py:prefers_short --noise 0.1 --duration 600

Each user is a coroutine with its own API key (when the server needs keys)
that sends a prompt from the prompt file with `comparison: "force"` through
the official `openai` client, asks the judge which answer is better, and
posts the verdict to `POST /v1/feedback`, exactly as a person using the web
page would. With probability `noise` the vote is random instead. Requests are
paced by a token bucket at `rate` requests/s across all users.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from trainer.judges import VERDICTS, Judge

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_PROMPTS = DATA / "prompts.jsonl"
DEFAULT_EVAL_PROMPTS = DATA / "eval_prompts.jsonl"
DEFAULT_JUDGE = "trainer.judges:rubric"


def read_prompts(path: Path) -> list[str]:
    """A prompt file: JSONL, one {"prompt": "..."} per line."""
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: expected {{\"prompt\": \"...\"}} ({exc})") from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}:{n}: the prompt must be a non-empty string")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


@dataclass
class SimulateConfig:
    base_url: str
    api_keys: list[str] = field(default_factory=list)
    """One per user (cycled); empty: the server is open."""
    users: int = 4
    rate: float = 2.0
    """Requests per second across all users (0: as fast as answers come)."""
    noise: float = 0.0
    """Probability that a vote is random instead of the judge's."""
    votes: int | None = 100
    duration_s: float | None = None
    seed: int = 0
    max_tokens: int = 96
    timeout_s: float = 120.0


@dataclass
class SimulateStats:
    requests: int = 0
    votes: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    verdicts: Counter[str] = field(default_factory=Counter)
    by_version: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    log: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "votes": self.votes, "errors": dict(self.errors),
                "verdicts": dict(self.verdicts), "pairs_by_version": dict(self.by_version),
                "seconds": round(self.seconds, 2),
                "votes_per_s": round(self.votes / self.seconds, 3) if self.seconds else None}


class Pacer:
    """A token bucket shared by all users."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.next = time.monotonic()

    async def wait(self) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self.next = max(self.next + 1 / self.rate, now)
        delay = self.next - now
        if delay > 0:
            await asyncio.sleep(delay)


async def simulate(config: SimulateConfig, judge: Judge, prompts: list[str], progress: Any = None) -> SimulateStats:
    """Run the users until `votes` votes are in or `duration_s` has passed."""
    from openai import APIStatusError, AsyncOpenAI

    if config.votes is None and config.duration_s is None:
        raise ValueError("give a number of votes, a duration, or both")
    stats = SimulateStats()
    rng = random.Random(config.seed)
    pacer = Pacer(config.rate)
    started = time.monotonic()
    deadline = started + config.duration_s if config.duration_s else None

    claimed = 0  # votes being posted or posted: users run concurrently, so a vote is claimed first

    def done() -> bool:
        return (config.votes is not None and claimed >= config.votes) or (
            deadline is not None and time.monotonic() >= deadline)

    async def user(index: int) -> None:
        nonlocal claimed
        key = config.api_keys[index % len(config.api_keys)] if config.api_keys else "none"
        user_rng = random.Random(rng.random())
        client = AsyncOpenAI(base_url=f"{config.base_url}/v1", api_key=key, max_retries=2,
                             timeout=config.timeout_s)
        async with httpx.AsyncClient(base_url=config.base_url, timeout=config.timeout_s,
                                     headers={"Authorization": f"Bearer {key}"}) as http:
            while not done():
                await pacer.wait()
                if done():
                    break
                prompt = user_rng.choice(prompts)
                messages = [{"role": "user", "content": prompt}]
                stats.requests += 1
                try:
                    resp = await client.chat.completions.create(
                        model="kaizen", messages=messages, max_tokens=config.max_tokens,  # type: ignore[arg-type]
                        extra_body={"comparison": "force"})
                except APIStatusError as exc:
                    stats.errors[f"chat {exc.status_code}"] += 1
                    await asyncio.sleep(1.0)
                    continue
                except Exception as exc:  # noqa: BLE001 - counted; the run goes on
                    stats.errors[f"chat {type(exc).__name__}"] += 1
                    await asyncio.sleep(1.0)
                    continue
                extra = resp.model_extra or {}
                cid = extra.get("comparison_id")
                if not cid or len(resp.choices) != 2:
                    stats.errors["no pair"] += 1
                    continue
                texts = [c.message.content or "" for c in sorted(resp.choices, key=lambda c: c.index)]
                verdict = await asyncio.to_thread(judge, messages, texts[0], texts[1])
                if verdict not in VERDICTS:
                    raise ValueError(f"the judge returned {verdict!r}; expected one of {VERDICTS}")
                judged = verdict
                if config.noise and user_rng.random() < config.noise:
                    verdict = user_rng.choice(VERDICTS)
                if done():
                    break
                claimed += 1  # no await since the check: no other user can claim in between
                r = await http.post("/v1/feedback", json={"comparison_id": cid, "choice": verdict})
                if r.status_code != 202:
                    claimed -= 1
                    stats.errors[f"feedback {r.status_code}"] += 1
                    continue
                stats.votes += 1
                stats.verdicts[str(verdict)] += 1
                stats.by_version[str(extra.get("model_version", resp.model))] += 1
                stats.log.append({"comparison_id": cid, "prompt": prompt, "answers": texts,
                                  "judge": judged, "vote": verdict, "model_version": extra.get("model_version")})
                if progress is not None:
                    progress()
        await client.close()

    await asyncio.gather(*(user(i) for i in range(config.users)))
    stats.seconds = time.monotonic() - started
    return stats
