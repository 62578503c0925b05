"""A training round's phases, in order: refresh the reward model, train a candidate, gate it, publish.

    from trainer.round_phases import run_phases   # trainer/rounds.py, under the round lock

1. refresh: when votes arrived since the current reward model, `refresh_reward_model` (its own
   gate keeps the better RM); no RM at all: the round is skipped;
2. train candidate: `ppo_iterations` iterations from the champion (trainer/ppo.py) on the store's
   training prompts, its KL penalty against the champion or v0 (`ppo_reference`), saved to the
   round's work folder (then the state file says "gate");
3. gate: the candidate against the champion on held-out prompts (trainer/gate.py); its KL bound,
   and the update's guard, read KL against the penalty's reference: with ppo_reference=base,
   gate_max_kl is one budget from v0 for every round;
4. publish: `Registry.publish` (rejected=True when the gate fails: kept, never served) and the
   model event.

Each phase is marked in the state file before it starts (`RoundContext.phase`) and timed into
the round's record. A round resumed after a crash with its candidate saved runs 3 and 4 only.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from kaizen.core.events import ended_gap
from kaizen.core.model_events import emit
from kaizen.core.registry import Registry
from kaizen.core.rounds_log import read_rounds
from kaizen.core.settings import Settings
from trainer.distributed import ONE_PROCESS
from trainer.gate import ChampionAnswers, GateModels, GateThresholds, GateVerdict, gate_answers, measure_gate
from trainer.gate_stages import stage_sizes
from trainer.policy import RewardScorer, load_policy, save_policy
from trainer.dpo import policy_trainer
from trainer.ppo import IterationStats
from trainer.ppo_loop import KLProbe, TimeBudget, UpdateGuard, run_ppo
from trainer.sanity import SanityCheck
from trainer.ppo_math import kl_spent
from trainer.ppo_config import PPOConfig
from trainer.reward import current_version, refresh_reward_model
from trainer.reward_eval import wilson_interval
from trainer.reward_model import RewardConfig, read_manifest
from trainer.rollout_engine import RolloutEngine, sync_folder
from trainer.round_crew import Crew
from trainer.round_inputs import Messages, VotePair, new_votes_since, read_round_inputs
from trainer.round_record import RoundContext, finish, json_line, record_iteration_metrics
from trainer.timing import PhaseTimer


@dataclass
class RoundJob:
    """What the phases after the reward model share: train candidate -> gate -> publish."""

    registry: Registry
    engine: RolloutEngine
    """Holds the champion's weights at the start."""
    config: PPOConfig
    reward_model: Path
    champion: str
    train_prompts: list[Messages]
    held_prompts: list[Messages]
    vote_pairs: list[VotePair]
    """The users' decided votes on training prompts, for DPO (trainer/dpo.py)."""
    stopped: Callable[[], bool]
    """True once SIGTERM asked the round to stop."""
    crew: Crew
    resuming: bool
    """The candidate was saved before a crash: gate and publish it, no PPO."""
    timer: PhaseTimer
    """Seconds per phase, in the round's record as `timings`."""
    ends_by: float | None = None
    """When the round must end (monotonic seconds; setting round_max_minutes); None: no budget."""


