"""Online DPO: the third policy update (KAIZEN_POLICY_ALGORITHM=dpo), beside PPO and RLOO.

    trainer = policy_trainer(config, policy, reference, tokenizer, engine, scorer, sync_dir, vote_pairs=...)

Each iteration (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; TRL's
OnlineDPOTrainer) samples `dpo_samples` answers per prompt from the current policy on the rollout
engine, and the reward model labels them: the one it scores highest after the missing-EOS penalty
is chosen, the lowest rejected (two: Guo et al.'s pair; more: best-of-n against worst-of-n, as in
Xiong et al. 2024's iterative DPO, a wider reward gap that a noisy reward model orders right more
often). `dpo_vote_pairs` of the users' own decided votes join them (trainer/round_inputs.py,
`read_round_inputs`: every round's, drawn in turn), labelled as the users voted. Both kinds of pair
go through one loss, DPO's (Rafailov et al. 2023; trainer/ppo_math.py `dpo_loss`), whose β ties the
policy to the frozen reference in place of PPO's KL penalty; there is no value head.

Why the users' pairs: PPO and RLOO learn the votes only through the reward model, and spend
their KL budget on what it reads best (on the loop's votes, ending before the 64-token cut;
bench/README.md, "The loop"). DPO on the votes themselves moves the policy toward everything the
voters' chosen answers do differently, at the strength β allows.

Everything else is PPOTrainer's: the rollout, the scoring (reward model, the policy's and the
reference's log-probs, the frozen trunk run once), the weight sync, the stats, the round, the gate.
On N ranks each rank trains on the pairs it owns (the answers of its prompts: a pair never
straddles ranks) and every rank the same minibatch steps, as PPO does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from trainer.distributed import ONE_PROCESS, Dist
from trainer.policy import Batch, PolicyWithValue, RewardScorer, collate, encode_prompt, sequence_logprobs
from trainer.ppo import Advantages, PPOTrainer, Scored
from trainer.ppo_config import PPOConfig
from trainer.ppo_math import dpo_loss, entropy_from_logits, logprobs_from_logits, masked_mean
from trainer.reward_model import autocast_to
from trainer.rollout_engine import RolloutEngine
from trainer.round_inputs import VotePair


@dataclass
class PairSet:
    """Pairs of answers to train on: `rows[p]` are pair p's chosen and rejected row of `batch`."""

    batch: Batch
    rows: torch.Tensor  # (P, 2) row of each pair's chosen, rejected answer
    ref: torch.Tensor  # (B,) the reference's log-prob of each row's answer (summed over tokens)
    local: dict[int, int]
    """Row -> its place in `trunk`: the rows this rank computed the frozen layers of."""
    trunk: torch.Tensor | None  # (len(local), S, H)
    mine: list[int]
    """The pairs whose loss this rank computes."""


def best_and_worst(scores: torch.Tensor, k: int = 2) -> torch.Tensor:
    """(P, 2) rows of each on-policy pair: the best- and the worst-scored of prompt p's k answers,
    which sit at rows kp .. kp + k - 1 of scores (kP,). With k = 2 the higher-scored answer first;
    an exact tie keeps the order sampled (a stable sort)."""
    groups = scores.view(-1, k)  # (P, k)
    order = torch.sort(-groups, dim=1, stable=True).indices  # (P, k) best first
    base = torch.arange(len(groups))[:, None] * k  # (P, 1)
    return base + order[:, [0, -1]]


