"""RAFT, reward-ranked fine-tuning (trainer/raft.py), on the tiny real model: the update fine-tunes on
each prompt's best-scored answer. The loss itself is checked against a hand-computed value in
tests/test_ppo.py, the batch shape in tests/test_ppo_config.py; the round, gate and publishing it
shares with PPO, RLOO and DPO in tests/test_rounds.py and tests/test_loop.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.dpo import best_and_worst, policy_trainer
from trainer.policy import RewardScorer, collate, load_policy, sequence_logprobs
from trainer.ppo_config import PPOConfig
from trainer.raft import RaftTrainer
from trainer.reward_model import load_reward_model


def _per_token_logprobs(model: Any, prompt_ids: list[list[int]], samples: list[Any],
                        pad_id: int) -> torch.Tensor:
    """Each answer's mean log-prob per token under `model`, built here from the samples (not by the
    trainer's own batching, which the test must not trust)."""
    batch = collate([prompt_ids[s.prompt] for s in samples], [s.token_ids for s in samples], pad_id)
    lp, _ = sequence_logprobs(model, batch, 1.0, with_values=False)
    return (lp * batch.response_mask).sum(-1) / batch.response_mask.sum(-1)


def test_a_raft_update_fine_tunes_on_each_prompts_best_answer(tiny_model: Path) -> None:
    """8 answers as 2 prompts x 4, scored by an untrained reward head: the reward model's best answer
    of each prompt (after the missing-EOS penalty) gains log-probability per token, the update's
    NLL falls, and no value head is trained."""
    from tests.dist_worker import fixed_rollout

    torch.set_num_threads(1)
    cfg = PPOConfig(algorithm="raft", batch_size=8, raft_samples=4, response_length=8, train_layers=1,
                    threads=1, dtype="float32", lr=1e-3, epochs=2, minibatches=1)
    policy, tok, _ = load_policy(tiny_model)
    reference, _, _ = load_policy(tiny_model)
    rm, rm_tok = load_reward_model(tiny_model, seed=1)
    trainer = policy_trainer(cfg, policy, reference, tok, None, RewardScorer(rm, rm_tok, max_length=64), None)
    assert isinstance(trainer, RaftTrainer)
    prompts, prompt_ids, samples = fixed_rollout(tok, cfg)
    scored = trainer.score(prompts, prompt_ids, samples)
    best = best_and_worst(scored.penalised.cpu(), 4)[:, 0].tolist()
    assert [b // 4 for b in best] == [0, 1]  # one best answer per prompt, from that prompt's rows
    assert scored.penalised[best[0]] == scored.penalised[:4].max()
    before = _per_token_logprobs(policy, prompt_ids, [samples[b] for b in best], tok.pad_token_id)
    history = []
    for _ in range(3):
        scored = trainer.score(prompts, prompt_ids, samples)
        history.append(trainer.update(scored, trainer.advantages(scored)))
        trainer.iteration += 1
    after = _per_token_logprobs(policy, prompt_ids, [samples[b] for b in best], tok.pad_token_id)
    assert (after > before + 0.05).all(), (before, after)
    assert history[-1]["pg_loss"] < history[0]["pg_loss"]
    assert history[0]["best_reward"] == pytest.approx(float(scored.penalised[best].mean()), abs=1e-5)
    assert float(policy.v_head.weight.abs().max()) == 0.0  # no value head is trained


def test_raft_refuses_to_run_another_algorithm(tiny_model: Path) -> None:
    policy, tok, _ = load_policy(tiny_model)
    rm, rm_tok = load_reward_model(tiny_model, seed=1)
    with pytest.raises(ValueError, match="runs algorithm raft"):
        RaftTrainer(PPOConfig(algorithm="ppo", batch_size=8), policy, policy, tok, None,
                    RewardScorer(rm, rm_tok, max_length=64), None)


@pytest.mark.slow
def test_raft_sampler_start_ranks_the_starting_weights_answers_every_iteration(tiny_model: Path,
                                                                               tmp_path: Path) -> None:
    """raft_sampler=start on the real engine: after two updates (a learning rate that moves the tiny
    model), the third iteration's rollout is, token for token, what the untrained weights answer with
    that iteration's seed, and after each update the engine holds the trained weights again (what the
    guard reads). The same updates with raft_sampler=policy sample something else: the check can fail."""
    from tests.conftest import make_settings
    from trainer.policy import encode_prompt
    from trainer.rollout_engine import RolloutEngine, sync_weights

    torch.set_num_threads(1)
    engine = RolloutEngine(make_settings(tmp_path / "data", engine_max_model_len=512), tiny_model,
                           max_model_len=512)
    prompts = [[{"role": "user", "content": q}] for q in ("apple river?", "green stone window?")]
    same = {}
    try:
        for sampler in ("start", "policy"):
            cfg = PPOConfig(algorithm="raft", batch_size=8, raft_samples=4, response_length=12,
                            train_layers=2, threads=1, dtype="float32", lr=5e-2, epochs=2, minibatches=1,
                            raft_sampler=sampler)
            policy, tok, _ = load_policy(tiny_model)
            reference, _, _ = load_policy(tiny_model)
            sync_weights(reference, engine, tmp_path / f"untrained-{sampler}")  # each run starts untrained
            rm, rm_tok = load_reward_model(tiny_model, seed=1)
            sync = tmp_path / f"sync-{sampler}"
            scorer = RewardScorer(rm, rm_tok, max_length=64)
            trainer = policy_trainer(cfg, policy, reference, tok, engine, scorer, sync)
            ids = [encode_prompt(tok, m, cfg.max_prompt_length) for m in prompts]
            untrained = [s.token_ids for s in engine.generate(ids, max_tokens=12, temperature=1.0, n=4,
                                                              seed=trainer.rollout_seed(2))]
            for _ in range(2):
                trainer.step(prompts)
                assert engine.weights_version == str(sync)  # the trained weights, for the guard's checks
            assert trainer.iteration == 2
            same[sampler] = [s.token_ids for s in trainer.rollout(ids)] == untrained
    finally:
        engine.shutdown()
    assert same == {"start": True, "policy": False}
