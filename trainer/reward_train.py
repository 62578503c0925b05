"""The Bradley–Terry training loop of the reward model: AdamW over the top layers, length-bucketed
micro-batches, early stopping on held-out accuracy, DDP over N ranks.

    config = RewardConfig.from_settings(settings)
    result = train_reward_model(model, tokenizer, train_pairs, held_out_pairs, config)

The model, its loss and config are trainer/reward_model.py; the held-out numbers come from
trainer/reward_eval.py; what a round trains on (the gated refresh) is trainer/reward.py.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainer.distributed import ONE_PROCESS, Dist, wrap_ddp
from trainer.reward_data import (EncodedPair, Pair, collate_pairs, encode_pairs, length_batches,
                                 relevance_pairs)
from trainer.reward_eval import evaluate
from trainer.trunk import TrunkCache, frozen_depth
from trainer.reward_model import (
    RewardConfig,
    RewardForward,
    autocast,
    bradley_terry_loss,
    freeze_lower_layers,
)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    pairs_seen: int
    """Over all ranks."""
    seconds: float
    stopped: str
    """Why training ended: "done", "early stop", "time budget"."""
    best_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    """Held-out accuracy at each evaluation: [{"step", "accuracy", "bt_loss"}]."""
    losses: list[float] = field(default_factory=list)
    """The loss curve: mean Bradley-Terry loss of each optimizer step's pairs (all ranks)."""
    ended_term: dict[str, float] | None = None
    """With config.ended_term: γ at the start and the end, and the pairs with a gap (EndedTerm)."""
    planned_steps: int = 0
    """The epochs' optimizer steps: more than `steps` when stopped early or by the clock."""
    lr_end: float = 0.0
    """The last step's learning rate as a multiple of the peak (LrPlan): near 0 when the decay ran
    its course, as the budget's decay makes it when the clock stops the run."""

    @property
    def pairs_per_s(self) -> float:
        return self.pairs_seen / self.seconds if self.seconds else 0.0

    def record(self) -> dict[str, Any]:
        """What a manifest's metrics.train keeps of the run (a refresh's and `kaizen reward train`'s)."""
        return {"steps": self.steps, "seconds": self.seconds, "pairs_per_s": self.pairs_per_s,
                "stopped": self.stopped, "best_step": self.best_step, "history": self.history,
                "ended_term": self.ended_term, "planned_steps": self.planned_steps,
                "lr_end": round(self.lr_end, 4)}


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.2f} held-out {task.fields[held]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled,
    )


def train_reward_model(
    model: Any, tokenizer: Any, train: Sequence[Pair], held_out: Sequence[Pair], config: RewardConfig,
    *, progress: bool = True, dist: Dist = ONE_PROCESS, clock_from: float | None = None,
) -> TrainResult:
    """Fit `model` to `train` pairs in place; early-stop on accuracy on `held_out`.

    Micro-batches of similar-length pairs (dynamic padding), `grad_accum` of them per AdamW
    step, linear warmup then decay (to 0 when the time budget ends, with `config.budget_decay`:
    LrPlan). Every `eval_every` steps the held-out accuracy is
    measured; the best weights (step 0 included) are restored at the end. With
    `config.relevance_pairs`, `reward_data.relevance_pairs` adds to `train` (never to `held_out`).

    On N ranks (trainer/distributed.py) every rank builds the same micro-batches from the same
    seed; of each step's `grad_accum` micro-batches rank r takes those at positions r, r + N, ...
    and DDP averages the gradients, so a step sees exactly the pairs one process would
    (the global batch is batch_size x grad_accum pairs whatever N is). Held-out scoring is
    sharded too; every rank reaches the same metrics and so the same stop decisions.

    `config.max_minutes` counts from `clock_from` (time.monotonic() on this process; default: now):
    a round's refresh passes its own start, so its model load and the parent's held-out scoring
    come out of the budget too (on the 2-core EPYC they took ~100 s past a 592-s share).
    """
    if not train:
        raise ValueError("train: no pairs to train on")
    train = [*train, *relevance_pairs(train, config.relevance_pairs, config.seed)]
    config.apply_threads()
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    fit = _Fit(model, tokenizer, train, held_out, config, dist)
    if fit.enc_held:
        fit.best = fit.held_out_score(0)
        fit.best_state = fit.snapshot()
    started = fit.started = time.monotonic()
    deadline = (started if clock_from is None else clock_from) + config.max_minutes * 60 \
        if config.max_minutes else math.inf
    model.train()
    fit.optimizer.zero_grad(set_to_none=True)
    with _progress(progress and dist.is_main) as bar:
        task = bar.add_task("reward model", total=fit.plan.planned, loss=float("nan"), acc=float("nan"),
                            held=f"{fit.best[0]:.3f}" if fit.enc_held else "-")
        for _epoch in range(config.epochs):
            fit.epoch(length_batches(fit.enc_train, config.batch_size, rng), bar, task, deadline)
            if fit.stopped != "done":
                break
    return fit.finish(time.monotonic() - started)