def whole_prompt_rows(B: int, k: int, rank: int, world_size: int) -> torch.Tensor:
    """Rows kp .. kp + k - 1 of a B-row batch (k answers per prompt) for the prompts p of `rank`."""
    prompts = torch.arange(rank, B // k, world_size)
    return (prompts[:, None] * k + torch.arange(k)).flatten()


@dataclass
class WholePromptTrainer(PPOTrainer):
    """A PPOTrainer whose rows are whole prompts, `per_prompt()` answers each: a prompt's answers are
    ranked on the rank that scored them (DPO's pairs, RAFT's best), so every rank needs a prompt."""

    algorithm: ClassVar[str]

    def per_prompt(self) -> int:
        raise NotImplementedError

    def __post_init__(self) -> None:
        c = self.config
        if c.algorithm != self.algorithm:
            raise ValueError(f"{type(self).__name__} runs algorithm {self.algorithm}, not {c.algorithm!r}")
        if c.prompts_per_iteration < self.dist.world_size:
            raise ValueError(f"{self.algorithm}: {c.prompts_per_iteration} prompts per iteration for "
                             f"{self.dist.world_size} training processes: every rank needs one")
        super().__post_init__()

    def own_rows(self, B: int) -> torch.Tensor:
        return whole_prompt_rows(B, self.per_prompt(), self.dist.rank, self.dist.world_size)


def answer_ids(tokenizer: Any, text: str, ended: bool | None, max_tokens: int) -> list[int]:
    """An answer's tokens as the engine would have sampled them: the text, then the end-of-turn token
    when the answer ended by itself (and still fits in `max_tokens`); not known (None): none."""
    ids: list[int] = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]][:max_tokens]
    if ended is True and len(ids) < max_tokens:
        ids.append(int(tokenizer.eos_token_id))
    return ids


