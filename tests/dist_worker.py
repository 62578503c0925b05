"""A training job for tests/test_distributed.py, run alone or under torchrun.

    python -m tests.dist_worker reward|reward-top|reward-ended|ppo|rloo|dpo MODEL OUT   # one process
    torchrun --standalone --nproc-per-node 2 -m tests.dist_worker ...  # two, as a round runs them

`reward`: trains the reward model on synthetic pairs (tests/test_reward.py's marker preference);
rank 0 writes the loss curve, the held-out history and the final held-out metrics to OUT (JSON).
`reward-ended`: the same on tests/test_reward_ended.py's confounded pairs with the ended term, whose
γ lives outside the DDP module (its gradient averaged by hand): OUT also holds γ's fitted values.
`ppo`: one PPO update (score + minibatch steps, no rollout engine) on a fixed rollout batch;
rank 0 writes the trained parameters and the update's stats to OUT (torch.save). `rloo` and `dpo`:
the same with that update; DPO adds three users' pairs (an odd count: rank 1 owns one, rank 0 two).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import torch

from kaizen.core.settings import Settings
from trainer import distributed

#: The jobs compared: the global batch (batch_size x grad_accum pairs) is the same for any
#: number of processes. 44 pairs = 11 micro-batches of 4: the last step of each epoch has one
#: micro-batch only, so with two processes rank 1 takes the zero-weighted step there.
REWARD_JOB = dict(max_length=64, batch_size=4, grad_accum=2, lr=1e-3, epochs=2, train_layers=0, eval_every=3,
                  patience=50, threads=1, seed=0, dtype="float32")
# float32: one process and two ranks must agree to TOLERANCE, and bf16's rounding depends on the batch shape
PPO_JOB = dict(batch_size=8, response_length=8, epochs=2, minibatches=2, lr=1e-3, train_layers=1, threads=1,
               seed=0, kl_coef=0.05, dtype="float32")


def reward_job(model_dir: Path, out: Path, dist: distributed.Dist, **overrides: Any) -> None:
    from tests.test_reward import synthetic_pairs
    from tests.test_reward_ended import confounded_pairs
    from trainer.reward_data import encode_pairs
    from trainer.reward_eval import evaluate
    from trainer.reward_model import RewardConfig, load_reward_model
    from trainer.reward_train import train_reward_model

    config = RewardConfig(**{**REWARD_JOB, **overrides})  # type: ignore[arg-type]
    model, tok = load_reward_model(model_dir, seed=0)
    make = confounded_pairs if config.ended_term else synthetic_pairs
    held = make(16, seed=2)
    result = train_reward_model(model, tok, make(44, seed=1), held, config, progress=False, dist=dist)
    final = evaluate(model, encode_pairs(tok, held, config.max_length), config, tok.pad_token_id, dist)
    if dist.is_main:
        out.write_text(json.dumps({"losses": result.losses, "history": result.history, "steps": result.steps,
                                   "pairs_seen": result.pairs_seen, "accuracy": final["accuracy"],
                                   "bt_loss": final["bt_loss"], "world_size": dist.world_size,
                                   "ended_term": result.ended_term}))


def fixed_rollout(tok: Any, config: Any) -> tuple[list[Any], list[list[int]], list[Any]]:
    """A fixed rollout batch without an engine: prompts of 2..6 words, answers of 2..8 tokens, about
    half unfinished; (prompts, their token ids, samples)."""
    from trainer.policy import encode_prompt
    from trainer.rollout_engine import Sample

    rng = random.Random(0)
    words = "apple river stone cloud green quick silent paper window orange".split()
    prompts = [[{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 6))) + "?"}]
               for _ in range(config.batch_size)]
    prompt_ids = [encode_prompt(tok, m, config.max_prompt_length) for m in prompts]
    samples = []
    for i in range(config.batch_size):
        ids = tok.encode(" ".join(rng.choices(words, k=8)), add_special_tokens=False)[: rng.randint(2, 8)]
        prompt = i // config.answers_per_prompt  # RLOO: rloo_k answers per prompt
        samples.append(Sample(prompt, ids, tok.decode(ids), finished=rng.random() < 0.5))
    return prompts, prompt_ids, samples


def vote_pairs() -> list[Any]:
    """Three users' pairs for the DPO job: one cut off, two ended."""
    from trainer.round_inputs import VotePair

    ask = [{"role": "user", "content": "apple river?"}]
    return [VotePair(ask, "green stone.", "quick quick quick", True, False),
            VotePair(ask, "paper window", "cloud", True, True),
            VotePair([{"role": "user", "content": "silent orange?"}], "river", "apple green", False, True)]


def ppo_job(model_dir: Path, out: Path, dist: distributed.Dist, algorithm: str = "ppo") -> None:
    from trainer.dpo import policy_trainer
    from trainer.policy import RewardScorer, load_policy
    from trainer.ppo_config import PPOConfig
    from trainer.reward_model import load_reward_model

    config = PPOConfig(**PPO_JOB, algorithm=algorithm, dpo_vote_pairs=3)  # type: ignore[arg-type]
    policy, tok, _ = load_policy(model_dir)
    reference, _, _ = load_policy(model_dir)
    rm, rm_tok = load_reward_model(model_dir, seed=1)
    scorer = RewardScorer(rm, rm_tok, max_length=64)
    prompts, prompt_ids, samples = fixed_rollout(tok, config)
    trainer = policy_trainer(config, policy, reference, tok, None, scorer, None, dist, vote_pairs=vote_pairs())
    scored = trainer.score(prompts, prompt_ids, samples)
    adv = trainer.advantages(scored)
    stats = trainer.update(scored, adv)
    if dist.is_main:
        params = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        torch.save({"params": params, "stats": stats, "advantages": adv.advantages,
                    "v_head": policy.v_head.weight.detach().clone(),
                    "world_size": dist.world_size, "trunk_depth": trainer.trunk_depth}, out)


def main(argv: list[str]) -> int:
    job, model_dir, out = argv[0], Path(argv[1]), Path(argv[2])
    dist = distributed.init(Settings())
    try:
        if job in ("rloo", "dpo"):
            ppo_job(model_dir, out, dist, algorithm=job)
        elif job == "reward-top":  # the top layer only: the frozen trunk comes from the cache
            reward_job(model_dir, out, dist, train_layers=1)
        elif job == "reward-ended":  # γ beside the model: its gradient is averaged outside DDP
            reward_job(model_dir, out, dist, ended_term=True)
        else:
            {"reward": reward_job, "ppo": ppo_job}[job](model_dir, out, dist)
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
