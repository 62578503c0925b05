"""The round's gate: does the PPO candidate replace the champion?

    from trainer.gate import gate_verdict   # trainer/round_phases.py measures, then asks gate_verdict

On held-out prompts (never trained on) the candidate and the champion each answer with the same
seeds; the reward model scores both (less the missing-EOS penalty). The candidate passes when

  * its win rate over the champion is >= gate_min_win, a tie counting half: the same answer, or
    rewards within gate_tie_margin of each other (closer than the reward model can tell apart);
    with gate_length_controlled, the win rate at equal length (`length_controlled_win_rate`);
  * the mean KL of its answers to the reference is <= gate_max_kl, nats per answer (or, with
    gate_max_kl_per_token, their KL per token is <= that: `checked_kl`): the champion's,
    or with ppo_reference=base v0's (the root of its lineage), which makes gate_max_kl one budget
    for all rounds together,
    on answers as long as the service's (gate_kl_max_tokens; default_max_tokens), not the
    rollouts': past the rollouts' cut PPO never saw the policy's answers, and it drifted there;
  * no sanity prompt's share of matching answers fell more than gate_sanity_max_drop below the
    champion's (trainer/sanity.py: sampled answers, the same seeds for both).

`measure_gate` runs the models (engine, reward model, policy) and returns the numbers;
`gate_verdict` is the decision, a pure function of those numbers and the thresholds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kaizen.core.settings import Settings
from trainer.policy import PolicyWithValue, RewardScorer, encode_prompt, kl_to_reference, load_policy
from trainer.ppo_config import PPOConfig
from trainer.gate_stages import settled, stage_sizes
from trainer.reward_eval import length_controlled_win_rate, wilson_interval
from trainer.rollout_engine import RolloutEngine, Sample
from trainer.sanity import SanityCheck
from trainer.timing import PhaseTimer

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class GateThresholds:
    """The settings the gate decides by."""

    min_win: float
    """gate_min_win: the least win rate over the champion, ties counting half."""
    max_kl: float
    """gate_max_kl: the most mean KL to the reference, nats per answer (per token with `per_token`)."""
    tie_margin: float
    """gate_tie_margin: rewards this close (or the same answer) are a tie."""
    per_token: bool = False
    """max_kl is gate_max_kl_per_token, nats per answer token (`checked_kl`)."""
    length_controlled: bool = False
    """gate_length_controlled: min_win bounds the length-controlled win rate, not the raw one."""

    @classmethod
    def from_settings(cls, settings: Settings) -> GateThresholds:
        per_token = settings.gate_max_kl_per_token
        return cls(settings.gate_min_win, per_token if per_token is not None else settings.gate_max_kl,
                   settings.gate_tie_margin, per_token is not None, settings.gate_length_controlled)


def checked_kl(kl: dict[str, Any], settings: Settings) -> float:
    """The KL reading (`read_kl`'s record) that the gate and the guard bound: per answer token when
    gate_max_kl_per_token is set, else per answer."""
    return float(kl["kl_per_token"] if settings.gate_max_kl_per_token is not None else kl["kl"])


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    failed: list[str]
    """Why the candidate was rejected, one reason per failed check; empty when it passed."""
    win_rate: float
    wins: float
    """Pairs won, a tie counting half."""
    ties: int
    lc_win_rate: float | None = None
    """The win rate at equal length, when the answers' length differences were given."""

    @property
    def reason(self) -> str:
        return "passed the gate" if self.passed else "failed the gate: " + "; ".join(self.failed)


def gate_verdict(gaps: Sequence[float], same: Sequence[bool], mean_kl: float, failed_sanity: Sequence[str],
                 thresholds: GateThresholds, length_diffs: Sequence[float] | None = None) -> GateVerdict:
    """The gate's decision from its measured numbers.

    gaps[i]: candidate's minus champion's reward on held-out pair i; same[i]: both gave the same
    answer; mean_kl: the candidate's mean KL to the reference (per answer, or per token with
    thresholds.per_token); failed_sanity: the sanity prompts
    whose share of matching answers fell below the champion's (`SanityCheck.failed`). A pair is a
    tie when the answers are the same or |gap| <= tie_margin (a saturated RM scores "Yes." 0.989
    and "Yes" 0.982: counting that as a loss made the gate a coin toss); win rate = (wins + ties /
    2) / pairs. length_diffs[i]: the candidate's answer's length minus the champion's, in tokens; with
    them the verdict also holds the length-controlled win rate (outcomes 1 / 0.5 / 0 regressed on
    the length difference), which min_win bounds under thresholds.length_controlled.
    """
    assert len(gaps) == len(same) and gaps, (len(gaps), len(same))
    outcomes = pair_outcomes(gaps, same, thresholds.tie_margin)
    wins = sum(outcomes)
    win_rate = wins / len(gaps)
    lc = None
    if length_diffs is not None:
        lc = length_controlled_win_rate(outcomes, length_diffs)
    elif thresholds.length_controlled:
        raise ValueError("gate_verdict: a length-controlled gate needs the answers' length differences")
    failed = []
    rate, name = (lc, "length-controlled win rate") if lc is not None and thresholds.length_controlled \
        else (win_rate, "win rate")
    if rate < thresholds.min_win:
        failed.append(f"{name} {rate:.3f} < {thresholds.min_win}")
    if mean_kl > thresholds.max_kl:
        unit = " per token" if thresholds.per_token else ""
        failed.append(f"KL {mean_kl:.3f} > {thresholds.max_kl}{unit}")
    if failed_sanity:
        failed.append("sanity: " + ", ".join(repr(p) for p in failed_sanity))
    return GateVerdict(not failed, failed, win_rate, wins, sum(1 for o in outcomes if o == 0.5), lc)


def pair_outcomes(gaps: Sequence[float], same: Sequence[bool], tie_margin: float) -> list[float]:
    """Each pair's outcome for the candidate: 1 won, 0 lost, 0.5 a tie (the same answer, or rewards
    within tie_margin: `gate_verdict`)."""
    return [0.5 if s or abs(g) <= tie_margin else float(g > 0) for g, s in zip(gaps, same, strict=True)]


# -- measuring ---------------------------------------------------------------------------------


def gate_answers(engine: RolloutEngine, tokenizer: Any, prompts: list[Messages], settings: Settings,
                 config: PPOConfig, n: int | None = None) -> tuple[list[list[int]], list[Sample]]:
    """(prompt ids, gate_samples (or `n`) sampled answers to each) for the held-out prompts from
    whatever weights `engine` holds."""
    ids = [encode_prompt(tokenizer, m, config.max_prompt_length) for m in prompts]
    return ids, held_answers(engine, ids, settings, config, n)


def held_answers(engine: RolloutEngine, held_ids: list[list[int]], settings: Settings,
                 config: PPOConfig, n: int | None = None, first: int = 0) -> list[Sample]:
    """gate_samples (or `n`) answers to each held-out prompt at the rollouts' length, on the gate's
    seeds, from its `first`-th answer on: the i-th answer of a prompt is the same whatever `n` and
    whichever call draws it (vLLM seeds a request's answers seed, seed + 1, ...; each prompt's request
    here is seeded base + prompt index, so answers first.. of all prompts are a draw seeded base + first)."""
    # the same seeds for champion and candidate: differences come from the weights
    return engine.generate(held_ids, max_tokens=config.response_length, temperature=config.temperature,
                           n=n or settings.gate_samples, seed=settings.ppo_seed + 7_919 + first)


@dataclass(frozen=True)
class ChampionAnswers:
    """What the gate compares the candidate with, answered while the engine held the champion."""

    held: list[Sample]
    """The held-out prompts' sampled answers of the gate's first stage (`gate_answers`)."""
    check: SanityCheck
    """The round's sanity check (gate_sanity_*), which the guard and the gate read the candidate by."""
    sanity: list[dict[str, Any]]
    """The sanity prompts' shares (`check.answers(..., full=True)`: the reference reading)."""
    folder: Path
    """The champion's weights, which the engine reloads to answer the gate's later stages."""


@dataclass
class GateModels:
    """What the gate reads with: the reward scorer, the reference (the champion) and its tokenizer."""

    scorer: RewardScorer
    reference: PolicyWithValue
    tokenizer: Any
    base: PolicyWithValue | None = None
    """With ppo_reference=base, the root of the champion's lineage (v0), when it is not the champion:
    the penalty's reference, and what the guard and the gate read KL against (`kl_reference`)."""
    base_version: str | None = None
    reference_version: str | None = None
    """The champion's version name (the records name what KL was read against)."""

    @property
    def kl_reference(self) -> PolicyWithValue:
        """What KL is read against: the base where there is one, else the champion."""
        return self.base if self.base is not None else self.reference

    @property
    def kl_reference_version(self) -> str:
        """`kl_reference`'s version name."""
        name = self.base_version if self.base is not None else self.reference_version
        assert name is not None, "GateModels: the reference's version name is not set"
        return name


def candidate_kl(engine: RolloutEngine, candidate: Path, models: GateModels, held_ids: list[list[int]],
                 cand: list[Sample], settings: Settings, config: PPOConfig,
                 known: dict[str, Any] | None = None) -> dict[str, Any]:
    """`read_kl` of the candidate saved in `candidate` (which `engine` holds), with `cand` (the
    gate's own answers, at the rollouts' length) to stand in for, or to compare with, the long ones.
    `known`: the update's guard's reading of these very weights (`UpdateGuard.candidate_kl`), which
    the gate takes instead of reading it again (kl_read_by "guard"): the same prompts, seeds and
    weights give the same number (the 2026-12-05 loop row: 0.5962102 both), and on the 2-core EPYC
    the second reading was 180 s of a 597-s gate. Only the rollout-length diagnostic is read here."""
    if known is not None and int(known["kl_max_tokens"]) <= config.response_length:
        return {**known, "kl_read_by": "guard"}  # no longer pass: no diagnostic, nothing to load
    policy, _, _ = load_policy(candidate)
    if known is None:
        return {**read_kl(engine, policy, models.kl_reference, models.tokenizer, held_ids, settings, config,
                          cand), "kl_read_by": "gate"}
    return {**known, "kl_read_by": "guard", "kl_rollout_length": _mean_kl(
        policy, models.kl_reference, models.tokenizer, held_ids, firsts(cand, 1), config)}


def read_kl(engine: RolloutEngine, policy: PolicyWithValue, reference: PolicyWithValue, tokenizer: Any,
            held_ids: list[list[int]], settings: Settings, config: PPOConfig,
            cand: list[Sample] | None = None) -> dict[str, Any]:
    """The mean KL of `policy` (whose weights `engine` holds) to `reference`, nats per answer (k1 summed
    over the answer's tokens) and per token, as the gate reads it: on gate_kl_samples answers per
    held-out prompt, sampled at gate_kl_max_tokens (else the service's default_max_tokens) with the
    gate's seeds, or, when that is no longer than the rollouts, the first gate_kl_samples of each
    prompt's answers among the gate's own (`cand`, else sampled again with their seeds): reading all
    gate_samples (8) answers of 256 tokens there took 220 s of a RAFT round's 610-s gate, and the
    guard's check as long again, for a mean whose precision the longer pass already settles for.
    The PPO loop's guard (trainer/ppo_loop.py) reads the same during the update. Returns the
    gate record's KL fields: kl (per answer), kl_per_token (kl over kl_answer_tokens; `checked_kl` says
    which of the two the gate bounds), kl_max_tokens, kl_answer_tokens (mean length), kl_answers (how
    many answers were read) and, when a longer
    pass ran and `cand` was given, kl_rollout_length (the same KL at the rollouts' length, on `cand`'s first
    answer to each prompt: a diagnostic, which on all gate_samples answers cost 129 s of a 352-s gate
    for SmolLM2 on the 2-core EPYC)."""
    limit = settings.gate_kl_max_tokens or settings.default_max_tokens
    longer = limit > config.response_length
    if longer:
        answers = engine.generate(held_ids, max_tokens=limit, temperature=config.temperature,
                                  n=settings.gate_kl_samples, seed=settings.ppo_seed + 104_729)
    elif cand is not None and len(own := firsts(cand, settings.gate_kl_samples)) == \
            len(held_ids) * settings.gate_kl_samples:
        answers = own
    else:  # the guard, or a gate stage of fewer answers: the gate's first answers, sampled again
        answers = held_answers(engine, held_ids, settings, config, n=settings.gate_kl_samples)

    tokens = sum(len(s.token_ids) for s in answers) / len(answers)
    out = {"kl": _mean_kl(policy, reference, tokenizer, held_ids, answers, config),
           "kl_max_tokens": limit if longer else config.response_length,
           "kl_answer_tokens": tokens, "kl_answers": len(answers)}
    out["kl_per_token"] = out["kl"] / max(tokens, 1.0)
    if longer and cand is not None:
        out["kl_rollout_length"] = _mean_kl(policy, reference, tokenizer, held_ids, firsts(cand, 1), config)
    return out


def _mean_kl(policy: PolicyWithValue, reference: PolicyWithValue, tokenizer: Any, held_ids: list[list[int]],
             samples: list[Sample], config: PPOConfig) -> float:
    """The mean over `samples` of `policy`'s k1 KL to `reference`, summed over each answer's tokens."""
    kls = kl_to_reference(policy, reference, tokenizer, [held_ids[s.prompt] for s in samples],
                          [s.token_ids for s in samples], config.temperature)
    return sum(kls) / len(kls)


def firsts(samples: Sequence[Sample], n: int) -> list[Sample]:
    """The first `n` answers of each prompt among `samples`, in their order."""
    seen: dict[int, int] = {}
    out = []
    for s in samples:
        if seen.get(s.prompt, 0) < n:
            seen[s.prompt] = seen.get(s.prompt, 0) + 1
            out.append(s)
    return out


@dataclass
class GatePairs:
    """The gate's pairs read so far, stage after stage: the candidate's and the champion's answer to
    the same prompt on the same seed, and their rewards."""

    cand: list[Sample] = field(default_factory=list)
    theirs: list[Sample] = field(default_factory=list)
    r_cand: list[float] = field(default_factory=list)
    r_champ: list[float] = field(default_factory=list)

    def add(self, cand: list[Sample], theirs: list[Sample],
            score: Callable[[list[Sample]], torch.Tensor]) -> None:
        """One stage's answers, paired by prompt (the same seeds, the same order), scored by `score`."""
        cand, theirs = sorted(cand, key=lambda s: int(s.prompt)), sorted(theirs, key=lambda s: int(s.prompt))
        assert [s.prompt for s in cand] == [s.prompt for s in theirs], "the gate's stages answer unequally"
        self.cand += cand
        self.theirs += theirs
        self.r_cand += score(cand).tolist()
        self.r_champ += score(theirs).tolist()

    @property
    def gaps(self) -> list[float]:
        return [a - b for a, b in zip(self.r_cand, self.r_champ, strict=True)]

    @property
    def same(self) -> list[bool]:
        return [a.token_ids == b.token_ids for a, b in zip(self.cand, self.theirs, strict=True)]

    @property
    def length_diffs(self) -> list[float]:
        pairs = zip(self.cand, self.theirs, strict=True)
        return [float(len(a.token_ids) - len(b.token_ids)) for a, b in pairs]


def measure_gate(engine: RolloutEngine, candidate: Path, models: GateModels, held_prompts: list[Messages],
                 held_ids: list[list[int]], champ: ChampionAnswers, settings: Settings,
                 config: PPOConfig,
                 known_kl: dict[str, Any] | None = None) -> tuple[dict[str, Any], GateVerdict]:
    """With the engine holding the weights saved in `candidate`: answer the held-out prompts, read
    the KL and run the sanity prompts against the champion's, then score both sides' answers stage
    by stage (trainer/gate_stages.py: the champion's first stage is `champ.held`, its later ones are
    drawn here with its weights reloaded) until the verdict is settled; returns (the gate's record,
    its verdict). The record's `seconds` times each part. `known_kl`: the guard's reading of the
    candidate's KL (`candidate_kl`)."""
    timer, thresholds = PhaseTimer(), GateThresholds.from_settings(settings)
    sizes = stage_sizes(settings.gate_samples, settings.gate_stages)
    total = len(held_ids) * sum(sizes)
    with timer("answers"):
        cand = held_answers(engine, held_ids, settings, config, n=sizes[0])
    with timer("kl"):
        kl = candidate_kl(engine, candidate, models, held_ids, cand, settings, config, known_kl)
    with timer("sanity"):
        sanity, broke = champ.check.read(engine, models.tokenizer, champ.sanity)
    failing = checked_kl(kl, settings) > thresholds.max_kl or bool(broke)  # no win rate passes it

    def score(ss: list[Sample]) -> torch.Tensor:  # (N,) RM score less the missing-EOS penalty
        unended = torch.tensor([0.0 if s.finished else 1.0 for s in ss])
        scores: torch.Tensor = models.scorer([held_prompts[s.prompt] for s in ss], [s.text for s in ss])
        return scores - float(config.missing_eos_penalty) * unended

    pairs, stages = GatePairs(), []
    for k, size in enumerate(sizes):
        theirs = champ.held
        if k:
            cand, theirs = _later_stage(engine, (candidate, champ.folder), held_ids, settings, config,
                                        (size, sum(sizes[:k])), timer)
        with timer("scores"):
            pairs.add(cand, theirs, score)
        outcomes = pair_outcomes(pairs.gaps, pairs.same, thresholds.tie_margin)
        stages.append({"answers_per_prompt": size, "pairs": len(outcomes),
                       "win_rate": sum(outcomes) / len(outcomes)})
        if failing or (not thresholds.length_controlled
                       and settled(outcomes, total, thresholds.min_win, settings.gate_settle_z)):
            break
    verdict = gate_verdict(pairs.gaps, pairs.same, checked_kl(kl, settings), [s["prompt"] for s in broke],
                           thresholds, pairs.length_diffs)
    gate = _record(pairs, verdict, kl, settings, champ, (sanity, broke))
    gate.update(stages=stages, pairs_planned=total,
                seconds={k: round(v, 2) for k, v in timer.seconds.items()})
    return gate, verdict


def _later_stage(engine: RolloutEngine, weights: tuple[Path, Path], held_ids: list[list[int]],
                 settings: Settings, config: PPOConfig, answers: tuple[int, int],
                 timer: PhaseTimer) -> tuple[list[Sample], list[Sample]]:
    """A later stage's answers, (candidate's, champion's): `answers` = (how many per prompt, from which
    one on); `weights` = (the candidate's folder, the champion's), which the engine reloads as needed."""
    n, first = answers
    out = []
    for folder, part in zip(weights, ("answers", "champion_answers"), strict=True):
        with timer(part):
            if engine.weights_version != str(folder):
                timer.seconds["reloads"] = timer.seconds.get("reloads", 0.0) + engine.load_weights(folder)
            out.append(held_answers(engine, held_ids, settings, config, n=n, first=first))
    return out[0], out[1]


def _record(pairs: GatePairs, verdict: GateVerdict, kl: dict[str, Any], settings: Settings,
            champ: ChampionAnswers,
            sanity_read: tuple[list[dict[str, Any]], list[dict[str, Any]]]) -> dict[str, Any]:
    """The gate's record (the round's state, the registry's manifest) but for its stages and seconds."""
    sanity, broke = sanity_read
    n = len(pairs.cand)
    return {
        "win_rate": verdict.win_rate,
        "win_rate_ci95": list(wilson_interval(round(verdict.wins), n)),
        "pairs": n, "ties": verdict.ties, "tie_margin": settings.gate_tie_margin,
        "min_win": settings.gate_min_win, "lc_win_rate": verdict.lc_win_rate,
        "length_controlled": settings.gate_length_controlled,
        "length_candidate": sum(len(s.token_ids) for s in pairs.cand) / n,
        "length_champion": sum(len(s.token_ids) for s in pairs.theirs) / n,
        "reward_candidate": sum(pairs.r_cand) / n, "reward_champion": sum(pairs.r_champ) / n,
        **kl, "max_kl": settings.gate_max_kl, "max_kl_per_token": settings.gate_max_kl_per_token,
        "sanity": sanity, "sanity_max_drop": champ.check.max_drop, "sanity_passed": not broke,
        "sanity_champion": [{"prompt": c["prompt"], "share": c["share"]} for c in champ.sanity],
        "passed": verdict.passed, "failed": verdict.failed,
    }