def run_phases(ctx: RoundContext, engine: RolloutEngine | None, stop: threading.Event | None, crew: Crew, *,
               resuming: bool) -> dict[str, Any]:
    """The round's work: refresh the reward model, choose the prompts, start the engine; then
    train candidate -> gate -> publish (`_ppo_gate_publish`). Returns the round's record."""
    settings = ctx.settings

    def stopped() -> bool:
        return stop is not None and stop.is_set()

    ends_by = time.monotonic() + settings.round_max_minutes * 60 if settings.round_max_minutes else None
    registry = Registry(settings.registry_path)
    serving = registry.state().champion
    timer = PhaseTimer()
    if not resuming:
        _refresh(ctx, registry, serving, crew, timer)
    rm = current_version(settings)
    if rm is None:
        reason = "no reward model yet (too few held-out votes to accept one)"
        return finish(ctx, "skipped", {"reason": reason})
    ctx.state["reward_model"] = rm.name
    holdout = read_manifest(rm).get("metrics", {}).get("holdout") or {}
    ctx.state["reward_accuracy"] = holdout.get("accuracy")
    inputs = read_round_inputs(settings)
    train_prompts, held_prompts = inputs.train_prompts, inputs.held_prompts[: settings.gate_prompts]
    if not train_prompts:
        return finish(ctx, "skipped", {"reason": "no training prompts"})
    if not held_prompts:
        return finish(ctx, "skipped", {"reason": "no held-out prompts for the gate"})
    ctx.state.update(train_prompts=len(train_prompts), held_out_prompts=len(held_prompts))
    if "champion" not in ctx.state:  # a resumed round keeps the champion it started from
        ctx.state["champion"] = serving or registry.init_base(settings.model_dir, who="trainer")
    champion = ctx.state["champion"]
    if stopped():
        return finish(ctx, "abandoned", {"reason": "SIGTERM before PPO"})

    own_engine = engine is None
    if engine is None:
        with timer("engine_start"):
            engine = RolloutEngine(settings, registry.path(champion),
                                   max_model_len=settings.engine_max_model_len, seed=settings.ppo_seed)
    else:
        timer.seconds["engine_reset"] = engine.load_weights(registry.path(champion))
    ctx.state["rollout_engine"] = engine.config
    # a resumed round gates with the penalty its candidate was trained with
    eos = ctx.state.setdefault("missing_eos", missing_eos_penalty(inputs.vote_pairs, settings))
    config = PPOConfig.from_settings(settings, missing_eos_penalty=eos["penalty"])
    job = RoundJob(registry=registry, engine=engine, config=config,
                   reward_model=rm, champion=champion, train_prompts=train_prompts, held_prompts=held_prompts,
                   vote_pairs=inputs.vote_pairs, stopped=stopped, crew=crew, resuming=resuming, timer=timer,
                   ends_by=ends_by)
    try:
        return _ppo_gate_publish(ctx, job)
    finally:
        if own_engine:
            engine.shutdown()


def missing_eos_penalty(pairs: list[VotePair], settings: Settings) -> dict[str, Any]:
    """The round's missing-EOS penalty and why (setting ppo_missing_eos_from_votes): the setting's
    value while the decided votes between an ended and a cut-off answer favour the ended one (95%
    Wilson lower bound of its share > 0.5), else 0; a vote with an answer whose end is not known
    (None) counts on neither side. Returns {"penalty", "ended_won", "ended_lost",
    "ended_share_low"}; `ended_*` are absent when the setting is off."""
    if not settings.ppo_missing_eos_from_votes:
        return {"penalty": settings.ppo_missing_eos_penalty}
    gaps = [ended_gap(p.chosen_ended, p.rejected_ended) for p in pairs]
    won, lost = gaps.count(1), gaps.count(-1)
    low = wilson_interval(won, won + lost)[0]
    return {"penalty": settings.ppo_missing_eos_penalty if low > 0.5 else 0.0, "ended_won": won,
            "ended_lost": lost, "ended_share_low": round(low, 4)}


def _refresh(ctx: RoundContext, registry: Registry, serving: str | None, crew: Crew,
             timer: PhaseTimer) -> None:
    """1. reward model: retrained when votes arrived since the current one (its own gate keeps
    the better)."""
    settings = ctx.settings
    ctx.phase("refresh")
    with timer("refresh"):
        current = current_version(settings)
        mark = int(read_manifest(current)["data"]["trained_through_rowid"]) if current else 0
        if new_votes_since(settings, mark) > 0:
            base = registry.path(serving) if serving else settings.model_dir
            config = RewardConfig.from_settings(settings, max_minutes=refresh_minutes(settings))
            result = refresh_reward_model(settings, config, base_model=base,
                                          progress=ctx.options.progress, dist=crew.dist or ONE_PROCESS,
                                          announce=lambda plan: crew.order("refresh", plan))
            ctx.state["reward_refresh"] = {"accepted": result.accepted, "reason": result.reason}


