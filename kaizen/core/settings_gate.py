"""Settings of training rounds and their gate: when a round starts, and what a candidate must show on
held-out prompts (win rate over the champion, KL to the reference, sanity prompts) to be published.

Field groups only: kaizen/core/settings.py's `Settings` inherits them with the others (trainer/gate.py
and trainer/sanity.py read them); the environment names are `KAIZEN_` + the field name in capitals.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings


class RoundGateSettings(BaseSettings):
    """When a training round starts, and the gate its candidate must pass."""

    # -- the gate's held-out prompts and sanity prompts -------------------------------
    gate_prompts: int = Field(default=32, ge=1)
    """Held-out prompts the gate compares candidate and champion on."""
    gate_samples: int = Field(default=8, ge=1)
    """Sampled answers per held-out prompt and model (pairs compared by the reward model). A loop
    round on the EPYC (500 votes, 17 held-out prompts) with 2 had 34 pairs: win rate 0.485, 95%
    interval [0.31, 0.63], so the verdict was a coin toss on a candidate whose mean reward was 0.21
    higher. 8 give 4x the pairs for about a minute more per round here (an estimate from the
    scoring rate; the round is ~12 minutes)."""
    gate_stages: int = Field(default=2, ge=1)
    """The gate reads its gate_samples answers per prompt in this many stages (as equal as they
    divide; each stage's answers are the full draw's, on the same seeds) and stops after the stage
    whose verdict is settled: the win rate so far lies more than gate_settle_z of its projected
    spread from gate_min_win, or the KL or a sanity prompt already failed (trainer/gate_stages.py).
    The champion's answers of the later stages are drawn then, the engine reloading its weights
    (under a second on SmolLM2). 1: all answers at once, every round."""
    gate_settle_z: float = Field(default=2.576, gt=0.0)
    """How far (in projected standard errors) a stage's win rate must lie from gate_min_win for the
    gate to stop there: the chance that all gate_samples answers would have decided the other way is
    then under the normal tail beyond it (2.576: 0.5%). Ignored with gate_length_controlled, whose
    regression has no such projection here: that gate reads every stage."""
    gate_sanity_file: Path | None = None
    """Sanity prompts, JSONL {"prompt": str, "expect": regex}; unset: capital of France -> Paris."""
    gate_sanity_samples: int = Field(default=16, ge=1)
    """Answers sampled per sanity prompt (rollout temperature, fixed seeds): the check reads the share
    that matches, not one greedy answer, whose first token is a near-tie on SmolLM2 (trainer/sanity.py)."""
    gate_sanity_confirm_samples: int = Field(default=48, ge=0)
    """More answers read for a sanity prompt whose share failed on the first gate_sanity_samples; it is
    then decided on all of them, against the champion's share on as many (the same seeds). A passing
    check costs no more; 16 answers alone read v1's Paris share as 0.25 where 128 read 0.383 (v0: 0.414),
    and stopped the thirty-ninth loop row's update five iterations early. 0: decide on the first ones."""
    gate_sanity_max_drop: float = Field(default=0.25, ge=0.0, le=1.0)
    """A model fails a sanity prompt when its share of matching answers is more than this below the
    champion's on the same seeds (v0 names Paris in 47% of its answers: one that forgot it, far fewer)."""

    # -- training rounds (PPO) and the gate ------------------------------------------
    min_new_preferences: int = Field(default=64, ge=1)
    """New votes in the store that start a training round."""
    round_interval: timedelta = timedelta(hours=1)
    """A round also starts after this long if at least one new vote arrived."""
    gate_min_win: float = Field(default=0.55, ge=0.0, le=1.0)
    """A candidate must beat the champion by this reward-model win rate on held-out prompts."""
    gate_length_controlled: bool = False
    """Decide by the length-controlled win rate (the gate's verdicts regressed on the candidate's minus
    the champion's answer length, read at equal length, as the loop's evaluation reads a version)
    instead of the raw one: a candidate then passes by what it says, not by answering shorter or
    longer than the champion where the reward model favours one length (one trained on votes cut at
    64 tokens favours short answers). The gate's record holds both readings either way."""
    gate_tie_margin: float = Field(default=0.1, ge=0.0)
    """Rewards (in the reward model's units, normalised by its held-out std) closer than this count
    as a tie in the gate's win rate, as an identical answer does: differences below the RM's
    noise are not wins or losses."""
    gate_max_kl: float = Field(default=3.0, gt=0.0)
    """Mean per-answer KL (nats) to the reference policy (the champion, or v0 with ppo_reference=base)
    a candidate may reach, on
    answers of gate_kl_max_tokens. Measured on SmolLM2: answers that learned to end within 64
    tokens (36% -> 64% ended) sat ~2 nats from v0, and the sanity prompts still passed; 0.5 refused
    every candidate that had moved enough to matter."""
    gate_max_kl_per_token: float | None = Field(default=None, gt=0.0)
    """When set, the gate and the update's guard bound the candidate's KL per answer token (the KL of
    its answers at gate_kl_max_tokens summed, over their tokens summed) by this instead of bounding the
    KL per answer by gate_max_kl; ppo_guard_kl_fraction and ppo_round_kl then count in nats per token
    too. A budget per answer charges a candidate for every token it keeps, so of two candidates that
    moved as far per token the shorter passes: a pull toward short answers, on top of PPO's own. The
    fiftieth loop row kept a candidate at 2.89 nats per answer of 60 tokens (0.048 per token); the
    fifty-second's guard stopped one at 2.29 per answer of 144 tokens (0.016). None (the default):
    gate_max_kl, per answer."""
    gate_kl_max_tokens: int | None = Field(default=None, ge=1)
    """Answer length (tokens) the gate measures the candidate's KL at. None: the service's own,
    default_max_tokens, where users read the answers; PPO never sees the policy past the rollouts'
    cut. The loop's v1 of 2026-12-01 read 1.04 nats to v0 at the rollouts' 64 tokens and 1.58 at
    256 (answers 44 -> 69 tokens); its shorter v2 0.96 and 1.07 to v1. When this is no longer than
    ppo_response_length the gate's own answers are measured instead."""
    gate_kl_samples: int = Field(default=1, ge=1)
    """Answers per held-out prompt the gate (and the update's guard) reads the candidate's KL on: sampled
    at gate_kl_max_tokens when that is longer than ppo_response_length, else the first of the gate's
    own answers (gate_samples of them per prompt). One per prompt: on the 2-core EPYC 64 answers of
    up to 256 tokens, sampled and read by both models, took 77 s; the gate has 32 prompts."""