class EndedTerm:
    """γ of the step between an answer that ended and one cut off at the vote's max_tokens
    (setting reward_ended_term): a pair is fitted as σ(r₊ − r₋ + γ·gap), gap = ended(chosen) −
    ended(rejected) (Pair.ended_gap), so r need not learn "ended" from what ending correlates with
    (in 64-token votes: being short). The confounder is observed, so it gets its own coefficient,
    as a regression adjusts for a covariate. γ starts at the log-odds that the ended answer won,
    over the decided training pairs with a gap (add-one smoothed), and trains with the model; r
    alone is saved, scored and evaluated."""

    def __init__(self, encoded: Sequence[EncodedPair], device: torch.device) -> None:
        self.won = sum(1 for e in encoded if e.label == 1 and e.ended_gap > 0)
        self.lost = sum(1 for e in encoded if e.label == 1 and e.ended_gap < 0)
        self.start = math.log((self.won + 1) / (self.lost + 1))
        self.gamma = nn.Parameter(torch.tensor(self.start, device=device))

    def offset(self, pairs: Sequence[EncodedPair]) -> torch.Tensor:
        """γ · gap of each pair, (b,)."""
        gaps = torch.tensor([float(e.ended_gap) for e in pairs], device=self.gamma.device)  # (b,)
        return self.gamma * gaps

    def sync(self, dist: Dist) -> None:
        """γ is outside the DDP module: average its gradient over ranks as DDP does the model's."""
        if dist.enabled and self.gamma.grad is not None:
            self.gamma.grad.copy_(dist.all_reduce_sum(self.gamma.grad.detach().clone()) / dist.world_size)

    def describe(self) -> dict[str, float]:
        return {"gamma_start": round(self.start, 4), "gamma": round(float(self.gamma.detach()), 4),
                "ended_won": self.won, "ended_lost": self.lost}


class LrPlan:
    """The learning rate's shape over a run, as a multiple of the peak: a linear warmup over
    `warmup_fraction` of the steps, then a linear decay to 0 at the last step.

    The steps are the epochs' (`planned`). With a time budget and `budget_decay`
    (reward_budget_decay), `replan` sets them before every step to those that fit the time left at
    the run's pace so far (never more than planned), so a run the clock stops ends its decay with
    it instead of being cut at a high rate: the budgeted-training schedule of Li et al. (ICLR
    2020). Off by default: on a round's refresh that the clock cuts hard (14 of 63 planned steps on
    the slow 2-core EPYC) it taught less than the cut schedule: the model is still far from fitted,
    and the lower rates move it less (bench/reward_budget.py)."""

    def __init__(self, planned: int, warmup_fraction: float) -> None:
        self.planned = self.total = planned
        self.warmup_fraction = warmup_fraction

    def factor(self, step: int) -> float:
        """The multiple of the peak rate for optimizer step `step` (0-based)."""
        warmup = max(1, int(self.total * self.warmup_fraction))
        return min((step + 1) / warmup, max(0.0, (self.total - step) / max(1, self.total - warmup)))

    def replan(self, step: int, elapsed: float, left: float, dist: Dist) -> None:
        """Before step `step`: `elapsed` seconds gave `step` steps, `left` remain. The ranks' clocks
        differ: their estimates are averaged, so every rank keeps the same rate."""
        if step == 0 or math.isinf(left):
            return
        fit = torch.tensor([step + max(0.0, left) * step / max(elapsed, 1e-9)])
        mean = float(dist.all_reduce_sum(fit)[0]) / dist.world_size
        self.total = max(step + 1, min(self.planned, int(mean)))


def _optimizer(params: list[nn.Parameter], n_pairs: int, config: RewardConfig,
               ended: EndedTerm | None = None) -> tuple[LrPlan, torch.optim.Optimizer]:
    """(the planned steps' learning-rate plan, AdamW over `params` and γ)."""
    batches_per_epoch = math.ceil(n_pairs / config.batch_size)
    total_steps = max(1, math.ceil(batches_per_epoch / config.grad_accum) * config.epochs)
    groups: list[dict[str, Any]] = [{"params": params, "peak": config.lr}]
    if ended is not None:
        groups.append({"params": [ended.gamma], "lr": config.ended_lr, "peak": config.ended_lr})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.0)
    return LrPlan(total_steps, config.warmup_fraction), optimizer


