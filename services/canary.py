"""The canary's vote decision: a test that stays valid when it is re-checked after every vote.

    from services.canary import Tally, canary_decision, count_votes
    tally = count_votes([("u-1", "canary"), ("u-2", "tie"), ...], max_per_user=5)
    d = canary_decision(tally, alpha=0.05, min_votes=30, min_users=10, tuned_votes=100)
    d.verdict, d.lower, d.upper          # "promote" | "rollback" | "collecting", the interval

Pure functions; services/rollout_decisions.py feeds them the champion-vs-canary votes from the shared
store on every registry poll (every few seconds), and the rollout leader acts on the verdict.

**Votes to scores.** A counted vote is a score x_i in [0, 1] for the canary: 1 it won, 0 it
lost, 1/2 a tie or "both bad". The question is whether their mean θ (the canary's win rate, ties
counting half) is above or below 1/2.

**Why not a fixed-n interval.** The 95% Wilson interval this replaces covers θ with probability
0.95 at one vote count fixed in advance. Recomputed at every look it is a different test each
time, and the chance that one of them excludes 1/2 grows with the number of looks: with θ = 1/2
exactly, looking after every vote up to 400 votes, the previous rule wrongly promoted or rolled
back 29% of 500 simulated canaries (12% and 16%), this one 1% (tests/test_canary_integrity.py
prints the numbers).

**The interval (a confidence sequence).** A score in [0, 1] is sub-Gaussian with variance proxy
σ² = 1/4 (Hoeffding 1963), so for every λ, with S_n = Σ_{i≤n} (x_i − θ) and V_n = n σ²,

    M_n(λ) = exp(λ S_n − λ² V_n / 2)

is a nonnegative supermartingale. Mixing λ over a N(0, 1/ρ) prior (Robbins 1970; the mixture
SPRT, mSPRT, of Johari et al. 2017, "Always valid inference") keeps it one, with M_0 = 1:

    M_n = ∫ M_n(λ) dN(0, 1/ρ)(λ) = sqrt(ρ / (V_n + ρ)) · exp(S_n² / (2 (V_n + ρ)))

and Ville's inequality bounds the chance that it *ever* reaches 1/α: P(∃ n: M_n ≥ 1/α) ≤ α.
Solving M_n < 1/α for θ gives, at every n at once with probability at least 1 − α,

    θ ∈ x̄_n ± sqrt((V_n + ρ) · log((V_n + ρ) / (ρ α²))) / n

(Howard, Ramdas, McAuliffe, Sekhon 2021, "Time-uniform, nonparametric, nonasymptotic confidence
sequences", the normal-mixture boundary). Any ρ > 0 is valid; ρ only moves width between early
and late looks. ρ = σ² m / (−2 log α + log(−2 log α + 1)) makes the interval nearly as narrow as
it can be at n = m votes (`tuned_votes`; checked numerically: within 0.01% of the optimum at
m = 30, 100, 300). At m = 100, α = 0.05 its half-width is 0.15 against Wilson's 0.10: anytime
validity costs about 2.4 times the votes of one fixed-n look.

**The verdict.** Promote when the lower bound is above 1/2, roll back when the upper bound is
below 1/2, else keep collecting. A wrong promotion (θ ≤ 1/2) or a wrong rollback (θ ≥ 1/2)
needs θ to leave the interval at some look, so both kinds together happen with probability at
most α however often the rule is re-checked.

**The same floor for rollback as for promotion.** The bound above assumes votes are independent
draws. Live votes are not: they come in bursts from few users on few prompts, so the effective
sample is smaller than the count, and that inflates both error kinds alike: a burst that makes
a good canary look bad is as likely as one that makes a bad canary look good. So the same floors
hold in both directions: at least `min_votes` counted votes from at least `min_users` distinct
users. The previous rule rolled back on any count (4 unanimous votes: Wilson upper bound 0.49)
but promoted only after 30: against a canary with a true win rate of 0.6, 4 losses in a row
happen with probability 0.4⁴ ≈ 2.6% at each start, and one key holder could cast them himself.
With the floor, a rollback on votes needs as much evidence as a promotion; a canary that is
actually broken is still rolled back quickly by the error-rate and latency checks, which need
no votes.

**One key holder.** `count_votes` counts each user's first `max_per_user` votes on a canary's
pairs and ignores the rest (they still train reward models); with the defaults (5 per user, 30
votes, 10 users) one key holds at most 5 of the 30 votes a first decision can rest on. Counting
a prefix (not, say, a down-weighted average) keeps the counted votes a sequence fixed as they
arrive, which the supermartingale argument needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

#: Variance proxy of a score in [0, 1] (Hoeffding): the interval needs no estimate of the variance.
SIGMA2 = 0.25

Side = Literal["canary", "champion", "tie", "both_bad"]
Verdict = Literal["promote", "rollback", "collecting"]


@dataclass(frozen=True)
class Tally:
    """Champion-vs-canary votes from the canary's side: the counted ones, and all that were cast."""

    canary_wins: int = 0
    champion_wins: int = 0
    ties: int = 0
    both_bad: int = 0
    users: int = 0
    """Distinct users among the counted votes."""
    cast: int = 0
    """Votes cast, counted or not."""

    @property
    def votes(self) -> int:
        """Counted votes."""
        return self.canary_wins + self.champion_wins + self.ties + self.both_bad

    @property
    def score(self) -> float:
        """Sum of the counted votes' scores (ties and "both bad" count half)."""
        return self.canary_wins + 0.5 * (self.ties + self.both_bad)


