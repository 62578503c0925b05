"""The sanity prompts: does a model still answer what its champion answered?

    from trainer.sanity import SanityCheck   # the gate, the PPO loop's guard, the loop's evaluation

Each prompt ({"prompt": str, "expect": regex}, gate_sanity_file) is answered `samples` times, sampled
at the rollouts' temperature with fixed seeds, and read as the **share** of answers that match. A
model fails a prompt when its share falls more than `max_drop` below the reference's (the champion's,
or the round's starting weights) on the same seeds. The reference is read on `samples + confirm`
answers; a model on `samples` first, and on `confirm` more where those fail (`SanityCheck.read`).

Why a share and not one greedy answer, as the check used to read: SmolLM2-135M-Instruct's first
token to "What is the capital of France?" is "The" at p = 0.155 against "L" at 0.140, and from "L"
v0 itself goes on "L'Étoile, la Marseillaise, la femme, la femme au martyre, ..." (measured with
transformers, float32). So any update, however small, could flip the greedy answer: the thirty-fifth
loop row's "broken" candidate and the thirty-seventh's round, skipped by the guard at iteration 5 with
a KL of 0.08, were both that coin. Sampled at temperature 1, 47% of v0's answers name Paris; a model
that forgot it names it far less often, one that flipped a near-tie does not. The same seeds for
both models couple their draws: where the weights barely moved, the answers are the same ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kaizen.core.settings import Settings
from trainer.policy import encode_prompt
from trainer.rollout_engine import RolloutEngine

DEFAULT_SANITY = [{"prompt": "What is the capital of France?", "expect": "Paris"}]
#: Offset of the sanity answers' seeds from ppo_seed (apart from the gate's and the KL's).
SEED_OFFSET = 15_485_863
#: Sampled answers kept per prompt in a record (a reader's look at what the model says).
KEPT_ANSWERS = 3


def _default(name: str) -> Any:
    return Settings.model_fields[name].default


def sanity_set(settings: Settings) -> list[dict[str, str]]:
    """The sanity prompts and the regex their answers should match (gate_sanity_file, JSONL)."""
    if settings.gate_sanity_file is None:
        return DEFAULT_SANITY
    out = []
    for line in settings.gate_sanity_file.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out.append({"prompt": str(rec["prompt"]), "expect": str(rec["expect"])})
    return out


@dataclass(frozen=True)
class SanityCheck:
    """The sanity prompts and how they are read (gate_sanity_samples, gate_sanity_confirm_samples,
    gate_sanity_max_drop).

    A reading is sequential: `samples` answers per prompt screen it; a prompt whose share falls past
    `max_drop` on those is read again on `confirm` more answers (the seeds after the first ones) and
    decided on all of them, against a reference read on all of them (`answers(full=True)`). Sixteen
    answers are a noisy share (the thirty-ninth loop row's v1 read 0.25 on 16, 0.383 on 128, v0 0.414):
    the screen keeps a passing check cheap, the confirmation keeps a noisy one from stopping a round."""

    items: list[dict[str, str]]
    samples: int
    max_drop: float
    seed: int
    confirm: int = 0
    max_tokens: int = _default("ppo_response_length")
    """The answers are sampled as the rollouts are: at their length, temperature and prompt cut."""
    temperature: float = _default("ppo_temperature")
    max_prompt_length: int = _default("ppo_max_prompt_length")

    @classmethod
    def from_settings(cls, settings: Settings) -> SanityCheck:
        return cls(sanity_set(settings), settings.gate_sanity_samples, settings.gate_sanity_max_drop,
                   settings.ppo_seed + SEED_OFFSET, settings.gate_sanity_confirm_samples,
                   settings.ppo_response_length, settings.ppo_temperature, settings.ppo_max_prompt_length)

    def answers(self, engine: RolloutEngine, tokenizer: Any, *, full: bool = False) -> list[dict[str, Any]]:
        """Each prompt with the share of the sampled answers of the weights `engine` holds that
        match its regex ("share", "matched" of "samples") and the first few of those answers: the
        first `samples` answers, or with `full` (a reference's reading: the gate's and the guard's
        champion, the loop's evaluation) `samples + confirm`."""
        n = self.samples + self.confirm if full else self.samples
        return self._draw(engine, tokenizer, range(len(self.items)), 0, n)

    def read(self, engine: RolloutEngine, tokenizer: Any,
             reference: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(the answers, the prompts that `failed` against `reference`) of the weights `engine` holds,
        read sequentially: a prompt that fails on the first `samples` answers is decided on `confirm`
        more (its record then keeps the screen's share as "first_share")."""
        now = self._draw(engine, tokenizer, range(len(self.items)), 0, self.samples)
        screened = self.failed(reference, now)
        if not screened or not self.confirm:
            return now, screened
        suspects = {f["prompt"] for f in screened}
        again = [i for i, it in enumerate(self.items) if it["prompt"] in suspects]
        more = iter(self._draw(engine, tokenizer, again, self.samples, self.confirm))
        now = [_pooled(n, next(more)) if n["prompt"] in suspects else n for n in now]
        return now, self.failed(reference, now)

    def _draw(self, engine: RolloutEngine, tokenizer: Any, which: Iterable[int], first: int,
              n: int) -> list[dict[str, Any]]:
        """`n` answers to each of the prompts `which` (by index), on seeds `first`.. of each prompt's."""
        out = []
        for i in which:
            item = self.items[i]
            messages = [{"role": "user", "content": item["prompt"]}]
            ids = encode_prompt(tokenizer, messages, self.max_prompt_length)
            # a prompt's seeds are samples + confirm apart: vLLM seeds a request's n answers seed + j
            drawn = engine.generate([ids], max_tokens=self.max_tokens, temperature=self.temperature, n=n,
                                    seed=self.seed + i * (self.samples + self.confirm) + first)
            texts = [s.text for s in drawn]
            matched = sum(1 for t in texts if re.search(item["expect"], t) is not None)
            out.append({**item, "share": matched / len(texts), "matched": matched, "samples": len(texts),
                        "answers": [t[:200] for t in texts[:KEPT_ANSWERS]]})
        return out

    def failed(self, reference: list[dict[str, Any]], now: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The prompts of `now` whose share fell more than max_drop below `reference`'s (the same
        prompts, answered by the reference weights), each with "reference_share" added. A prompt the
        reference never matched cannot fail: not knowing it is not a regression."""
        before = {r["prompt"]: float(r["share"]) for r in reference}
        return [{**n, "reference_share": before.get(n["prompt"], 0.0)} for n in now
                if float(n["share"]) < before.get(n["prompt"], 0.0) - self.max_drop]


def _pooled(screen: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """One prompt's screening answers and its confirming ones, read as one share."""
    matched, samples = screen["matched"] + more["matched"], screen["samples"] + more["samples"]
    return {**screen, "share": matched / samples, "matched": matched, "samples": samples,
            "first_share": screen["share"]}
