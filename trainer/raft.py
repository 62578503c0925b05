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

With `raft_sampler=start` every iteration ranks answers of the round's starting weights, not of
the policy as trained: the round distils one fixed best-of-n (rejection-sampling fine-tuning) instead
of iterating best-of-n on its own output, which compounds whatever the reward model over-rewards.

Everything else is PPOTrainer's (rollout, scoring with the frozen trunk run once, sync, stats,
round, gate). On N ranks each rank trains on the prompts it owns, every rank the same steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trainer.dpo import WholePromptTrainer, best_and_worst
from trainer.policy import collate_answers, sequence_logprobs
from trainer.ppo import Advantages, Messages, Scored
from trainer.ppo_math import entropy_from_logits, kl_per_token, logprobs_from_logits, masked_mean, raft_loss
from trainer.reward_model import autocast_to
from trainer.rollout_engine import Sample, save_weights


@dataclass
class RaftTrainer(WholePromptTrainer):
    """PPOTrainer whose update fine-tunes on the reward model's best answer of each prompt."""

    algorithm = "raft"

    def per_prompt(self) -> int:
        return self.config.raft_samples

    @torch.no_grad()
    def score(self, prompts: Sequence[Messages], prompt_ids: Sequence[list[int]],
              samples: Sequence[Sample]) -> Scored:
        """The reward model's score of every answer, then the policy's and the reference's log-probs
        (and the frozen trunk) of two answers per prompt only: its best, which the update trains on,
        and its first sampled, an unbiased draw of the policy for the KL (`answer_kl`). PPO computes
        them for all raft_samples answers, most of an iteration's time for nothing here."""
        c, dist = self.config, self.dist
        batch = collate_answers(self.tokenizer, prompt_ids, samples).to(dist.device)
        B, R = batch.response_mask.shape
        own = self.own_rows(B)  # (b,) whole prompts
        scores = torch.zeros(B, device=dist.device)
        scores[own.to(dist.device)] = self.scorer([prompts[samples[i].prompt] for i in own.tolist()],
                                                  [samples[i].text for i in own.tolist()]).to(dist.device)
        scores = dist.all_reduce_sum(scores)
        penalised, ended = self.penalise(scores, batch, samples)
        best = best_and_worst(penalised.cpu(), c.raft_samples)[:, 0]  # (P,)
        probes = torch.arange(0, B, c.raft_samples)  # (P,) each prompt's first answer
        mine = sorted(set(own.tolist()) & (set(best.tolist()) | set(probes.tolist())))
        rows = torch.tensor(mine, dtype=torch.long)
        sub = batch.rows(rows.to(dist.device))
        self.policy.eval()
        depth = self.trunk_depth
        with autocast_to(self.compute_dtype, dist.device):
            trunk = self.policy.trunk(sub.input_ids, sub.attention_mask, depth) if depth else None
            logprobs, _ = sequence_logprobs(self.policy, sub, c.temperature, with_values=False, trunk=trunk,
                                            depth=depth)
            ref_logprobs, _ = sequence_logprobs(self.reference, sub, c.temperature, with_values=False,
                                                trunk=trunk, depth=depth)
        full = torch.zeros(B, 2 * R, device=dist.device)  # rows no rank computed stay zero
        full[rows.to(dist.device)] = torch.cat([logprobs, ref_logprobs], dim=1)
        full = dist.all_reduce_sum(full)
        old_logprobs, ref_logprobs = full[:, :R], full[:, R:]
        kl = kl_per_token(old_logprobs, ref_logprobs, "k1") * batch.response_mask  # (B, R); 0: not computed
        groups = torch.tensor([s.prompt for s in samples], device=dist.device)
        values = torch.zeros_like(old_logprobs)  # no value head
        return Scored(batch, scores, penalised, ended, old_logprobs, values, ref_logprobs, kl, groups, rows,
                      trunk)

    def rollout(self, prompt_ids: Sequence[list[int]]) -> list[Sample]:
        """raft_samples answers per prompt; with raft_sampler=start, from the round's starting weights:
        written beside the sync folder's before the first iteration (the engine holds them then) and
        reloaded before each later one (the sync after each update puts the trained weights back,
        which the guard's checks read)."""
        if self.config.raft_sampler == "start" and self.engine is not None:
            assert self.sync_dir is not None
            start = self.sync_dir / "start"
            if self.iteration == 0:
                save_weights(self.policy, start)
            else:
                self.engine.load_weights(start)
        return super().rollout(prompt_ids)

    def answer_kl(self, sc: Scored) -> float:
        """KL per answer over each prompt's first sampled answer (the best ones are not a fair draw).
        With raft_sampler=start the draws are the starting weights', so Σ_t k1 estimates
        −KL(π_start ‖ π) where the reference is the starting weights (round 1, or ppo_reference=
        champion): its negation is reported, the KL the update has moved (reverse direction)."""
        kl = float(sc.kl[torch.arange(0, len(sc.kl), self.config.raft_samples)].sum(-1).mean())
        return -kl if self.config.raft_sampler == "start" else kl

    def advantages(self, sc: Scored) -> Advantages:
        """RAFT regresses on no advantage: the update reads the best answers from the scores."""
        zeros = torch.zeros_like(sc.old_logprobs)
        return Advantages(zeros, zeros)

    def update(self, sc: Scored, adv: Advantages) -> dict[str, float]:
        """`epochs` passes of `minibatches` steps over the prompts' best answers; mean stats."""
        c, dist = self.config, self.dist
        best = best_and_worst(sc.penalised.cpu(), c.raft_samples)[:, 0]  # (P,) row of each prompt's best
        local = {int(row): k for k, row in enumerate(sc.own)}  # row -> its place in sc.trunk (`score`)
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
        torch.nn.utils.clip_grad_norm_([p for p in self.policy.parameters() if p.requires_grad],
                                       c.max_grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits), mask)
        return weight * torch.tensor([float(loss.detach()), float(entropy)])
