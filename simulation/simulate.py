"""Simulated users: chat through the public API, get paired answers, vote with a judge.

    kaizen simulate --votes 200 --users 8 --judge simulation.judges:rubric
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

from simulation.judges import VERDICTS, Judge

#: The prompt files stay with the trainer package's data (trainer/data), which ships them.
DATA = Path(__file__).resolve().parent.parent / "trainer" / "data"
DEFAULT_PROMPTS = DATA / "prompts.jsonl"
DEFAULT_EVAL_PROMPTS = DATA / "eval_prompts.jsonl"
DEFAULT_JUDGE = "simulation.judges:rubric"


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


async def simulate(config: SimulateConfig, judge: Judge, prompts: list[str],
                   progress: Any = None) -> SimulateStats:
    """Run the users until `votes` votes are in or `duration_s` has passed."""
    if config.votes is None and config.duration_s is None:
        raise ValueError("give a number of votes, a duration, or both")
    users = Users(config, judge, prompts, progress)
    rng = random.Random(config.seed)
    await asyncio.gather(*(users.user(i, random.Random(rng.random())) for i in range(config.users)))
    users.stats.seconds = time.monotonic() - users.started
    return users.stats


class Users:
    """The simulated users of one run: what they share (the pacer, the statistics, the votes claimed)."""

    def __init__(self, config: SimulateConfig, judge: Judge, prompts: list[str],
                 progress: Any = None) -> None:
        self.config, self.judge, self.prompts, self.progress = config, judge, prompts, progress
        self.stats = SimulateStats()
        self.pacer = Pacer(config.rate)
        self.started = time.monotonic()
        self.deadline = self.started + config.duration_s if config.duration_s else None
        self.claimed = 0  # votes being posted or posted: users run concurrently, so a vote is claimed first

    def done(self) -> bool:
        return (self.config.votes is not None and self.claimed >= self.config.votes) or (
            self.deadline is not None and time.monotonic() >= self.deadline)

    async def user(self, index: int, rng: random.Random) -> None:
        """One user with its own key and random stream, taking turns until the run is done."""
        from openai import AsyncOpenAI

        config = self.config
        key = config.api_keys[index % len(config.api_keys)] if config.api_keys else "none"
        client = AsyncOpenAI(base_url=f"{config.base_url}/v1", api_key=key, max_retries=2,
                             timeout=config.timeout_s)
        async with httpx.AsyncClient(base_url=config.base_url, timeout=config.timeout_s,
                                     headers={"Authorization": f"Bearer {key}"}) as http:
            while not self.done():
                await self.pacer.wait()
                if self.done():
                    break
                await self.turn(client, http, rng)
        await client.close()

    async def turn(self, client: Any, http: httpx.AsyncClient, rng: random.Random) -> None:
        """One prompt: a forced pair of answers, the judge's verdict (or noise), the vote."""
        prompt = rng.choice(self.prompts)
        messages = [{"role": "user", "content": prompt}]
        resp = await self.ask(client, messages)
        if resp is None:
            return
        extra = resp.model_extra or {}
        cid = extra["comparison_id"]
        texts = [c.message.content or "" for c in sorted(resp.choices, key=lambda c: c.index)]
        verdict = await asyncio.to_thread(self.judge, messages, texts[0], texts[1])
        if verdict not in VERDICTS:
            raise ValueError(f"the judge returned {verdict!r}; expected one of {VERDICTS}")
        judged = verdict
        if self.config.noise and rng.random() < self.config.noise:
            verdict = rng.choice(VERDICTS)
        if self.done():
            return
        self.claimed += 1  # no await since the check: no other user can claim in between
        failed = await self.vote(http, cid, verdict)
        if failed:
            self.claimed -= 1
            self.stats.errors[failed] += 1
            return
        self.stats.votes += 1
        self.stats.verdicts[str(verdict)] += 1
        self.stats.by_version[str(extra.get("model_version", resp.model))] += 1
        self.stats.log.append({"comparison_id": cid, "prompt": prompt, "answers": texts,
                               "judge": judged, "vote": verdict, "model_version": extra.get("model_version")})
        if self.progress is not None:
            self.progress()

    async def vote(self, http: httpx.AsyncClient, cid: str, verdict: object) -> str | None:
        """Send the vote; None once it is stored, else what went wrong. A connection dropped
        before the answer came (seen: httpx.ReadError on a kept-alive connection the server had
        just closed) is sent once more on a fresh one: the server takes one vote per comparison,
        so a 409 then means the first one was stored, never a second vote."""
        body = {"comparison_id": cid, "choice": verdict}
        try:
            r = await http.post("/v1/feedback", json=body)
        except httpx.TransportError:
            try:
                r = await http.post("/v1/feedback", json=body)
            except httpx.TransportError as exc:
                return f"feedback {type(exc).__name__}"
            if r.status_code == 409 and "already_voted" in r.text:
                return None
        return None if r.status_code == 202 else f"feedback {r.status_code}"

    async def ask(self, client: Any, messages: list[dict[str, str]]) -> Any:
        """The chat completion with a forced comparison; None (counted as an error) without a pair."""
        from openai import APIStatusError

        self.stats.requests += 1
        try:
            resp = await client.chat.completions.create(
                model="kaizen", messages=messages, max_tokens=self.config.max_tokens,
                extra_body={"comparison": "force"})
        except APIStatusError as exc:
            self.stats.errors[f"chat {exc.status_code}"] += 1
            await asyncio.sleep(1.0)
            return None
        except Exception as exc:  # noqa: BLE001 - counted; the run goes on
            self.stats.errors[f"chat {type(exc).__name__}"] += 1
            await asyncio.sleep(1.0)
            return None
        if not (resp.model_extra or {}).get("comparison_id") or len(resp.choices) != 2:
            self.stats.errors["no pair"] += 1
            return None
        return resp