class _Fit:
    """One `train_reward_model` run: the encoded pairs, the trainable parameters with their
    optimizer, the counters, and the best held-out score with its weights so far."""

    def __init__(self, model: Any, tokenizer: Any, train: Sequence[Pair], held_out: Sequence[Pair],
                 config: RewardConfig, dist: Dist) -> None:
        self.model, self.config, self.dist = model, config, dist
        self.pad_id: int = tokenizer.pad_token_id
        model.to(dist.device)
        self.enc_train = encode_pairs(tokenizer, train, config.max_length)
        self.enc_held = encode_pairs(tokenizer, held_out, config.max_length)
        n_trainable = freeze_lower_layers(model, config.train_layers)
        self.params: list[nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
        self.names: list[str] = [n for n, p in model.named_parameters() if p.requires_grad]
        log.info("reward training: %d pairs (%d cut to %d tokens), %d held out, %.1fM trainable parameters, "
                 "%d process(es)", len(self.enc_train), sum(e.truncated for e in self.enc_train),
                 config.max_length, len(self.enc_held), n_trainable / 1e6, dist.world_size)
        self.forward = wrap_ddp(RewardForward(model), dist)
        depth = frozen_depth(len(model.base_model.layers), config.train_layers)
        self.trunk = (TrunkCache(model, depth, config.trunk_cache_mb << 20)
                      if depth and config.trunk_cache_mb else None)
        self.ended = (EndedTerm(self.enc_train, dist.device)
                      if config.ended_term and any(e.ended_gap for e in self.enc_train) else None)
        self.plan, self.optimizer = _optimizer(self.params, len(self.enc_train), config, self.ended)
        self.lr_factor = 0.0  # of the last step taken
        self.started = time.monotonic()  # the first step's start: train_reward_model sets it
        self.history: list[dict[str, Any]] = []
        self.losses: list[float] = []
        self.best: tuple[float, float] = (-1.0, -math.inf)
        self.best_step = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stale, self.step, self.seen, self.stopped = 0, 0, 0, "done"
        self.run_loss: float | None = None
        self.run_acc: float | None = None

    def held_out_score(self, step: int) -> tuple[float, float]:
        # (accuracy, -BT loss): accuracy decides, the loss breaks its frequent ties
        m = evaluate(self.model, self.enc_held, self.config, self.pad_id, self.dist)
        self.history.append({"step": step, "accuracy": m["accuracy"], "bt_loss": m["bt_loss"]})
        self.model.train()
        return float(m["accuracy"]), -float(m["bt_loss"])

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in zip(self.names, self.params, strict=True)}

    def epoch(self, batches: list[list[int]], bar: Any, task: Any, deadline: float) -> None:
        """One pass over `batches`, `grad_accum` micro-batches per optimizer step; sets `stopped`
        and returns early when patience runs out or the time budget is spent."""
        config, dist = self.config, self.dist
        for first in range(0, len(batches), config.grad_accum):
            if config.budget_decay:
                now = time.monotonic()
                self.plan.replan(self.step, now - self.started, deadline - now, dist)
            self.optimizer_step(batches[first:first + config.grad_accum])
            bar.update(task, completed=self.step, total=self.plan.total, loss=self.run_loss, acc=self.run_acc)
            if self.enc_held and self.step % config.eval_every == 0:
                score = self.held_out_score(self.step)
                bar.update(task, held=f"{score[0]:.3f}")
                if score > self.best:
                    self.best, self.best_step, self.stale = score, self.step, 0
                    self.best_state = self.snapshot()
                else:
                    self.stale += 1
                if dist.any(self.stale >= config.patience):
                    self.stopped = "early stop"
                    return
            if dist.any(time.monotonic() > deadline):  # clocks differ: one rank's deadline stops all
                self.stopped = "time budget"
                return

    def optimizer_step(self, group: Sequence[list[int]]) -> None:
        """One AdamW step over the micro-batches `group`; the running loss and accuracy follow it."""
        step_loss, step_acc, n_pairs = _accumulate(self.forward, group, self.enc_train, self.pad_id,
                                                   self.config, self.dist, self.trunk, self.ended)
        if self.ended is not None:
            self.ended.sync(self.dist)
        self.seen += n_pairs
        self.run_loss = step_loss if self.run_loss is None else 0.9 * self.run_loss + 0.1 * step_loss
        self.run_acc = step_acc if self.run_acc is None else 0.9 * self.run_acc + 0.1 * step_acc
        torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.lr_factor = self.plan.factor(self.step)
        for group_ in self.optimizer.param_groups:
            group_["lr"] = group_["peak"] * self.lr_factor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.append(step_loss)

    def finish(self, seconds: float) -> TrainResult:
        """Measure the last step if it was not, restore the best weights, unfreeze, sum up."""
        model, dist, step = self.model, self.dist, self.step
        if self.enc_held and (not self.history or self.history[-1]["step"] != step):
            score = self.held_out_score(step)
            if score > self.best:
                # the current weights are the best
                self.best, self.best_step, self.best_state = score, step, None
        if self.best_state is not None and self.best_step != step:
            with torch.no_grad():
                for n, p in zip(self.names, self.params, strict=True):
                    p.copy_(self.best_state[n])
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
        seen = int(dist.all_reduce_sum(torch.tensor([float(self.seen)])).item())
        if self.trunk is not None:
            log.info("frozen trunk (%d layers) of the training sequences: %d passes from the cache, %d run, "
                     "%.0f MB kept", self.trunk.depth, self.trunk.hits, self.trunk.misses, self.trunk.bytes / 2**20)
        log.info("reward training %s after %d of %d steps (%.0f s, %.2f pairs/s, last lr x%.2f); best held-out "
                 "step %d", self.stopped, step, self.plan.planned, seconds, seen / seconds if seconds else 0.0,
                 self.lr_factor, self.best_step)
        return TrainResult(step, seen, seconds, self.stopped, self.best_step if self.enc_held else step,
                           self.history, self.losses, self.ended.describe() if self.ended else None,
                           self.plan.planned, self.lr_factor)


