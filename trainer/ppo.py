"""PPO for a chat policy against the reward model, rollouts on vLLM.

    python -m trainer.rounds          # a training round runs this (see trainer/rounds.py)
    python bench/ppo.py               # one iteration timed against TRL's PPO trainer

One iteration, in paper order (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences"; Ouyang et al. 2022, InstructGPT; Huang et al. 2024, "The N+ Implementation
Details of RLHF with PPO"):

  1. rollout: sample one answer per prompt from the current policy on a vLLM engine;
  2. score: the reward model reads prompt + answer; answers that never end are penalised;
  3. recompute log-probs of the sampled tokens with the training model (policy and frozen
     reference) and the value head's estimates; sampling and training never disagree on
     which weights produced a log-prob;
  4. per-token reward = -β·KL_t, plus the score at the answer's last token;
  5. advantages by GAE (γ, λ), whitened; returns = advantages + values;
  6. `epochs` passes of clipped policy loss + clipped value loss;
  7. adapt β toward the target KL; write the weights where vLLM reloads them.

The value head sits on the policy's own last hidden state (one forward gives logits and
values), a shared-trunk design (Stiennon et al. 2020 used a separate value network; TRL's
PPO trainer does too, which costs a second model's forward and backward per step).

Where things are: the hyperparameters (PPOConfig, from the `ppo_*` settings) in trainer/ppo_config.py;
the math (losses, GAE, RLOO, KL estimates, whitening) in trainer/ppo_math.py; the policy and reward models,
batches and log-probs in trainer/policy.py; the vLLM engine and the weight sync in trainer/rollout_engine.py;
the phase timer in trainer/timing.py; the loop of iterations and when it stops (`run_ppo`) in
trainer/ppo_loop.py. Here: one iteration (`PPOTrainer.step`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.distributed import ONE_PROCESS, Dist, wrap_ddp
from trainer.policy import (Batch, PolicyWithValue, RewardScorer, collate_answers, encode_prompt,
                            freeze_lower_layers, sequence_logprobs, shared_trunk_depth)
from trainer.ppo_config import PPOConfig
from trainer.ppo_math import (AdaptiveKLController, LengthFit, entropy_from_logits, explained_variance, gae,
                              kl_per_token, logprobs_from_logits, masked_mean, masked_whiten,
                              policy_loss, rloo_advantages, shaped_rewards, value_loss)
from trainer.reward_model import autocast_to
from trainer.rollout_engine import RolloutEngine, Sample, sync_weights
from trainer.timing import PhaseTimer

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


# -- one iteration's numbers -------------------------------------------------------------------------


@dataclass
class IterationStats:
    iteration: int
    reward_mean: float
    reward_std: float
    score_mean: float
    """Reward-model score before the EOS penalty and KL (normalised units)."""
    kl: float
    """Mean over answers of Σ_t k1: nats per answer."""
    kl_coef: float
    pg_loss: float
    vf_loss: float
    clipfrac: float
    approx_kl: float
    entropy: float
    explained_variance: float
    ended_share: float
    answer_tokens: float
    tokens_per_s: float
    samples_per_s: float
    seconds: dict[str, float] = field(default_factory=dict)
    """Time split: rollout, scoring (RM + log-probs of policy and reference), training, sync."""
    pair_accuracy: float | None = None
    """DPO (trainer/dpo.py) only, where pg_loss is the DPO loss: the share of pairs whose implicit
    rewards the policy orders as labelled, mean over the update's steps."""
    dpo_margin: float | None = None
    """DPO only: the mean implicit-reward margin β((log π - log π_ref)(chosen) - (...)(rejected))."""
    best_reward: float | None = None  # RAFT only (pg_loss is its NLL): mean reward of the answers trained on

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Scored:
    """A scored rollout batch: reward-model scores, old log-probs and values, KL to the reference.

    Every tensor covers the whole batch on every rank; `own` are the rows this rank scored (and
    trains on) and `trunk` their frozen lower layers' hidden states (None when none are shared)."""

    batch: Batch
    scores: torch.Tensor  # (B,) reward-model scores
    penalised: torch.Tensor  # (B,) after the missing-EOS penalty
    ended: torch.Tensor  # (B,)
    old_logprobs: torch.Tensor  # (B, R)
    old_values: torch.Tensor  # (B, R) zeros under RLOO and DPO (no value head)
    ref_logprobs: torch.Tensor  # (B, R)
    kl: torch.Tensor  # (B, R) per-token k1 to the reference
    groups: torch.Tensor  # (B,) the prompt each answer is for
    own: torch.Tensor  # (b,) row indices
    trunk: torch.Tensor | None  # (b, S, H)


