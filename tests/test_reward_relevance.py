"""Relevance pairs (setting reward_relevance_pairs, trainer/reward_data.relevance_pairs): a voted
answer against another prompt's voted answer, both as answers to the first prompt, teach the reward
model to read whether an answer is about the question, which votes decided by topic teach least
surely (bench/README.md, "Why the rubric does not move").

    python -m pytest tests/test_reward_relevance.py -q
"""

from __future__ import annotations

from pathlib import Path

from kaizen.core.settings import Settings
from trainer.reward_data import Pair, encode_pairs, relevance_pairs
from trainer.reward_eval import evaluate
from trainer.reward_model import RewardConfig, load_reward_model
from trainer.reward_train import train_reward_model
from tests.test_reward import synthetic_pairs, tiny_config


def test_relevance_pairs_set_a_voted_answer_against_another_prompts() -> None:
    pairs = synthetic_pairs(40, seed=1)
    ties = [Pair(p.prompt, p.chosen, p.rejected, key=p.key, label=0.5) for p in synthetic_pairs(10, seed=2)]
    extra = relevance_pairs(pairs + ties, 0.5, seed=3)
    assert len(extra) == 20  # half of the 40 decided pairs; ties never give one
    by_chosen = {p.chosen: p for p in pairs}
    for e in extra:
        own = next(p for p in pairs if p.prompt == e.prompt and p.chosen == e.chosen)
        other = by_chosen[e.rejected]  # the rejected one is another decided pair's chosen answer
        assert other.key != own.key and e.key == own.key
        assert e.label == 1.0 and e.source == "relevance" and e.decided
    assert len({e.key for e in extra}) == 20  # drawn without replacement
    assert relevance_pairs(pairs, 0.5, seed=3) == relevance_pairs(pairs, 0.5, seed=3)  # every rank the same
    assert relevance_pairs(pairs, 0.5, seed=3) != relevance_pairs(pairs, 0.5, seed=4)
    assert len(relevance_pairs(pairs, 1.0, seed=0)) == 40
    assert relevance_pairs(pairs, 0.0) == []
    one_prompt = [Pair(pairs[0].prompt, f"a{i}", f"b{i}", key="same") for i in range(5)]
    assert relevance_pairs(one_prompt, 1.0) == []  # no other prompt to take an answer from
    # ten votes on one prompt, one on another: every extra pair still takes the other prompt's answer
    lopsided = [*one_prompt, *one_prompt, Pair(pairs[1].prompt, "other", "x", key="other")]
    assert [e.rejected for e in relevance_pairs(lopsided, 1.0) if e.key == "same"] == ["other"] * 10


def test_relevance_pairs_are_trained_on(tiny_model: Path) -> None:
    # Whether such pairs teach a real model to read topic is measured on SmolLM2 with
    # bench/reward_votes.py --by-rubric-part (bench/README.md); the tiny random model learns no matching
    # of words from a few hundred pairs (0.53 on new pairs), so this checks that training sees the pairs.
    votes = synthetic_pairs(64, seed=1)
    extra = relevance_pairs(votes, 1.0, seed=0)
    accuracy = {}
    for share in (0.0, 1.0):
        model, tok = load_reward_model(tiny_model, seed=0)
        config = tiny_config(relevance_pairs=share, epochs=6, dtype="float32")
        result = train_reward_model(model, tok, votes, [], config, progress=False)
        assert result.pairs_seen == 6 * len(votes) * (1 + share)  # the extra pairs are in the batches
        accuracy[share] = evaluate(model, encode_pairs(tok, extra, config.max_length), config,
                                   tok.pad_token_id)["accuracy"]
    # the votes alone (MARKER) rank an answer against another prompt's no better than chance; the
    # relevance pairs it trained on, the tiny model ranks better (measured: 0.52 and 0.69)
    assert accuracy[0.0] < 0.62 and accuracy[1.0] > accuracy[0.0] + 0.1, accuracy


def test_the_setting_reaches_the_training_config() -> None:
    assert RewardConfig().relevance_pairs == 0.0  # off unless asked
    assert RewardConfig.from_settings(Settings(reward_relevance_pairs=0.25)).relevance_pairs == 0.25
