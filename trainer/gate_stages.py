"""The gate in stages: it stops reading answers once its verdict is settled.

    from trainer.gate_stages import stage_sizes, settled   # trainer/gate.py `measure_gate` reads by them

The gate compares candidate and champion on gate_samples answers to each held-out prompt, and
passes the candidate when the win rate over all of them is >= gate_min_win (trainer/gate.py). Far
from that line a part of the answers already says what all of them would: a candidate at 0.74 on
the first half will not fall under 0.55 on the second. So the answers come in gate_stages stages
(`stage_sizes`: answers per prompt in each; the i-th answer of a prompt is the same whichever stage
draws it, as vLLM seeds a request's answers seed, seed + 1, ...), and after each the gate asks
`settled`: would the rest of the answers be likely to move the win rate across gate_min_win?

With n of the whole gate's N pairs read, win rate w and standard error s (pairs as outcomes 1 / 0.5
/ 0), the whole gate's win rate is (n w + (N - n) w_rest) / N. If the rest are drawn as these were,
w_rest - w has variance s² n / (N - n) + s² (their own draw, and w's error about the rate both
estimate), so the whole gate's rate lies about w with spread s sqrt(1 - n / N). The verdict is settled
when |w - gate_min_win| is more than gate_settle_z of that spread: the whole gate would decide the
other way with about the normal tail's chance beyond z (2.576: 0.5%). Two approximations, both on the
safe side: s treats the pairs as independent, while the later stages answer the same prompts (their
between-prompt part of the spread is already read, so the true spread is smaller); and s is computed
with one win and one loss added, so a stage of all wins or all ties still has a spread.

A failed KL bound or sanity prompt settles the verdict too (no win rate passes it), and the last stage
always settles. The length-controlled gate (gate_length_controlled) reads every stage: its regression's
estimate has no projection here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def stage_sizes(samples: int, stages: int) -> list[int]:
    """Answers per prompt in each stage: `samples` split into `stages` parts as equal as they divide,
    the larger ones first (8, 3 -> [3, 3, 2]); never more stages than answers."""
    if samples < 1 or stages < 1:
        raise ValueError(f"stage_sizes: samples ({samples}) and stages ({stages}) must be at least 1")
    k = min(samples, stages)
    return [samples // k + (1 if i < samples % k else 0) for i in range(k)]


def projected_spread(outcomes: Sequence[float], total: int) -> float:
    """The standard deviation of the whole gate's win rate about the current one, when `outcomes`
    (1 win, 0.5 tie, 0 loss) are `total`'s first pairs (the module docstring): the standard error
    of their mean, with one win and one loss added to estimate it, times sqrt(1 - n / total)."""
    n = len(outcomes)
    if not 0 < n <= total:
        raise ValueError(f"projected_spread: {n} outcomes of a gate of {total} pairs")
    padded = [*outcomes, 0.0, 1.0]
    mean = sum(padded) / len(padded)
    variance = sum((x - mean) ** 2 for x in padded) / (len(padded) - 1)
    return math.sqrt(variance / n) * math.sqrt(1.0 - n / total)


def settled(outcomes: Sequence[float], total: int, min_win: float, z: float) -> bool:
    """Whether reading the rest of the gate's `total` pairs would be unlikely to carry the win rate
    of `outcomes` (its first pairs) across `min_win`: all pairs read, or the win rate lies more than
    `z` projected spreads (`projected_spread`) from it."""
    if len(outcomes) >= total:
        return True
    rate = sum(outcomes) / len(outcomes)
    return abs(rate - min_win) > z * projected_spread(outcomes, total)