@dataclass
class Advantages:
    """What the update regresses on: per-token advantages and (PPO) value targets."""

    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor  # (B, R) zeros under RLOO


@dataclass
class PPOTrainer:
    """State of one PPO run: policy, frozen reference, optimizer, KL controller, engine.

    One iteration (`step`) reads rollout -> score -> advantages -> update -> sync. On N ranks
    (trainer/distributed.py) rank 0 holds the engine and broadcasts the rollouts; each rank
    scores every N-th row (reward model, policy and reference log-probs, values) and a sum
    over ranks completes the batch, so advantages and the KL controller are the same
    everywhere; each minibatch is split by those rows and DDP averages the gradients, weighted
    so that N ranks take the step one process would.
    """

    config: PPOConfig
    policy: PolicyWithValue
    reference: PolicyWithValue
    tokenizer: Any
    engine: RolloutEngine | None
    """None on every rank but rank 0."""
    scorer: RewardScorer
    sync_dir: Path | None
    dist: Dist = ONE_PROCESS
    kl_ctl: AdaptiveKLController = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)
    rng: random.Random = field(init=False)
    iteration: int = 0
    trunk_depth: int = field(init=False)
    """Lower layers shared by policy and reference and frozen: run once per batch."""
    model: nn.Module = field(init=False)
    """The policy as trained: wrapped in DistributedDataParallel on several ranks."""
    compute_dtype: torch.dtype = field(init=False)
    """The autocast dtype of every policy and reference pass (`ppo_dtype` for this hardware)."""
    length_fit: LengthFit = field(default_factory=LengthFit)

    def __post_init__(self) -> None:
        c = self.config
        if c.batch_size < self.dist.world_size:
            raise ValueError(f"ppo batch_size {c.batch_size} is smaller than the {self.dist.world_size} "
                             "training processes: every rank needs at least one rollout")
        c.apply_threads()
        self.compute_dtype = c.resolved_dtype()
        torch.manual_seed(c.seed)
        self.rng = random.Random(c.seed)
        self.kl_ctl = AdaptiveKLController(c.kl_coef, c.target_kl, c.kl_horizon, fixed=not c.adaptive_kl)
        device = self.dist.device
        self.policy.to(device)
        self.reference.to(device)
        self.scorer.model.to(device)
        self.reference.eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        freeze_lower_layers(self.policy, c.train_layers)
        if not c.value_head:
            self.policy.v_head.requires_grad_(False)  # unused: DDP must not wait for its gradient
        self.trunk_depth = shared_trunk_depth(self.policy, self.reference)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=c.lr, eps=1e-5, weight_decay=0.0)
        self.model = wrap_ddp(self.policy, self.dist)

    def step(self, prompts: Sequence[Messages]) -> IterationStats:
        """One PPO iteration on `prompts` (one answer each); the engine then holds the new weights."""
        c, timer = self.config, PhaseTimer()
        prompt_ids = [encode_prompt(self.tokenizer, m, c.max_prompt_length) for m in prompts]
        with timer("rollout"):
            samples = self.rollout(prompt_ids)
        with timer("scoring"):  # the advantages are cheap: timed with the scoring they follow
            scored = self.score(prompts, prompt_ids, samples)
            adv = self.advantages(scored)
        with timer("training"):
            losses = self.update(scored, adv)
        with timer("sync"):
            sync = self.sync()
        return self._finish_iteration(scored, adv, losses, timer.seconds, sync)

    def _finish_iteration(self, scored: Scored, adv: Advantages, losses: dict[str, float],
                          phases: dict[str, float], sync: dict[str, float]) -> IterationStats:
        """Adapt β to this batch's KL (Ziegler et al. 2019, sec. 2.2) and gather the iteration's stats."""
        mean_kl = self.answer_kl(scored)  # nats per answer
        kl_coef_used = self.kl_ctl.value
        B = len(scored.penalised)
        self.kl_ctl.update(mean_kl, B)
        seconds = {**phases, "sync_save": sync["save_s"], "sync_reload": sync["reload_s"]}
        total = seconds["total"] = sum(phases.values())
        tokens = float(scored.batch.response_mask.sum())
        self.iteration += 1
        return IterationStats(
            iteration=self.iteration, reward_mean=float(scored.penalised.mean()),
            reward_std=float(scored.penalised.std()) if B > 1 else 0.0,
            score_mean=float(scored.scores.mean()),
            kl=mean_kl, kl_coef=kl_coef_used, **losses,
            explained_variance=explained_variance(scored.old_values, adv.returns, scored.batch.response_mask),
            ended_share=float(scored.ended.mean()), answer_tokens=tokens / B, tokens_per_s=tokens / total,
            samples_per_s=B / total, seconds=seconds,
        )

    def rollout(self, prompt_ids: Sequence[list[int]]) -> list[Sample]:
        """One sampled answer per prompt from the engine (rank 0), the same list on every rank."""
        c = self.config
        samples = None
        if self.dist.is_main and self.engine is None:
            raise RuntimeError("rank 0 samples the rollouts and has no engine")
        if self.engine is not None:
            samples = self.engine.generate(prompt_ids, max_tokens=c.response_length,
                                           temperature=c.temperature, n=c.answers_per_prompt,
                                           seed=self.rollout_seed(self.iteration))
        out: list[Sample] = self.dist.broadcast(samples)
        return out

    def rollout_seed(self, iteration: int) -> int:
        """The engine's seed of `iteration`'s rollout (each request adds its index)."""
        return (self.config.seed * 1_000 + iteration) * 100_003

    def own_rows(self, B: int) -> torch.Tensor:
        """The rows of a B-answer batch this rank scores and trains on: every N-th."""
        return torch.arange(self.dist.rank, B, self.dist.world_size)

    @torch.no_grad()
    def score(self, prompts: Sequence[Messages], prompt_ids: Sequence[list[int]],
              samples: Sequence[Sample]) -> Scored:
        """Reward-model scores (less the missing-EOS penalty), old log-probs and values, KL to the
        reference."""
        c, dist = self.config, self.dist
        batch = collate_answers(self.tokenizer, prompt_ids, samples).to(dist.device)
        B, R = batch.response_mask.shape
        own = self.own_rows(B)  # (b,) this rank's rows
        mine = batch.rows(own.to(dist.device))
        self.policy.eval()
        depth = self.trunk_depth
        scores = self.scorer([prompts[samples[i].prompt] for i in own.tolist()],
                             [samples[i].text for i in own.tolist()]).to(dist.device)  # (b,)
        with autocast_to(self.compute_dtype, self.dist.device):
            # the frozen lower layers, once: the same for policy, reference and every minibatch pass
            trunk = (self.policy.trunk(mine.input_ids, mine.attention_mask, depth)  # (b, S, H)
                     if depth else None)
            logprobs, values = sequence_logprobs(self.policy, mine, c.temperature, trunk=trunk, depth=depth)
            ref_logprobs, _ = sequence_logprobs(self.reference, mine, c.temperature, with_values=False,
                                                trunk=trunk, depth=depth)
        assert values is not None
        full = torch.zeros(B, 1 + 3 * R, device=dist.device)  # each row filled by the one rank that owns it
        full[own.to(dist.device)] = torch.cat([scores[:, None], logprobs, values, ref_logprobs], dim=1)
        full = dist.all_reduce_sum(full)
        scores, old_logprobs = full[:, 0], full[:, 1:1 + R]
        old_values, ref_logprobs = full[:, 1 + R:1 + 2 * R], full[:, 1 + 2 * R:]
        if not c.value_head:
            old_values = torch.zeros_like(old_values)  # RLOO's baseline is the siblings; DPO needs none
        penalised, ended = self.penalise(scores, batch, samples)
        kl = kl_per_token(old_logprobs, ref_logprobs, "k1") * batch.response_mask  # (B, R)
        groups = torch.tensor([s.prompt for s in samples], device=dist.device)  # (B,)
        return Scored(batch, scores, penalised, ended, old_logprobs, old_values, ref_logprobs, kl, groups,
                      own, trunk)

    def penalise(self, scores: torch.Tensor, batch: Batch, samples: Sequence[Sample]) -> tuple[Any, Any]:
        """(penalised, ended), (B,) each: the scores less the reward model's slope on length (its
        `length_neutral` share, ppo_math.LengthFit), less the missing-EOS penalty (Huang et al. 2024)."""
        ended = torch.tensor([s.finished for s in samples], dtype=torch.float32, device=scores.device)  # (B,)
        lengths = batch.response_mask.sum(-1).float()  # (B,) answer tokens
        if self.config.length_neutral:
            self.length_fit.add(lengths, scores, ended)
        neutral = self.length_fit.neutral(scores, lengths, self.config.length_neutral)
        return neutral - self.config.missing_eos_penalty * (1 - ended), ended

    def answer_kl(self, sc: Scored) -> float:  # nats per answer: the mean over answers of Σ_t k1
        return float(sc.kl.sum(-1).mean())

    @torch.no_grad()
    def advantages(self, sc: Scored) -> Advantages:
        """PPO: KL-shaped per-token rewards, GAE, whitened (TRL/OpenRLHF); RLOO: R(x, y) - β KL per
        answer, minus the mean of its siblings' (the answers to the same prompt), on every token."""
        c, mask = self.config, sc.batch.response_mask  # (B, R)
        if c.algorithm == "rloo":
            reward = sc.penalised - self.kl_ctl.value * sc.kl.sum(-1)  # (B,) R(x, y) - β KL (TRL's RLOO)
            # (B, R): each token its answer's advantage
            advantages = rloo_advantages(reward, sc.groups)[:, None] * mask
            return Advantages(advantages, torch.zeros_like(sc.old_values))
        rewards, _ = shaped_rewards(sc.penalised, sc.old_logprobs, sc.ref_logprobs, mask, self.kl_ctl.value)
        if c.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(sc.old_values, rewards, mask, c.gamma, c.lam)
        advantages = masked_whiten(advantages, mask) * mask  # per batch, as TRL/OpenRLHF
        return Advantages(advantages, returns)

    def update(self, sc: Scored, adv: Advantages) -> dict[str, float]:
        """`epochs` passes of `minibatches` clipped-PPO steps over the batch; mean loss stats."""
        c, dist, B = self.config, self.dist, len(sc.penalised)
        local_index = {int(row): k for k, row in enumerate(sc.own)}  # row -> its place in sc.trunk
        # the same minibatches on every rank and in one process: a generator of the run's own
        order_rng = torch.Generator().manual_seed(c.seed * 1_000_003 + self.iteration)
        self.policy.train()
        keys = ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "entropy")
        sums, steps = torch.zeros(len(keys)), 0
        for _epoch in range(c.epochs):
            for mb in torch.randperm(B, generator=order_rng).chunk(c.minibatches):
                sums += self._minibatch_step(sc, adv, mb, local_index)
                steps += 1
        # losses are already shares of the global mean (summing ranks gives it); the diagnostics
        # are per-rank means: averaged over ranks
        sums = dist.all_reduce_sum(sums) / max(1, steps)
        sums[2:] /= dist.world_size
        return {k: float(v) for k, v in zip(keys, sums, strict=True)}

    def _minibatch_step(self, sc: Scored, adv: Advantages, mb: torch.Tensor,
                        local_index: dict[int, int]) -> torch.Tensor:
        """One optimizer step on this rank's rows of minibatch `mb` (Schulman et al. 2017, eq. 9:
        clipped policy loss + c_1 value loss). Returns the weighted (pg_loss, vf_loss, clipfrac,
        approx_kl, entropy)."""
        c, dist, batch = self.config, self.dist, sc.batch
        mask = batch.response_mask
        rows = [int(i) for i in mb if int(i) in local_index]
        weight = 1.0
        if not rows:  # none of this minibatch is ours: a zero-weighted step keeps DDP in step
            rows, weight = [int(sc.own[0])], 0.0
        idx = torch.tensor(rows, device=dist.device)
        trunk = None if sc.trunk is None else sc.trunk[torch.tensor([local_index[r] for r in rows])]
        with autocast_to(self.compute_dtype, self.dist.device):
            logits, values = self.model(batch.input_ids[idx], batch.attention_mask[idx], batch.start,
                                        c.temperature, with_values=c.value_head, trunk=trunk,
                                        depth=self.trunk_depth)  # (b, R, V) float32, (b, R)
        logprobs = logprobs_from_logits(logits, batch.input_ids[idx, batch.start:])  # (b, R)
        tokens = mask[mb.to(dist.device)].sum().clamp(min=1)  # the whole minibatch's answer tokens
        pg_loss, pg_stats = policy_loss(logprobs, sc.old_logprobs[idx], adv.advantages[idx], mask[idx],
                                        c.cliprange, token_count=tokens)
        vf_loss = torch.zeros(())
        if values is not None:
            vf_loss, _ = value_loss(values, sc.old_values[idx], adv.returns[idx], mask[idx],
                                    c.cliprange_value, token_count=tokens)
        loss = (pg_loss + c.vf_coef * vf_loss) * (weight * dist.world_size)  # DDP divides by N
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(
            [p for p in self.policy.parameters() if p.requires_grad], c.max_grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits), mask[idx])
        stats = [pg_loss.detach(), vf_loss.detach(), pg_stats["clipfrac"], pg_stats["approx_kl"], entropy]
        return weight * torch.tensor([float(v) for v in stats])

    def sync(self) -> dict[str, float]:
        """The new weights into the rollout engine (rank 0; the others have none)."""
        if self.engine is None:
            return {"save_s": 0.0, "reload_s": 0.0}
        assert self.sync_dir is not None
        return sync_weights(self.policy, self.engine, self.sync_dir)