@dataclass
class OnlineDPOTrainer(WholePromptTrainer):
    """PPOTrainer whose update is online DPO (module docstring); `vote_pairs` are the users'."""

    algorithm = "dpo"
    vote_pairs: Sequence[VotePair] = ()
    _vote_order: list[int] = field(default_factory=list, init=False)

    def per_prompt(self) -> int:
        """dpo_samples: a pair, drawn from one prompt's answers, never straddles ranks."""
        return self.config.dpo_samples

    def advantages(self, sc: Scored) -> Advantages:
        """DPO regresses on no advantage: the update reads the pairs from the scores."""
        zeros = torch.zeros_like(sc.old_logprobs)
        return Advantages(zeros, zeros)

    def update(self, sc: Scored, adv: Advantages) -> dict[str, float]:
        """`epochs` passes over the on-policy pairs and this iteration's users' pairs, each set in
        `minibatches` steps (one forward per step: DDP's contract); mean loss stats."""
        c, dist = self.config, self.dist
        sets = [self._policy_pairs(sc)]
        votes = self._next_votes()
        if votes:
            sets.append(self._vote_pairs(votes))
        order_rng = torch.Generator().manual_seed(c.seed * 1_000_003 + self.iteration)
        self.policy.train()
        sums, steps = torch.zeros(4), 0
        for _epoch in range(c.epochs):
            for ps in sets:
                for mb in torch.randperm(len(ps.rows), generator=order_rng).chunk(c.minibatches):
                    sums += self._pair_step(ps, mb)
                    steps += 1
        sums = dist.all_reduce_sum(sums) / max(1, steps)
        sums[1:] /= dist.world_size  # accuracy and entropy are per-rank means; the loss is a share
        return {"pg_loss": float(sums[0]), "vf_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0,
                "entropy": float(sums[2]), "pair_accuracy": float(sums[1]), "dpo_margin": float(sums[3])}

    def _policy_pairs(self, sc: Scored) -> PairSet:
        ref = (sc.ref_logprobs * sc.batch.response_mask).sum(-1)  # (B,)
        local = {int(row): k for k, row in enumerate(sc.own)}
        rows = best_and_worst(sc.penalised.cpu(), self.config.dpo_samples)
        mine = [p for p in range(len(rows)) if int(rows[p, 0]) in local]
        return PairSet(sc.batch, rows, ref, local, sc.trunk, mine)

    def _next_votes(self) -> list[VotePair]:
        """The next `dpo_vote_pairs` users' pairs, in an order shuffled once per pass (the same run
        seed on every rank, so every rank draws the same)."""
        picked: list[VotePair] = []
        while self.vote_pairs and len(picked) < min(self.config.dpo_vote_pairs, len(self.vote_pairs)):
            if not self._vote_order:
                self._vote_order = list(range(len(self.vote_pairs)))
                self.rng.shuffle(self._vote_order)
            picked.append(self.vote_pairs[self._vote_order.pop()])
        return picked

    @torch.no_grad()
    def _vote_pairs(self, votes: Sequence[VotePair]) -> PairSet:
        """The users' pairs as a batch (chosen at row 2p, rejected at 2p + 1), the reference's
        log-probs and the frozen layers of every row (a few pairs: each rank computes them all)."""
        c, tok, device = self.config, self.tokenizer, self.dist.device
        prompts, answers = [], []
        for v in votes:
            prompt = encode_prompt(tok, v.messages, c.max_prompt_length)
            prompts += [prompt, prompt]
            answers += [answer_ids(tok, v.chosen, v.chosen_ended, c.response_length),
                        answer_ids(tok, v.rejected, v.rejected_ended, c.response_length)]
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        batch = collate(prompts, answers, pad_id).to(device)
        self.policy.eval()
        depth = self.trunk_depth
        with autocast_to(self.compute_dtype, device):
            trunk = self.policy.trunk(batch.input_ids, batch.attention_mask, depth) if depth else None
            ref_lp, _ = sequence_logprobs(self.reference, batch, c.temperature, with_values=False,
                                          trunk=trunk, depth=depth)
        ref = (ref_lp * batch.response_mask).sum(-1)  # (B,)
        rows = torch.arange(len(answers)).view(-1, 2)
        mine = list(range(self.dist.rank, len(votes), self.dist.world_size))
        return PairSet(batch, rows, ref, {r: r for r in range(len(answers))}, trunk, mine)

    def _pair_step(self, ps: PairSet, mb: torch.Tensor) -> torch.Tensor:
        """One optimizer step on this rank's pairs of minibatch `mb`: the DPO loss as this rank's
        share of the minibatch's mean. Returns the weighted (loss, accuracy, entropy, margin)."""
        c, dist, batch = self.config, self.dist, ps.batch
        pairs = [int(p) for p in mb if int(p) in ps.mine]
        weight = 1.0
        if not pairs:  # none of this minibatch is ours: a zero-weighted step keeps DDP in step
            pairs, weight = [ps.mine[0] if ps.mine else 0], 0.0
        idx = ps.rows[pairs].flatten()  # (2m,) chosen, rejected, chosen, ...
        trunk = None if ps.trunk is None else ps.trunk[torch.tensor([ps.local[int(r)] for r in idx])]
        idx = idx.to(dist.device)
        with autocast_to(self.compute_dtype, dist.device):
            logits, _ = self.model(batch.input_ids[idx], batch.attention_mask[idx], batch.start,
                                   c.temperature, with_values=False, trunk=trunk, depth=self.trunk_depth)
        mask = batch.response_mask[idx]  # (2m, R)
        logps = (logprobs_from_logits(logits, batch.input_ids[idx, batch.start:]) * mask).sum(-1).view(-1, 2)
        ref = ps.ref[idx].view(-1, 2)
        loss, stats = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], c.dpo_beta, pair_count=len(mb),
                               nll_coef=c.dpo_nll_coef, chosen_tokens=mask.sum(-1).view(-1, 2)[:, 0])
        self.optimizer.zero_grad(set_to_none=True)
        (loss * (weight * dist.world_size)).backward()  # type: ignore[no-untyped-call]  # DDP divides by N
        torch.nn.utils.clip_grad_norm_([p for p in self.policy.parameters() if p.requires_grad], c.max_grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits), mask)
        return weight * torch.tensor([float(loss.detach()), float(stats["accuracy"]), float(entropy), float(stats["margin"])])


def policy_trainer(config: PPOConfig, policy: PolicyWithValue, reference: PolicyWithValue, tokenizer: Any,
                   engine: RolloutEngine | None, scorer: RewardScorer, sync_dir: Path | None, dist: Dist = ONE_PROCESS,
                   *, vote_pairs: Sequence[VotePair] = ()) -> PPOTrainer:
    """The trainer of `config.algorithm`: PPOTrainer for ppo and rloo, OnlineDPOTrainer (with the
    users' `vote_pairs`) for dpo, RaftTrainer (trainer/raft.py) for raft. The other arguments are
    PPOTrainer's."""
    args = (config, policy, reference, tokenizer, engine, scorer, sync_dir, dist)
    if config.algorithm == "dpo":
        return OnlineDPOTrainer(*args, vote_pairs=vote_pairs)
    if config.algorithm == "raft":
        from trainer.raft import RaftTrainer  # raft imports this module

        return RaftTrainer(*args)
    return PPOTrainer(*args)