def refresh_minutes(settings: Settings) -> float | None:
    """The refresh's time budget: reward_max_minutes, or round_refresh_share of round_max_minutes if
    that is less; None: none."""
    share = settings.round_max_minutes * settings.round_refresh_share if settings.round_max_minutes else None
    return min(filter(None, (settings.reward_max_minutes, share)), default=None)


def gate_factor(settings: Settings) -> float:
    """How many times the champion's gate answers' seconds (its first stage: trainer/gate_stages.py)
    the gate is expected to take: the mean of round_gate_factor (a prior worth one round) and the
    ratios the latest round_gate_history rounds that gated measured (their `timings`, rounds.jsonl).
    A staged gate takes ~2.3x where its first stage settles the verdict and ~4.9x where it reads on
    (the slow EPYC's loop row of 2026-12-06), so one round's ratio is no forecast of the next's."""
    ratios = [float(t["gate"]) / float(t["gate_champion"])
              for t in (record.get("timings") or {} for record in read_rounds(settings))
              if t.get("gate") and t.get("gate_champion")][:settings.round_gate_history]
    return statistics.fmean([settings.round_gate_factor, *ratios])


def check_prior(settings: Settings) -> float:
    """The longest guard check the latest round whose update ran one measured (its
    `ppo.time_budget`, rounds.jsonl; 0: none), for this update's budget until its own first check."""
    for record in read_rounds(settings):
        seconds = ((record.get("ppo") or {}).get("time_budget") or {}).get("longest_check_s")
        if seconds:
            return float(seconds)
    return 0.0


def _ppo_gate_publish(ctx: RoundContext, job: RoundJob) -> dict[str, Any]:
    """2. train candidate (PPO; skipped when resuming) -> 3. gate -> 4. publish."""
    settings, config = ctx.settings, job.config
    scorer = RewardScorer.load(job.reward_model, settings.reward_max_length, settings.reward_dtype)
    reference, tokenizer, saved_dtype = load_policy(job.registry.path(job.champion))
    base = reference_version(job.registry, job.champion, config)
    models = GateModels(scorer, reference, tokenizer, reference_version=job.champion)
    if base != job.champion:  # ppo_reference=base: the penalty, the guard and the gate read KL to v0
        models.base, models.base_version = load_policy(job.registry.path(base))[0], base
    config.apply_threads()
    # champion's answers to the held-out and the sanity prompts, while the engine still holds its weights
    with job.timer("gate_champion"):
        first = stage_sizes(settings.gate_samples, settings.gate_stages)[0]  # the gate's first stage
        held_ids, held = gate_answers(job.engine, tokenizer, job.held_prompts, settings, config, n=first)
        check = SanityCheck.from_settings(settings)
        champ = ChampionAnswers(held, check, check.answers(job.engine, tokenizer, full=True),
                                job.registry.path(job.champion))
    candidate = ctx.work / "candidate"
    if not job.resuming:
        abandoned = _train_candidate(ctx, job, models, candidate, saved_dtype, champ, held_ids)
        if abandoned is not None:
            return abandoned
    record, verdict = _gate(ctx, job, models, candidate, held_ids, champ)
    return _publish(ctx, job, candidate, record, verdict)