@dataclass(frozen=True)
class CanaryDecision:
    verdict: Verdict
    reason: str
    win_rate: float | None
    lower: float | None
    upper: float | None


def count_votes(votes: Iterable[tuple[str, Side]], max_per_user: int) -> Tally:
    """Tally votes given in the order they were cast as (user, side that won); each user's first
    `max_per_user` count, the rest only in `cast`."""
    if max_per_user < 1:
        raise ValueError(f"max_per_user must be at least 1, got {max_per_user}")
    per_user: dict[str, int] = {}
    counts = {"canary": 0, "champion": 0, "tie": 0, "both_bad": 0}
    cast = 0
    for user, side in votes:
        cast += 1
        seen = per_user.get(user, 0)
        if seen >= max_per_user:
            continue
        per_user[user] = seen + 1
        counts[side] += 1
    return Tally(canary_wins=counts["canary"], champion_wins=counts["champion"], ties=counts["tie"],
                 both_bad=counts["both_bad"], users=len(per_user), cast=cast)


def mixture_rho(alpha: float, tuned_votes: int) -> float:
    """ρ of the N(0, 1/ρ) mixing prior that makes the interval narrowest near `tuned_votes` votes."""
    two_log = -2.0 * math.log(alpha)
    return SIGMA2 * tuned_votes / (two_log + math.log(two_log + 1.0))


def anytime_interval(score: float, n: int, alpha: float, tuned_votes: int) -> tuple[float, float]:
    """Confidence sequence for the mean of n scores in [0, 1] summing to `score` (module docstring):
    covers the true mean at every n at once with probability ≥ 1 − alpha."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n <= 0:
        return 0.0, 1.0
    rho = mixture_rho(alpha, tuned_votes)
    v = SIGMA2 * n + rho
    half = math.sqrt(v * math.log(v / (rho * alpha * alpha))) / n
    mean = score / n
    return max(0.0, mean - half), min(1.0, mean + half)


def canary_decision(tally: Tally, *, alpha: float, min_votes: int, min_users: int,
                    tuned_votes: int) -> CanaryDecision:
    """Promote, roll back or keep collecting, from the counted votes alone (module docstring).

    Valid at every look: P(any wrong promotion or rollback, over all looks) ≤ alpha if counted
    votes are independent draws of the canary's true win rate."""
    n = tally.votes
    if n == 0:
        return CanaryDecision("collecting", "no counted votes yet", None, None, None)
    win_rate = tally.score / n
    lower, upper = anytime_interval(tally.score, n, alpha, tuned_votes)
    numbers = (f"win rate {win_rate:.2f}, {1 - alpha:.0%} anytime interval [{lower:.2f}, {upper:.2f}] "
               f"over {n} counted votes ({tally.cast} cast) from {tally.users} users")
    if n < min_votes or tally.users < min_users:
        return CanaryDecision("collecting", f"{numbers}; a decision needs at least {min_votes} votes from "
                              f"{min_users} users", win_rate, lower, upper)
    if lower > 0.5:
        return CanaryDecision("promote", f"winning: {numbers}", win_rate, lower, upper)
    if upper < 0.5:
        return CanaryDecision("rollback", f"losing: {numbers}", win_rate, lower, upper)
    return CanaryDecision("collecting", f"{numbers}: the interval spans 0.5", win_rate, lower, upper)


def vote_limit_wait(cast: int, oldest: datetime | None, now: datetime, limit: int,
                    window: timedelta) -> float:
    """Seconds until a user who cast `cast` votes in the window ending `now` (the oldest at `oldest`)
    may vote again; 0 while under `limit`. The window slides: the oldest vote leaving it frees one."""
    if cast < limit:
        return 0.0
    if oldest is None:  # the count and the oldest vote come from one query; defensive
        return window.total_seconds()
    return max((oldest + window - now).total_seconds(), 0.001)