def _accumulate(forward: nn.Module, group: Sequence[list[int]], encoded: Sequence[EncodedPair], pad_id: int,
                config: RewardConfig, dist: Dist, trunk: TrunkCache | None = None,
                ended: EndedTerm | None = None) -> tuple[float, float, int]:
    """Forward and backward of this rank's micro-batches of one optimizer step (with `trunk`, the
    frozen lower layers' output comes from the cache: trainer/trunk.py; with `ended`, the loss reads
    r₊ − r₋ + γ·gap, the accuracy r alone).

    Each micro-batch's loss is weighted N / len(group): DDP averages over the N ranks, so the
    gradient is the mean over the step's micro-batches, as with one process. A rank with no
    micro-batch in a short last group runs one with weight 0, so the all-reduce meets every
    rank. Returns (the step's mean loss and accuracy over all ranks, pairs this rank trained on).
    """
    mine = list(range(dist.rank, len(group), dist.world_size))
    work = [(j, 1.0) for j in mine] or [(0, 0.0)]
    scale = dist.world_size / len(group)
    sums = torch.zeros(2)  # loss, accuracy: sums over this rank's micro-batches, / len(group)
    pairs = 0
    device = dist.device
    for k, (j, weight) in enumerate(work):
        sync = k == len(work) - 1 or not dist.enabled
        with contextlib.nullcontext() if sync else forward.no_sync():  # type: ignore[operator]
            ids, mask = collate_pairs([encoded[x] for x in group[j]], pad_id)  # (2b, T)
            with autocast(config, device):
                states = None if trunk is None else trunk.batch(
                    [(x, side) for side in (0, 1) for x in group[j]], ids.to(device), mask.to(device))
                rewards = forward(ids, mask, states, trunk.depth if trunk else 0)  # (2b,)
            chosen_rewards, rejected_rewards = rewards.chunk(2)  # (b,), (b,)
            labels = torch.tensor([encoded[x].label for x in group[j]], device=rewards.device)  # (b,)
            fitted = chosen_rewards if ended is None else \
                chosen_rewards.float() + ended.offset([encoded[x] for x in group[j]])
            loss = bradley_terry_loss(fitted, rejected_rewards, config.margin, labels,
                                      torch.where(labels == 1, 1.0, config.tie_weight))
            (loss * (weight * scale)).backward()  # type: ignore[no-untyped-call]
        if weight:
            pairs += len(group[j])
            decided = labels == 1  # a tie has no right answer
            acc = (chosen_rewards[decided] > rejected_rewards[decided]).float().mean() if decided.any() \
                else torch.tensor(0.5)
            sums += torch.stack([loss.detach().float().cpu(), acc.cpu()]) / len(group)
    sums = dist.all_reduce_sum(sums)
    return float(sums[0]), float(sums[1]), pairs