def _train_candidate(ctx: RoundContext, job: RoundJob, models: GateModels, candidate: Path,
                     saved_dtype: torch.dtype, champ: ChampionAnswers,
                     held_ids: list[list[int]]) -> dict[str, Any] | None:
    """2. PPO from the champion on the training prompts, saved to `candidate` (then the "gate" phase).
    Returns the round's record when SIGTERM cut it short, else None."""
    config = job.config
    champion_dir = job.registry.path(job.champion)
    ctx.phase("ppo", iterations_done=0, reward_model=job.reward_model.name)
    policy, _, _ = load_policy(champion_dir)
    kl_reference = models.kl_reference_version
    reference_dir = job.registry.path(kl_reference)

    def on_iteration(st: IterationStats) -> None:
        rec = {"kind": "iteration", "round_id": ctx.round_id, "at": datetime.now(UTC).isoformat(),
               **st.as_dict(), "kl_coef_next": trainer.kl_ctl.value}
        json_line(ctx.events, rec)
        if ctx.options.record_metrics:
            record_iteration_metrics(rec)
        ctx.phase("ppo", iterations_done=st.iteration)

    # DPO learns from the users' own pairs too (trainer/dpo.py)
    votes = job.vote_pairs if config.algorithm == "dpo" and config.dpo_vote_pairs else []
    with job.timer("ppo"):
        job.crew.order("ppo", {"config": config, "champion": champion_dir, "reward_model": job.reward_model,
                               "reference": reference_dir, "prompts": job.train_prompts,
                               "vote_pairs": votes})
        with sync_folder(config.sync_dir) as sync_dir:
            ctx.state["sync_dir"] = str(sync_dir)  # a kill leaves it in /dev/shm: the next start removes it
            ctx.save()
            trainer = policy_trainer(config, policy, models.kl_reference, models.tokenizer, job.engine,
                                     models.scorer, sync_dir, job.crew.dist or ONE_PROCESS, vote_pairs=votes)
            guard = UpdateGuard(champ.check, baseline=champ.sanity,
                                probe=_kl_probe(ctx.settings, models, held_ids))
            budget = None if job.ends_by is None else \
                TimeBudget(job.ends_by - gate_factor(ctx.settings) * job.timer.seconds["gate_champion"],
                           check_prior=check_prior(ctx.settings) if config.sanity_every else 0.0)
            history = run_ppo(config, trainer, job.train_prompts, on_iteration=on_iteration,
                              should_stop=job.stopped, guard=guard, progress=ctx.options.progress,
                              budget=budget)
    if job.stopped():
        return finish(ctx, "abandoned", {"reason": f"SIGTERM after {len(history)} PPO iterations"})
    spent = kl_spent([h.kl for h in history], config.stop_kl, config.stop_kl_window)
    ctx.state["ppo"] = {**_summary(history), "kl_reference": kl_reference,
                        **({"vote_pairs": len(votes)} if votes else {}),
                        **({"kl_budget_spent": spent} if config.stop_kl is not None else {}),
                        **({"sanity_guard": guard.record(config)} if config.sanity_every else {}),
                        **({"time_budget": budget.record()} if budget is not None else {})}
    ctx.state["ppo_config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(config).items()}
    ctx.state["distributed"] = trainer.dist.describe()
    if guard.kept_nothing:
        return finish(ctx, "skipped", {"reason": f"PPO iteration {guard.failed_at} failed the guard's checks "
                                                 "(sanity prompts, KL) before any passed: no candidate"})
    save_policy(policy, models.tokenizer, candidate,
                torch.float32 if ctx.settings.candidate_dtype == "float32" else saved_dtype)
    ctx.phase("gate")
    return None


def _kl_probe(settings: Settings, models: GateModels, held_ids: list[list[int]]) -> KLProbe | None:
    """The guard's KL reading, as the gate's: against the champion (or with ppo_reference=base, v0),
    on its held-out prompts; with ppo_round_kl, what this round may add to its champion's."""
    if not settings.ppo_guard_kl_fraction:
        return None
    limit = settings.ppo_guard_kl_fraction * GateThresholds.from_settings(settings).max_kl  # the gate's unit
    return KLProbe(models.kl_reference, held_ids, settings, limit, round_kl=settings.ppo_round_kl,
                   from_start=models.base is not None)


def reference_version(registry: Registry, champion: str, config: PPOConfig) -> str:
    """The version the round's KL penalty and DPO's log-ratios are measured against
    (`ppo_reference`): the champion, or the root of its lineage (v0 or an imported model)."""
    return registry.lineage(champion)[-1] if config.reference == "base" else champion


def _gate(ctx: RoundContext, job: RoundJob, models: GateModels, candidate: Path, held_ids: list[list[int]],
          champ: ChampionAnswers) -> tuple[dict[str, Any], GateVerdict]:
    """3. the candidate against the champion on the held-out prompts (trainer/gate.py):
    (record, verdict)."""
    with job.timer("gate"):
        # vLLM reads the saved folder itself
        job.timer.seconds["load_candidate"] = job.engine.load_weights(candidate)
        record, verdict = measure_gate(job.engine, candidate, models, job.held_prompts, held_ids, champ,
                                       ctx.settings, job.config, _guards_reading(ctx))
    record["kl_reference"] = models.kl_reference_version
    ctx.state["gate"] = record
    return record, verdict


def _guards_reading(ctx: RoundContext) -> dict[str, Any] | None:
    """The update's guard's KL reading of the candidate's very weights (`UpdateGuard.candidate_kl`),
    which the gate takes as its own: only where the candidate is saved as trained (candidate_dtype
    float32; rounded to the champion's dtype, it is other weights)."""
    if ctx.settings.candidate_dtype != "float32":
        return None
    guard = (ctx.state.get("ppo") or {}).get("sanity_guard") or {}
    reading: dict[str, Any] | None = guard.get("candidate_kl")
    return reading


def _publish(ctx: RoundContext, job: RoundJob, candidate: Path, gate: dict[str, Any],
            verdict: GateVerdict) -> dict[str, Any]:
    """4. the candidate into the registry (rejected=True when the gate failed: kept, never served)
    and its model event."""
    ctx.phase("publish")
    timings = job.timer.seconds
    training = {"round_id": ctx.round_id, "ppo": ctx.state.get("ppo"), "config": ctx.state.get("ppo_config"),
                "reward_refresh": ctx.state.get("reward_refresh"), "timings": timings,
                "missing_eos": ctx.state.get("missing_eos"),
                "rollout_engine": ctx.state.get("rollout_engine"),
                "distributed": ctx.state.get("distributed", {"world_size": 1, "backend": "none"})}
    with job.timer("publish"):
        m = job.registry.publish(candidate, parent=job.champion, who="trainer", why=verdict.reason,
                                 reward_model=job.reward_model.name, training=training, gate=gate,
                                 rejected=not verdict.passed)
    outcome = "published" if verdict.passed else "rejected"
    emit(ctx.settings, "published" if verdict.passed else "rejected", m.version, who="trainer",
         round_id=ctx.round_id, parent=job.champion, gate_passed=verdict.passed, win_rate=verdict.win_rate,
         kl=gate["kl"])
    return finish(ctx, outcome, {"version": m.version, "timings": timings})


def _summary(history: list[IterationStats]) -> dict[str, Any]:
    if not history:
        return {"iterations": 0}
    first, last = history[0], history[-1]
    # one iteration's mean is 16 answers to 16 different prompts (std ~1): compare quarters, not ends
    window = max(1, len(history) // 4)
    return {"iterations": len(history), "reward_window": window,
            "reward_first": sum(h.reward_mean for h in history[:window]) / window,
            "reward_last": sum(h.reward_mean for h in history[-window:]) / window,
            "kl_last": last.kl, "kl_coef_last": last.kl_coef,
            **({"pair_accuracy_last": last.pair_accuracy} if last.pair_accuracy is not None else {}),
            "samples_per_s": sum(h.samples_per_s for h in history) / len(history),
            "seconds": {k: sum(h.seconds.get(k, 0.0) for h in history) for k in first.seconds}}
