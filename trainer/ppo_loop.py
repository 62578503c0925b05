"""The policy update's loop: `run_ppo` runs a trainer's iterations (trainer/ppo.py, trainer/dpo.py,
trainer/raft.py) and decides, between iterations, when a round's update is done:

  * SIGTERM on any rank (`should_stop`): the round is abandoned;
  * the KL budget is spent (`ppo_stop_kl`, `ppo_math.kl_spent`);
  * a check of the gate's failed (`UpdateGuard`, every `ppo_sanity_every` iterations): the policy
    lost a sanity prompt, or drifted past the KL the gate accepts; the weights go back to the last
    check that passed, and those are the round's candidate;
  * the round's time is up (`TimeBudget`, setting round_max_minutes): another iteration would end
    too late to leave the gate its time.

An update that stops between the guard's checks (KL spent, time up) has its last weights checked
as the last iteration's are, so the candidate the gate reads has always passed the guard.

The gate (trainer/gate.py) runs the same sanity check (trainer/sanity.py) and the same KL reading
on the finished candidate (the KL it takes from the guard, `UpdateGuard.candidate_kl`, where the
guard's last check read the very weights the gate loads); the guard runs them during the update,
on the rollout engine that already holds each iteration's weights, so a round whose policy loses
what the champion knew, or moves too far, late still hands the gate the last weights that passed,
instead of spending the gate on a candidate it must refuse. The KL matters most: a round's
rollouts read the KL at their own length (64 tokens), the gate at the service's (256), and the two
drift apart late in a round (the thirty-sixth and thirty-eighth loop rows: gate win rates 0.742
and 0.775, both refused for KL 3.49 and 3.63 > 3.0; 2.90 at the rollouts' length).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kaizen.core.settings import Settings
from trainer.gate import checked_kl, read_kl
from trainer.policy import PolicyWithValue
from trainer.ppo import IterationStats, Messages, PPOTrainer
from trainer.ppo_config import PPOConfig
from trainer.ppo_math import kl_spent
from trainer.sanity import SanityCheck

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KLProbe:
    """The gate's KL reading (trainer/gate.py, `read_kl`: its held-out prompts and seeds, at
    gate_kl_max_tokens) of the policy the engine holds, against the gate's reference (the champion, or
    v0 with ppo_reference=base), in the gate's unit (`checked_kl`: nats per answer, or per token with
    gate_max_kl_per_token)."""

    reference: PolicyWithValue
    held_ids: list[list[int]]
    settings: Settings
    max_kl: float
    """The most the guard keeps: ppo_guard_kl_fraction x gate_max_kl (or x gate_max_kl_per_token)."""
    round_kl: float | None = None
    """The most KL to the reference a round may add (ppo_round_kl): the guard then keeps the last
    weights under min(max_kl, the starting weights' KL + round_kl). None: max_kl alone."""
    from_start: bool = False
    """Whether the round's starting weights differ from the reference (ppo_reference=base from a
    later version): their KL is read before the first iteration; else it is 0."""

    def read(self, trainer: PPOTrainer, config: PPOConfig) -> dict[str, Any]:
        """`read_kl`'s record of the engine's weights; the guard bounds its `checked_kl`."""
        assert trainer.engine is not None
        kl = read_kl(trainer.engine, trainer.policy, self.reference, trainer.tokenizer, self.held_ids,
                     self.settings, config)
        trainer.policy.train()  # read_kl reads in eval mode; the update trains
        return kl


@dataclass
class UpdateGuard:
    """The gate's checks that need no reward model, every `config.sanity_every` iterations and after
    the last (0: never), on rank 0's engine: the sanity check (trainer/sanity.py) against the round's
    starting weights and, with a `probe`, the KL to the reference as the gate reads it.

    Every rank keeps a copy of its trained parameters at the last check that passed (iteration 0:
    the starting weights) and puts it back when a check fails, so all ranks stop on the same weights.
    The other ranks hold no engine, no check and no probe: they join rank 0's verdict.
    """

    check: SanityCheck | None = None
    baseline: list[dict[str, Any]] | None = None
    """The starting weights' answers (`SanityCheck.answers`); None: read at `start`."""
    probe: KLProbe | None = None
    good: list[torch.Tensor] = field(default_factory=list)
    good_iteration: int = 0
    """The iteration whose weights the last passing check saw (0: the starting weights)."""
    failed_at: int | None = None
    failed: list[dict[str, Any]] = field(default_factory=list)
    """The prompts that broke at `failed_at`, with their shares and a few answers (rank 0)."""
    kept_fraction: float = 0.0
    """The fraction of the failing step (from good_iteration's weights to failed_at's) that the
    candidate keeps, after `guard_halvings` halvings; 0: none, the weights are good_iteration's."""
    readings: dict[float, dict[str, Any]] = field(default_factory=dict)
    """The probe's record (`read_kl`) at each check, by iteration, and at each halving, by the step's
    fraction (rank 0)."""
    read_now: float | None = None
    """The key in `readings` of the weights the policy holds now; None: moved since the last check."""
    start_kl: float = 0.0
    """The starting weights' KL to the probe's reference, with a `round_kl` (rank 0)."""

    @property
    def max_kl(self) -> float:
        """The KL the guard keeps the weights under: the probe's max_kl, or less with its round_kl."""
        assert self.probe is not None
        if self.probe.round_kl is None:
            return self.probe.max_kl
        return min(self.probe.max_kl, self.start_kl + self.probe.round_kl)

    def answers(self, trainer: PPOTrainer) -> list[dict[str, Any]]:
        """The check's reference reading of the engine's weights (rank 0; the other ranks answer [])."""
        if trainer.engine is None or self.check is None:
            return []
        return self.check.answers(trainer.engine, trainer.tokenizer, full=True)

    def failing(self, trainer: PPOTrainer) -> list[dict[str, Any]]:
        """The prompts whose share fell more than the check's max_drop below the baseline's (read
        sequentially, `SanityCheck.read`; rank 0, the other ranks answer [])."""
        if trainer.engine is None or self.check is None or not self.check.items:
            return []
        return self.check.read(trainer.engine, trainer.tokenizer, self.baseline or [])[1]

    def start(self, trainer: PPOTrainer, config: PPOConfig) -> None:
        """Before the first iteration: the starting weights' answers (unless given), their KL to the
        probe's reference where a round_kl counts from it, and their copy."""
        if config.sanity_every:
            if self.baseline is None:
                self.baseline = self.answers(trainer)
            probe = self.probe
            if probe and probe.round_kl is not None and probe.from_start and trainer.engine is not None:
                self.start_kl = checked_kl(probe.read(trainer, config), probe.settings)
                log.info("ppo: the starting weights' KL %.2f; this round keeps the policy under %.2f",
                         self.start_kl, self.max_kl)
            self._keep(trainer, 0)

    @staticmethod
    def due(config: PPOConfig, iteration: int, last: bool = False) -> bool:
        """Whether the checks run after `iteration`: every `sanity_every`-th, and the update's last
        (`config.iterations`, or `last`: the update stops there for another reason)."""
        every = config.sanity_every
        return bool(every) and (iteration % every == 0 or iteration == config.iterations or last)

    def after(self, trainer: PPOTrainer, config: PPOConfig, iteration: int, last: bool = False) -> bool:
        """After `iteration` (its weights synced to the engine): True when a check failed (the update
        must stop there). The weights are then the failing step halved toward the last good ones, as
        far as `config.guard_halvings` allows, where that passes the checks; else the last good ones.
        `last`: the update stops after this iteration anyway (checked then, whatever sanity_every says)."""
        if not self.due(config, iteration, last):
            self.read_now = None
            return False
        broke, too_far = self._verdict(trainer, config, iteration)
        if not trainer.dist.any(bool(broke) or too_far):
            self._keep(trainer, iteration)
            self.read_now = iteration
            return False
        self.failed_at, self.failed = iteration, broke
        why = [f"sanity prompt {f['prompt']!r}: share of matching answers {f['reference_share']:.2f} -> "
               f"{f['share']:.2f}" for f in broke] + ([self._kl_text(iteration)] if too_far else [])
        log.warning("ppo: iteration %d failed the guard's checks (%s)", iteration,
                    "; ".join(why) or "on another rank")
        for halving in range(1, config.guard_halvings + 1):
            fraction = 0.5 ** halving
            self._toward_good(trainer, 0.5)  # good + fraction x the failing step
            trainer.sync()
            broke, too_far = self._verdict(trainer, config, fraction)
            if not trainer.dist.any(bool(broke) or too_far):
                self.kept_fraction, self.read_now = fraction, fraction
                log.warning("ppo: kept iteration %d's weights plus %.3g of the step to iteration %d (%s)",
                            self.good_iteration, fraction, iteration, self._kl_text(fraction))
                return True
        self._toward_good(trainer, 0.0)
        self.read_now = self.good_iteration or None
        log.warning("ppo: back to iteration %d's weights", self.good_iteration)
        return True

    @property
    def kept_nothing(self) -> bool:
        """A check failed before any passed and no part of the step was kept: no candidate."""
        return self.failed_at is not None and self.good_iteration == 0 and not self.kept_fraction

    @property
    def kls(self) -> dict[float, float]:
        """The KL the guard bounds (`checked_kl`) at each check, keyed as `readings`."""
        if self.probe is None:
            return {}
        return {at: checked_kl(r, self.probe.settings) for at, r in self.readings.items()}

    @property
    def candidate_kl(self) -> dict[str, Any] | None:
        """The probe's record of the weights the policy holds now, when a check read these very weights
        (rank 0): at the end of an update, the candidate's KL as the gate would read it again."""
        return self.readings.get(self.read_now) if self.read_now else None

    def record(self, config: PPOConfig) -> dict[str, Any]:
        """What the round's record keeps (`ppo.sanity_guard`): with a halved step, its `kept_fraction`
        (the candidate is kept_iteration's weights plus that fraction of the step to failed_at)."""
        probe = self.probe
        kl = ({"kl": {_key(i): k for i, k in self.kls.items()}, "max_kl": self.max_kl} if probe else {})
        if probe is not None and probe.round_kl is not None:
            kl |= {"round_kl": probe.round_kl, "start_kl": self.start_kl}
        failed = {"failed": self.failed} if self.failed else {}
        kept = {"kept_fraction": self.kept_fraction} if self.kept_fraction else {}
        read = {"candidate_kl": self.candidate_kl} if self.candidate_kl else {}
        return {"every": config.sanity_every, "failed_at": self.failed_at,
                "kept_iteration": self.good_iteration, **kept, **failed, **kl, **read}

    def _verdict(self, trainer: PPOTrainer, config: PPOConfig,
                 at: float) -> tuple[list[dict[str, Any]], bool]:
        """(the broken sanity prompts, whether the KL is past the limit) of the engine's weights; the
        KL is kept under `at` (an iteration, or the fraction of a failing step a halving tries)."""
        broke = self.failing(trainer)
        if self.probe is None or trainer.engine is None:
            return broke, False
        self.readings[at] = self.probe.read(trainer, config)
        log.info("ppo: check at %s: %s, sanity prompts %s", _key(at), self._kl_text(at),
                 "broken" if broke else "kept")
        return broke, self.kls[at] > self.max_kl

    def _kl_text(self, at: float) -> str:
        if self.probe is None or at not in self.kls:
            return "KL not read on this rank"
        return f"KL {self.kls[at]:.2f} against {self.max_kl:.2f}"

    def _trained(self, trainer: PPOTrainer) -> list[torch.nn.Parameter]:
        return [p for p in trainer.policy.parameters() if p.requires_grad]

    @torch.no_grad()
    def _toward_good(self, trainer: PPOTrainer, keep: float) -> None:
        """Each trained parameter p <- good + keep x (p - good): 0.5 halves the step from the last good
        weights, 0 puts them back (a copy: a step gone to inf or NaN times 0 is not 0)."""
        for p, saved in zip(self._trained(trainer), self.good, strict=True):
            if keep:
                p.sub_(saved).mul_(keep).add_(saved)
            else:
                p.copy_(saved)

    def _keep(self, trainer: PPOTrainer, iteration: int) -> None:
        self.good = [p.detach().clone() for p in self._trained(trainer)]
        self.good_iteration = iteration


def _key(at: float) -> str:
    """A check's name in the record: its iteration ("20"), or the failing step's fraction ("x0.5")."""
    return str(int(at)) if at >= 1 else f"x{at:g}"


@dataclass
class TimeBudget:
    """When a round's policy update must end (monotonic seconds; setting round_max_minutes, the gate's
    time taken off): another iteration starts only if one as long as the longest so far, plus a
    guard check as long as the longest so far (the one that follows the last iteration), still ends
    by then. The first iteration always runs; before the first check its length is `check_prior`
    (the previous round's, or 0: not known), so the room is read again after each check: one that
    leaves none is the update's last.
    `clock`: the seconds it counts in (time.monotonic; a test's clock can make a check slow)."""

    ends_at: float
    steps: list[float] = field(default_factory=list)
    """Seconds of each iteration's step (rollout, scoring, training, weight sync)."""
    checks: list[float] = field(default_factory=list)
    """Seconds of each of the guard's checks."""
    check_prior: float = 0.0
    """A check's seconds until this update has measured one (the latest round's longest)."""
    spent: bool = False
    """The update stopped here: another iteration would not have fitted."""
    clock: Callable[[], float] = time.monotonic
    started: float = field(init=False)
    """When it was made, by `clock`."""

    def __post_init__(self) -> None:
        self.started = self.clock()

    def room_for_another(self) -> bool:
        need = max(self.steps, default=0.0) + max(self.checks, default=self.check_prior)
        return self.clock() + need <= self.ends_at

    def record(self) -> dict[str, Any]:
        """What the round's record keeps (`ppo.time_budget`)."""
        prior = {"check_prior_s": round(self.check_prior, 1)} if self.check_prior else {}
        return {"seconds": round(self.ends_at - self.started, 1), "stopped_the_update": self.spent,
                "longest_iteration_s": round(max(self.steps, default=0.0), 1),
                "longest_check_s": round(max(self.checks, default=0.0), 1), **prior}


def run_ppo(config: PPOConfig, trainer: PPOTrainer, prompts: Sequence[Messages], *,
            on_iteration: Callable[[IterationStats], None] | None = None,
            should_stop: Callable[[], bool] | None = None, guard: UpdateGuard | None = None,
            progress: bool = False, budget: TimeBudget | None = None) -> list[IterationStats]:
    """`config.iterations` iterations, each on `prompts_per_iteration` prompts drawn from `prompts`
    (shuffled, cycling; batch_size answers in all). Stops early, between iterations, when
    `should_stop()` says so, the KL budget is spent (`kl_spent`, setting ppo_stop_kl), `guard`
    found a broken sanity prompt (the policy is then back on the last good weights) or `budget` has
    no room for another iteration (rank 0's; the other ranks pass None and join its decision)."""
    if not prompts:
        raise ValueError("prompts: PPO needs at least one prompt")
    order: list[int] = []
    history: list[IterationStats] = []
    if guard is not None:
        guard.start(trainer, config)
    clock = budget.clock if budget is not None else time.monotonic
    with _progress(progress and trainer.dist.is_main) as bar:
        task = bar.add_task("PPO", total=config.iterations, reward=float("nan"), kl=float("nan"))
        for _ in range(config.iterations):
            if trainer.dist.any(should_stop is not None and should_stop()):  # SIGTERM on any rank stops all
                break
            while len(order) < config.prompts_per_iteration:  # the rest of this pass, then new ones
                fresh = list(range(len(prompts)))
                trainer.rng.shuffle(fresh)
                order = fresh + order
            started = clock()
            stats = trainer.step([prompts[order.pop()] for _ in range(config.prompts_per_iteration)])
            history.append(stats)
            log.info("ppo iteration %d: reward %.3f kl %.3f beta %.4f clipfrac %.3f %.1f samples/s, %.1f "
                     "tokens, length slope %.4f", stats.iteration, stats.reward_mean, stats.kl, stats.kl_coef,
                     stats.clipfrac, stats.samples_per_s, stats.answer_tokens, trainer.length_fit.slope)
            if on_iteration is not None:
                on_iteration(stats)
            bar.update(task, advance=1, reward=stats.reward_mean, kl=stats.kl)
            if _stops_after(config, trainer, history, guard, budget, clock() - started):
                break
    return history


def _stops_after(config: PPOConfig, trainer: PPOTrainer, history: list[IterationStats],
                 guard: UpdateGuard | None, budget: TimeBudget | None, step_s: float) -> bool:
    """After an iteration: whether the update stops here (the KL budget spent, no time for another,
    or a check failed), the guard's checks run on the weights it stops on. Every rank decides alike.
    A periodic check leaves less time than was there when it was due (its length not known before the
    first): where it leaves no room for another iteration and the check after it, the update stops on
    the weights it has just read."""
    n = len(history)
    spent = trainer.dist.any(kl_spent([h.kl for h in history], config.stop_kl, config.stop_kl_window))
    if budget is not None:
        budget.steps.append(step_s)

    def out_of_time() -> bool:
        return n < config.iterations and trainer.dist.any(budget is not None
                                                          and not budget.room_for_another())

    late = out_of_time()
    if guard is not None:
        started = budget.clock() if budget is not None else 0.0
        checked = guard.due(config, n, spent or late)
        if guard.after(trainer, config, n, last=spent or late):
            return True
        if checked:
            if budget is not None:
                budget.checks.append(budget.clock() - started)
            late = late or out_of_time()
    if spent:
        log.info("ppo: KL budget %.2f spent after %d iterations", config.stop_kl, n)
    if late:
        log.info("ppo: the round's time budget has no room for iteration %d", n + 1)
        if budget is not None:
            budget.spent = True
    return spent or late


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("reward {task.fields[reward]:+.3f} KL {task.fields[kl]:.3f}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled)
