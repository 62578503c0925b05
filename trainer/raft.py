"""RAFT, reward-ranked fine-tuning: the fourth policy update (KAIZEN_POLICY_ALGORITHM=raft).

    trainer = policy_trainer(config, policy, reference, tokenizer, engine, scorer, sync_dir)  # trainer/dpo.py

Each iteration (Dong et al. 2023, "RAFT: Reward rAnked FineTuning for Generative Foundation Model
Alignment"; the same idea as ReST's improve step, Gulcehre et al. 2023) samples `raft_samples`
answers per prompt from the current policy on the rollout engine; the reward model scores them
(less the missing-EOS penalty) and the best answer of each prompt becomes a fine-tuning target:
`epochs` passes of `minibatches` steps of its negative log-likelihood per token (trainer/ppo_math.py,
`raft_loss`). No value head, no reference in the loss: the policy moves toward its own best-of-n,
whose KL to the policy is at most log n − (n − 1)/n (Beirami et al. 2024), and the gate bounds what
the round may publish (gate_max_kl).

Why: best-of-n sampling from v0 with the reward model the loop learned from 500 votes read 0.657
on the rubric at n = 16 (KL ≤ 1.83), while the PPO and DPO rounds, at KL ~2, reached ~0.55
(bench/README.md, "Best of n"): the reward model ranks answers well enough, the policy update is
what loses it. RAFT learns the best-of-n directly; sampling is the cheap part on the engine.

Everything else is PPOTrainer's (rollout, scoring with the frozen trunk run once, sync, stats,
round, gate). On N ranks each rank trains on the prompts it owns, every rank the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.dpo import best_and_worst, whole_prompt_rows
from trainer.ppo import Advantages, PPOTrainer, Scored
from trainer.ppo_math import entropy_from_logits, logprobs_from_logits, masked_mean, raft_loss
from trainer.reward_model import autocast_to


@dataclass
class RaftTrainer(PPOTrainer):
    """PPOTrainer whose update fine-tunes on the reward model's best answer of each prompt."""

    def __post_init__(self) -> None:
        if self.config.algorithm != "raft":
            raise ValueError(f"RaftTrainer runs algorithm raft, not {self.config.algorithm!r}")
        if self.config.prompts_per_iteration < self.dist.world_size:
            raise ValueError(f"raft: {self.config.prompts_per_iteration} prompts per iteration for "
                             f"{self.dist.world_size} training processes: every rank needs one")
        super().__post_init__()

    def own_rows(self, B: int) -> torch.Tensor:
        """Whole prompts, as DPO's: a prompt's answers are ranked on the rank that scored them."""
        return whole_prompt_rows(B, self.config.raft_samples, self.dist.rank, self.dist.world_size)

    def advantages(self, sc: Scored) -> Advantages:
        """RAFT regresses on no advantage: the update reads the best answers from the scores."""
        zeros = torch.zeros_like(sc.old_logprobs)
        return Advantages(zeros, zeros)

    def update(self, sc: Scored, adv: Advantages) -> dict[str, float]:
        """`epochs` passes of `minibatches` steps over the prompts' best answers; mean stats."""
        c, dist = self.config, self.dist
        best = best_and_worst(sc.penalised.cpu(), c.raft_samples)[:, 0]  # (P,) row of each prompt's best
        local = {int(row): k for k, row in enumerate(sc.own)}  # row -> its place in sc.trunk
        order_rng = torch.Generator().manual_seed(c.seed * 1_000_003 + self.iteration)
        self.policy.train()
        sums, steps = torch.zeros(2), 0
        for _epoch in range(c.epochs):
            for mb in torch.randperm(len(best), generator=order_rng).chunk(c.minibatches):
                sums += self._step(sc, [int(best[p]) for p in mb], local)
                steps += 1
        sums = dist.all_reduce_sum(sums) / max(1, steps)
        sums[1] /= dist.world_size  # entropy is a per-rank mean; the loss is a share
        return {"pg_loss": float(sums[0]), "vf_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0,
                "entropy": float(sums[1]), "best_reward": float(sc.penalised[best].mean())}

    def _step(self, sc: Scored, rows: list[int], local: dict[int, int]) -> torch.Tensor:
        """One optimizer step on this rank's rows of the minibatch (a zero-weighted step when it owns
        none, to keep DDP in step). Returns the weighted (loss, entropy)."""
        c, dist, batch = self.config, self.dist, sc.batch
        count = len(rows)
        mine, weight = [r for r in rows if r in local], 1.0
        if not mine:
            mine, weight = [int(sc.own[0])], 0.0
        trunk = None if sc.trunk is None else sc.trunk[torch.tensor([local[r] for r in mine])]
        idx = torch.tensor(mine, device=dist.device)
        with autocast_to(self.compute_dtype, dist.device):
            logits, _ = self.model(batch.input_ids[idx], batch.attention_mask[idx], batch.start,
                                   c.temperature, with_values=False, trunk=trunk, depth=self.trunk_depth)
        mask = batch.response_mask[idx]  # (m, R)
        logps = (logprobs_from_logits(logits, batch.input_ids[idx, batch.start:]) * mask).sum(-1)  # (m,)
        loss, _ = raft_loss(logps, mask.sum(-1), count)
        self.optimizer.zero_grad(set_to_none=True)
        (loss * (weight * dist.world_size)).backward()  # type: ignore[no-untyped-call]  # DDP divides by N
        torch.nn.utils.clip_grad_norm_([p for p in self.policy.parameters() if p.requires_grad], c.max_grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits), mask)
        return weight * torch.tensor([float(loss.detach()), float(entropy)])
