"""The round's gate decision (trainer/gate.py `gate_verdict`) on hand-made numbers.

Each branch: accepted; rejected for a low win rate (raw, or at equal length), a high KL, a failed
sanity prompt, and all three at once; ties by the same answer or by rewards within gate_tie_margin
counting half; and the sanity check's rule (trainer/sanity.py), a share of matching answers
against the champion's.
"""

from __future__ import annotations

from pathlib import Path

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


def test_a_budget_per_token_replaces_the_budget_per_answer() -> None:
    """gate_max_kl_per_token: the gate (and the guard, trainer/ppo_loop.py) bound the KL per answer token
    instead of per answer, so a long candidate is not refused for the tokens it keeps."""
    from kaizen.core.settings import Settings
    from trainer.gate import checked_kl

    s = Settings(gate_min_win=0.55, gate_max_kl=2.5, gate_tie_margin=0.02, gate_max_kl_per_token=0.04)
    t = GateThresholds.from_settings(s)
    assert t == GateThresholds(0.55, 0.04, 0.02, per_token=True)
    long, short = {"kl": 3.6, "kl_per_token": 0.03}, {"kl": 2.0, "kl_per_token": 0.05}
    assert checked_kl(long, s) == 0.03 and checked_kl(short, s) == 0.05
    assert verdict([0.5, 0.5], kl=checked_kl(long, s), thresholds=t).passed  # 3.6 per answer: over 2.5
    assert verdict([0.5, 0.5], kl=checked_kl(short, s), thresholds=t).failed == ["KL 0.050 > 0.04 per token"]
    per_answer = Settings(gate_max_kl=2.5)
    assert checked_kl(long, per_answer) == 3.6 and not GateThresholds.from_settings(per_answer).per_token


def test_a_length_controlled_gate_refuses_a_candidate_that_wins_only_by_being_shorter() -> None:
    """gate_length_controlled: a reward model that favours short answers makes a candidate that
    answers shorter win raw; at equal length it wins nothing, and the gate decides by that. A
    candidate that wins at every length passes both ways."""
    from kaizen.core.settings import Settings

    # 40 pairs: the shorter answer wins 4 in 5 (30 pairs where the candidate is 40 tokens shorter: 24
    # won; 10 where it is 40 longer: 2 won); at equal length the candidate is no better than the champion
    gaps = [0.5] * 24 + [-0.5] * 6 + [0.5] * 2 + [-0.5] * 8
    diffs = [-40.0] * 30 + [40.0] * 10
    lc = GateThresholds.from_settings(Settings(gate_min_win=0.55, gate_length_controlled=True))
    assert lc == GateThresholds(0.55, 3.0, 0.1, length_controlled=True)
    raw = GateThresholds(0.55, 3.0, 0.1)
    by_raw = gate_verdict(gaps, [False] * 40, 1.0, [], raw, diffs)
    assert by_raw.passed and by_raw.win_rate == 0.65
    assert by_raw.lc_win_rate is not None and abs(by_raw.lc_win_rate - 0.5) < 0.01
    by_lc = gate_verdict(gaps, [False] * 40, 1.0, [], lc, diffs)
    assert not by_lc.passed and by_lc.win_rate == 0.65
    assert by_lc.failed == [f"length-controlled win rate {by_lc.lc_win_rate:.3f} < 0.55"]
    # wins at both lengths (3 of 4 where shorter, 3 of 4 where longer), ties counting half: passes both
    gaps2 = [0.5, 0.5, 0.5, -0.5, 0.5, 0.5, 0.5, 0.0] * 5
    diffs2 = ([-40.0] * 4 + [40.0] * 4) * 5
    good = gate_verdict(gaps2, [False] * 40, 1.0, [], lc, diffs2)
    assert good.passed and good.ties == 5 and good.lc_win_rate is not None and good.lc_win_rate > 0.7
    with pytest.raises(ValueError, match="length differences"):
        gate_verdict(gaps, [False] * 40, 1.0, [], lc)  # no lengths: the decision cannot be made


def test_a_sanity_prompt_fails_only_when_its_share_drops_past_the_margin() -> None:
    """trainer/sanity.py: the share of sampled answers that match, against the champion's on the
    same seeds. A flipped near-tie (v0's greedy first token to "capital of France" is "The" at 0.155
    against "L" at 0.140) moves the share a little and passes; a model that forgot the answer fails;
    a prompt the champion never matched cannot fail."""
    from trainer.sanity import SanityCheck

    check = SanityCheck([], samples=16, max_drop=0.25, seed=0)

    def share(prompt: str, s: float) -> dict[str, object]:
        return {"prompt": prompt, "expect": "x", "share": s}

    champion = [share("paris", 0.5), share("two", 1.0), share("unknown", 0.0)]
    assert check.failed(champion, [share("paris", 0.3125), share("two", 0.75), share("unknown", 0.0)]) == []
    broke = check.failed(champion, [share("paris", 0.0625), share("two", 0.6875), share("unknown", 0.0)])
    assert [(b["prompt"], b["reference_share"]) for b in broke] == [("paris", 0.5), ("two", 1.0)]
    assert check.failed(champion, [share("new prompt", 0.0)]) == []  # no reference share: not a regression
    strict = SanityCheck([], samples=16, max_drop=0.0, seed=0)
    assert [b["prompt"] for b in strict.failed(champion, [share("two", 0.9375)])] == ["two"]


def test_the_sanity_check_comes_from_the_settings(tmp_path: Path) -> None:
    from kaizen.core.settings import Settings
    from trainer.sanity import DEFAULT_SANITY, SanityCheck

    check = SanityCheck.from_settings(Settings(gate_sanity_samples=8, gate_sanity_max_drop=0.5, ppo_seed=3))
    assert (check.items, check.samples, check.max_drop) == (DEFAULT_SANITY, 8, 0.5) and check.seed > 3
    f = tmp_path / "sanity.jsonl"
    f.write_text('{"prompt": "2+2?", "expect": "4"}\n\n{"prompt": "Hi", "expect": "(?i)hello"}\n')
    assert SanityCheck.from_settings(Settings(gate_sanity_file=f)).items == [
        {"prompt": "2+2?", "expect": "4"}, {"prompt": "Hi", "expect": "(?i)hello"}]
