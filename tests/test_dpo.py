"""Online DPO (trainer/dpo.py): which answer of a pair is chosen, how a user's answer becomes tokens,
which votes DPO reads from the store (real SQLite), and that a DPO update on the tiny real model
moves the policy toward the users' chosen answers. The loss itself is checked against a
hand-computed value in tests/test_ppo.py; one process against two in tests/test_distributed.py;
the whole loop with KAIZEN_POLICY_ALGORITHM=dpo in tests/test_loop.py. The last test reads the
Prometheus gauge a DPO iteration sets.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from kaizen.core.events import Answer, Message, PreferenceEvent
from kaizen.core.settings import Settings
from trainer.dpo import OnlineDPOTrainer, answer_ids, best_and_worst
from trainer.policy import collate, encode_prompt, load_policy, sequence_logprobs
from trainer.round_inputs import VotePair, read_round_inputs
from trainer.store import PreferenceStore, held_out


def test_the_pair_is_the_best_and_the_worst_scored_answer_of_each_prompt() -> None:
    # two answers per prompt (rows 0-1, 2-3, 4-5): the second is better, an exact tie keeps the
    # sampled order, the first is better
    rows = best_and_worst(torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, -1.0]))
    assert rows.tolist() == [[1, 0], [2, 3], [4, 5]]
    # three per prompt (rows 0-2, 3-5, 6-8): best against worst; among equals the first sampled
    # is the best and the last the worst, never one row twice
    rows = best_and_worst(torch.tensor([1.0, 3.0, 2.0, 5.0, 5.0, 0.0, 4.0, 4.0, 4.0]), 3)
    assert rows.tolist() == [[1, 0], [3, 5], [6, 8]]


def test_each_rank_owns_whole_prompts_so_no_pair_straddles_two() -> None:
    """`own_rows` with 4 answers per prompt, 16 answers, 2 ranks: prompts 0 and 2 on rank 0, 1 and 3
    on rank 1, each with all four of its answers."""
    from types import SimpleNamespace

    def rows(rank: int) -> list[int]:
        me = SimpleNamespace(dist=SimpleNamespace(rank=rank, world_size=2),
                             config=SimpleNamespace(dpo_samples=4))
        me.per_prompt = lambda: OnlineDPOTrainer.per_prompt(me)  # type: ignore[arg-type]
        return OnlineDPOTrainer.own_rows(me, 16).tolist()  # type: ignore[arg-type]

    assert rows(0) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert rows(1) == [4, 5, 6, 7, 12, 13, 14, 15]


def test_a_users_answer_ends_with_the_end_token_only_if_it_ended(tiny_model: Path) -> None:
    _, tok, _ = load_policy(tiny_model)
    text = tok.decode(tok("one two three four", add_special_tokens=False)["input_ids"])
    plain = tok(text, add_special_tokens=False)["input_ids"]
    assert answer_ids(tok, text, ended=True, max_tokens=64) == [*plain, tok.eos_token_id]
    assert answer_ids(tok, text, ended=False, max_tokens=64) == plain
    assert answer_ids(tok, text, ended=None, max_tokens=64) == plain  # not known: no end claimed
    # cut to max_tokens (the policy's answer length), it no longer ends there
    assert answer_ids(tok, text, ended=True, max_tokens=2) == plain[:2]


def _vote(i: int, question: str, choice: object,
          finish: tuple[str | None, str | None] = ("stop", "length")) -> PreferenceEvent:
    return PreferenceEvent(comparison_id=f"c{i}", user="u1", served_at=datetime.now(UTC),
                           messages=[Message(role="user", content=question)],
                           answers=[Answer(text=f"a{i}", model_version="v0", finish_reason=finish[0]),
                                    Answer(text=f"b{i}", model_version="v0", finish_reason=finish[1])],
                           choice=choice)  # type: ignore[arg-type]


def test_a_round_reads_its_prompts_and_the_decided_votes_on_training_prompts(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, reward_holdout_fraction=0.3)
    questions = [f"question {k}?" for k in range(40)]
    held = [q for q in questions if held_out(_vote(0, q, 0), 0.3)]
    train = [q for q in questions if q not in held]
    assert held and train  # the split has both sides for the test to tell apart
    events = [_vote(1, train[0], 0), _vote(2, train[1], 1, ("length", "stop")), _vote(3, train[2], "tie"),
              _vote(4, train[3], "both_bad"), _vote(5, held[0], 0),
              _vote(6, train[4], 1, ("stop", None))]  # an imported vote: one answer's end not known
    store = PreferenceStore(settings.preferences_db)
    try:
        store.add_many(events)
    finally:
        store.close()
    inputs = read_round_inputs(settings)
    # every training prompt is PPO's, the held-out one only the gate's (one read gives both)
    assert inputs.train_prompts == [[{"role": "user", "content": q}] for q in train[:5]]
    assert inputs.held_prompts == [[{"role": "user", "content": held[0]}]]
    # the tie, the both-bad vote and the held-out prompt (the gate's) are not learned from
    assert inputs.vote_pairs == [
        VotePair([{"role": "user", "content": train[0]}], "a1", "b1", chosen_ended=True, rejected_ended=False),
        VotePair([{"role": "user", "content": train[1]}], "b2", "a2", chosen_ended=True, rejected_ended=False),
        VotePair([{"role": "user", "content": train[4]}], "b6", "a6", chosen_ended=None, rejected_ended=True),
    ]


VOTES = [VotePair([{"role": "user", "content": "apple river?"}], "green stone.", "quick quick quick", True, False),
         VotePair([{"role": "user", "content": "apple river?"}], "paper window", "cloud cloud", True, True),
         VotePair([{"role": "user", "content": "orange?"}], "river.", "silent apple", True, False),
         VotePair([{"role": "user", "content": "window?"}], "stone paper", "green", False, True)]


def _vote_logprobs(tok: Any, *models: Any) -> list[torch.Tensor]:
    """Each model's summed log-prob of every vote's chosen (even rows) and rejected answer (odd),
    built here from the texts (not by the trainer's own batching, which the tests must not trust)."""
    prompts = [encode_prompt(tok, v.messages, 64) for v in VOTES for _ in range(2)]
    answers = [answer_ids(tok, text, ended, 8) for v in VOTES
               for text, ended in ((v.chosen, v.chosen_ended), (v.rejected, v.rejected_ended))]
    batch = collate(prompts, answers, tok.pad_token_id)
    return [(sequence_logprobs(m, batch, 1.0, with_values=False)[0] * batch.response_mask).sum(-1) for m in models]


def _dpo_updates(tiny_model: Path, iterations: int, **config: Any) -> tuple[Any, Any, Any, list[dict[str, float]]]:
    """(policy, reference, tokenizer, each update's stats) after `iterations` DPO updates on the tiny
    model: fixed on-policy pairs labelled by an untrained reward head, and the four VOTES."""
    from tests.dist_worker import fixed_rollout
    from trainer.policy import RewardScorer
    from trainer.ppo_config import PPOConfig
    from trainer.reward_model import load_reward_model

    torch.set_num_threads(1)
    cfg = PPOConfig(algorithm="dpo", batch_size=8, response_length=8, train_layers=1, threads=1,
                    dtype="float32", lr=1e-3, epochs=2, minibatches=1, dpo_vote_pairs=4, dpo_beta=0.5, **config)
    policy, tok, _ = load_policy(tiny_model)
    reference, _, _ = load_policy(tiny_model)
    rm, rm_tok = load_reward_model(tiny_model, seed=1)
    trainer = OnlineDPOTrainer(cfg, policy, reference, tok, None, RewardScorer(rm, rm_tok, max_length=64),
                               None, vote_pairs=VOTES)
    prompts, prompt_ids, samples = fixed_rollout(tok, cfg)
    history = []
    for _ in range(iterations):
        scored = trainer.score(prompts, prompt_ids, samples)
        history.append(trainer.update(scored, trainer.advantages(scored)))
        trainer.iteration += 1
    return policy, reference, tok, history


def test_a_dpo_update_moves_the_policy_toward_the_users_chosen_answers(tiny_model: Path) -> None:
    """Only the users' pairs carry a signal here (the on-policy pairs' order comes from an untrained
    reward head): after a few updates the policy's implicit reward orders every user's pair as voted."""
    policy, reference, tok, history = _dpo_updates(tiny_model, 0)
    lp, ref = _vote_logprobs(tok, policy, reference)
    assert (lp - ref).abs().max().item() < 1e-4  # policy = reference: no preference yet
    policy, reference, tok, history = _dpo_updates(tiny_model, 3)
    lp, ref = _vote_logprobs(tok, policy, reference)
    margins = ((lp - ref)[0::2] - (lp - ref)[1::2]).tolist()  # log π/π_ref, chosen minus rejected
    assert all(m > 0.05 for m in margins), margins
    assert history[-1]["pg_loss"] < history[0]["pg_loss"]
    assert history[-1]["pair_accuracy"] > history[0]["pair_accuracy"]
    assert float(policy.v_head.weight.abs().max()) == 0.0  # no value head is trained


def test_best_of_four_against_worst_of_four_trains_on_the_reward_models_extremes(tiny_model: Path) -> None:
    """dpo_samples=4: an iteration of 8 answers is 2 prompts x 4; the on-policy pairs are each
    prompt's highest- and lowest-scored answers (after the missing-EOS penalty), and the update runs."""
    _, _, _, history = _dpo_updates(tiny_model, 1, dpo_samples=4)
    assert history[0]["pg_loss"] > 0 and 0 <= history[0]["pair_accuracy"] <= 1
    policy, tok, _ = load_policy(tiny_model)
    reference, _, _ = load_policy(tiny_model)
    from tests.dist_worker import fixed_rollout
    from trainer.policy import RewardScorer
    from trainer.ppo_config import PPOConfig
    from trainer.reward_model import load_reward_model

    cfg = PPOConfig(algorithm="dpo", batch_size=8, response_length=8, train_layers=1, threads=1,
                    dtype="float32", dpo_samples=4, dpo_vote_pairs=0)
    rm, rm_tok = load_reward_model(tiny_model, seed=1)
    trainer = OnlineDPOTrainer(cfg, policy, reference, tok, None, RewardScorer(rm, rm_tok, max_length=64), None)
    scored = trainer.score(*fixed_rollout(tok, cfg))
    pairs = trainer._policy_pairs(scored)
    scores = scored.penalised.view(2, 4)
    assert pairs.rows.tolist() == [[int(scores[p].argmax()) + 4 * p, int(scores[p].argmin()) + 4 * p]
                                   for p in range(2)]
    with pytest.raises(ValueError, match="multiple of dpo_samples"):
        PPOConfig(algorithm="dpo", batch_size=8, dpo_samples=3)


def test_rpo_keeps_the_chosen_answers_likelier_than_plain_dpo(tiny_model: Path) -> None:
    """dpo_nll_coef (RPO) reaches the update: from the same start and data, the users' chosen answers
    end likelier under the policy than after plain DPO, and still ordered above the rejected ones."""
    plain, reference, tok, _ = _dpo_updates(tiny_model, 3)
    rpo, _, _, _ = _dpo_updates(tiny_model, 3, dpo_nll_coef=1.0)
    lp_plain, lp_rpo, ref = _vote_logprobs(tok, plain, rpo, reference)
    assert lp_rpo[0::2].sum().item() > lp_plain[0::2].sum().item() + 0.1, (lp_rpo[0::2], lp_plain[0::2])
    margins = ((lp_rpo - ref)[0::2] - (lp_rpo - ref)[1::2]).tolist()
    assert all(m > 0 for m in margins), margins


def test_a_dpo_iteration_exports_its_pair_accuracy_and_a_ppo_one_leaves_it() -> None:
    from prometheus_client import REGISTRY

    from trainer.round_record import record_iteration_metrics

    iteration = {"reward_mean": 0.1, "kl": 0.2, "kl_coef_next": 0.05, "samples_per_s": 1.0}
    record_iteration_metrics({**iteration, "pair_accuracy": 0.75})
    assert REGISTRY.get_sample_value("kaizen_dpo_pair_accuracy") == 0.75
    record_iteration_metrics({**iteration, "pair_accuracy": None})  # PPO's and RLOO's iterations
    assert REGISTRY.get_sample_value("kaizen_dpo_pair_accuracy") == 0.75
    assert REGISTRY.get_sample_value("kaizen_ppo_kl") == 0.2
