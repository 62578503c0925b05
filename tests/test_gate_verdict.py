"""The round's gate decision (trainer/gate.py `gate_verdict`) on hand-made numbers.

Each branch: accepted; rejected for a low win rate, a high KL, a failed sanity prompt, and all
three at once; ties by the same answer or by rewards within gate_tie_margin counting half.
"""

from __future__ import annotations

import pytest

from trainer.gate import GateThresholds, GateVerdict, gate_verdict

T = GateThresholds(min_win=0.5, max_kl=3.0, tie_margin=0.05)


def verdict(gaps: list[float], same: list[bool] | None = None, kl: float = 1.0,
            failed_sanity: list[str] | None = None, thresholds: GateThresholds = T) -> GateVerdict:
    return gate_verdict(gaps, same or [False] * len(gaps), kl, failed_sanity or [], thresholds)


def test_accepted_when_every_check_passes() -> None:
    v = verdict([0.5, 0.2, -0.3, 0.4])  # 3 wins of 4, no tie: 0.75 >= 0.5
    assert v.passed and v.failed == []
    assert (v.win_rate, v.wins, v.ties) == (0.75, 3.0, 0)
    assert v.reason == "passed the gate"


def test_win_rate_exactly_at_the_threshold_passes() -> None:
    v = verdict([0.5, -0.5])  # 1 of 2 = 0.5, not < 0.5
    assert v.passed and v.win_rate == 0.5


def test_rejected_for_a_low_win_rate() -> None:
    v = verdict([0.5, -0.2, -0.3, -0.4])  # 1 of 4 = 0.25 < 0.5
    assert not v.passed
    assert v.failed == ["win rate 0.250 < 0.5"]
    assert v.reason == "failed the gate: win rate 0.250 < 0.5"


def test_rejected_for_a_high_kl() -> None:
    v = verdict([0.5, 0.5], kl=3.25)
    assert v.failed == ["KL 3.250 > 3.0"]
    assert verdict([0.5, 0.5], kl=3.0).passed  # at the threshold: not > 3.0


def test_rejected_for_a_failed_sanity_prompt() -> None:
    v = verdict([0.5, 0.5], failed_sanity=["What is the capital of France?", "2+2?"])
    assert v.failed == ["sanity: 'What is the capital of France?', '2+2?'"]


def test_every_reason_is_given_in_order() -> None:
    v = verdict([-0.5, -0.5], kl=4.0, failed_sanity=["q"])
    assert v.failed == ["win rate 0.000 < 0.5", "KL 4.000 > 3.0", "sanity: 'q'"]
    assert v.reason == "failed the gate: win rate 0.000 < 0.5; KL 4.000 > 3.0; sanity: 'q'"


def test_rewards_within_the_tie_margin_count_half() -> None:
    # +0.04 and -0.05 are ties (|gap| <= 0.05), +0.06 a win, -0.06 a loss: wins 1 + 2 x 0.5 = 2 of 4
    v = verdict([0.04, -0.05, 0.06, -0.06])
    assert (v.ties, v.wins, v.win_rate) == (2, 2.0, 0.5)
    assert v.passed
    # without the margin the same gaps are 2 wins, 2 losses and no tie: the same rate by another road
    strict = verdict([0.04, -0.05, 0.06, -0.06], thresholds=GateThresholds(0.5, 3.0, 0.0))
    assert (strict.ties, strict.wins) == (0, 2.0)


def test_small_wins_within_the_margin_do_not_pass_a_candidate() -> None:
    # a saturated RM: the candidate is "better" by less than it can tell apart on every pair
    v = verdict([0.01, 0.02, 0.03], thresholds=GateThresholds(min_win=0.6, max_kl=3.0, tie_margin=0.05))
    assert (v.ties, v.win_rate) == (3, 0.5)
    assert v.failed == ["win rate 0.500 < 0.6"]
    assert verdict([0.01, 0.02, 0.03], thresholds=GateThresholds(0.6, 3.0, 0.0)).passed


def test_the_same_answer_is_a_tie_whatever_the_rewards() -> None:
    v = verdict([0.9, -0.9, 0.9], same=[True, True, False])
    assert (v.ties, v.wins) == (2, 2.0)  # one win + two halves
    assert v.win_rate == pytest.approx(2 / 3)


def test_no_pairs_is_an_internal_error() -> None:
    with pytest.raises(AssertionError):
        verdict([])


def test_thresholds_come_from_the_settings() -> None:
    from kaizen.core.settings import Settings

    s = Settings(gate_min_win=0.55, gate_max_kl=2.5, gate_tie_margin=0.02)
    assert GateThresholds.from_settings(s) == GateThresholds(0.55, 2.5, 0.02)
