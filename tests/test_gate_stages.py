"""The gate in stages (trainer/gate_stages.py) on hand-made and simulated outcomes.

How answers split into stages; the projected spread's arithmetic; and the property the stages rest
on: where the first stage says "settled", reading every pair would have decided the same way, while
a candidate far from gate_min_win is settled on half its pairs. The simulation draws pair outcomes
(win / tie / loss) at known rates with a seeded generator, as the gate's reward-model verdicts come.
"""

from __future__ import annotations

import math
import random

import pytest

from trainer.gate_stages import projected_spread, settled, stage_sizes


def test_answers_split_into_stages_as_equal_as_they_divide() -> None:
    assert stage_sizes(8, 2) == [4, 4]
    assert stage_sizes(8, 3) == [3, 3, 2]
    assert stage_sizes(8, 1) == [8]
    assert stage_sizes(2, 5) == [1, 1]  # never more stages than answers
    assert sum(stage_sizes(7, 4)) == 7
    with pytest.raises(ValueError, match="at least 1"):
        stage_sizes(0, 2)


def test_the_projected_spread_is_the_standard_error_shrunk_by_what_is_left() -> None:
    outcomes = [1.0, 0.0, 0.5, 1.0, 1.0, 0.0]
    padded = [*outcomes, 0.0, 1.0]
    mean = sum(padded) / 8
    sd = math.sqrt(sum((x - mean) ** 2 for x in padded) / 7)
    assert projected_spread(outcomes, 12) == pytest.approx(sd / math.sqrt(6) * math.sqrt(0.5))
    assert projected_spread(outcomes, 6) == 0.0  # nothing left to read
    # all wins still has a spread (one win and one loss added): 16 wins of 32 pairs
    assert projected_spread([1.0] * 16, 32) > 0.03
    with pytest.raises(ValueError):
        projected_spread([], 4)


def test_a_clear_verdict_settles_and_a_close_one_does_not() -> None:
    z = 2.576
    assert settled([1.0] * 100 + [0.0] * 28, 256, 0.55, z)  # 0.78 on half the pairs
    assert settled([1.0] * 45 + [0.0] * 83, 256, 0.55, z)  # 0.35
    assert not settled([1.0] * 72 + [0.0] * 56, 256, 0.55, z)  # 0.5625, at the line
    assert settled([1.0] * 72 + [0.0] * 56, 128, 0.55, z)  # every pair read: the verdict is the verdict
    # a few pairs settle only what is very far from the line
    assert not settled([1.0, 1.0, 0.0, 1.0], 32, 0.55, z)


def _draw(rng: random.Random, win: float, tie: float, n: int) -> list[float]:
    out = []
    for _ in range(n):
        u = rng.random()
        out.append(1.0 if u < win else 0.5 if u < win + tie else 0.0)
    return out


def test_a_settled_first_stage_agrees_with_all_the_pairs() -> None:
    """32 prompts x 8 answers, read in two stages of 128 pairs, at win rates from far under gate_min_win
    to far over it, with ties (a third of pairs, as the loop's gates read): the early verdict agrees
    with the whole gate's nearly always (the normal tail beyond 2.576 is 0.5%), and a candidate
    0.15 or more from the line is settled on the first stage nearly always."""
    rng = random.Random(17)
    min_win, z, total, half = 0.55, 2.576, 256, 128
    disagree = settled_early = trials = 0
    far_settled = far = 0
    for rate in [0.30, 0.40, 0.45, 0.50, 0.53, 0.55, 0.57, 0.60, 0.65, 0.70, 0.80]:
        tie = 0.33
        win = rate - tie / 2  # win + tie / 2 = rate
        for _ in range(400):
            outcomes = _draw(rng, win, tie, total)
            first = outcomes[:half]
            whole = sum(outcomes) / total >= min_win
            trials += 1
            if settled(first, total, min_win, z):
                settled_early += 1
                disagree += (sum(first) / half >= min_win) != whole
            if abs(rate - min_win) >= 0.15:
                far += 1
                far_settled += settled(first, total, min_win, z)
    assert disagree <= 0.01 * settled_early, (disagree, settled_early)
    assert far_settled >= 0.95 * far, (far_settled, far)
    assert settled_early < trials  # near the line the gate reads on
