"""The frozen lower layers run once (trainer/trunk.py): reward training reads each training
sequence's trunk from a cache after its first pass and learns exactly what it learns without it.
The tiny real model of conftest, float32 (bf16 rounding would hide a real difference)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from tests.test_reward import synthetic_pairs, tiny_config
from trainer.reward_data import collate_pairs, encode_pairs
from trainer.reward_model import load_reward_model, sequence_rewards
from trainer.reward_train import train_reward_model
from trainer.trunk import TrunkCache, frozen_depth


def test_training_from_the_cached_trunk_equals_training_without_it(tiny_model: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    results, states = [], []
    for cache_mb in (0, 64):
        model, tok = load_reward_model(tiny_model, seed=3)
        config = tiny_config(train_layers=1, epochs=3, dtype="float32", trunk_cache_mb=cache_mb)
        with caplog.at_level(logging.INFO, logger="trainer.reward_train"):
            results.append(train_reward_model(model, tok, synthetic_pairs(40, seed=1), synthetic_pairs(16, seed=2),
                                              config, progress=False))
        states.append(model.state_dict())
    plain, cached = results
    assert plain.steps == cached.steps > 0 and plain.best_step == cached.best_step
    assert plain.losses == pytest.approx(cached.losses, abs=1e-5)
    assert all(torch.allclose(states[0][k], states[1][k], atol=1e-5) for k in states[0])
    # 40 pairs, 80 sequences: each run once, then read from the cache in the two epochs after
    m = re.search(r"(\d+) passes from the cache, (\d+) run", caplog.text)
    assert m and (int(m.group(1)), int(m.group(2))) == (160, 80), caplog.text


def test_the_cache_gives_the_whole_models_rewards_and_keeps_to_its_limit(tiny_model: Path) -> None:
    model, tok = load_reward_model(tiny_model, seed=0)
    model.eval()
    enc = encode_pairs(tok, synthetic_pairs(6, seed=4), 64)
    ids, mask = collate_pairs(enc, tok.pad_token_id)  # (12, T), right-padded, rows of unequal length
    assert not bool(mask.all())
    depth = frozen_depth(len(model.base_model.layers), train_layers=1)
    assert depth == 1 and frozen_depth(2, 0) == 0 and frozen_depth(2, 2) == 0
    one_row = int(mask[0].sum()) * model.config.hidden_size * 4  # float32 bytes of the first sequence
    cache = TrunkCache(model, depth, limit_bytes=one_row)
    keys = [(i, side) for side in (0, 1) for i in range(len(enc))]
    with torch.no_grad():
        whole = sequence_rewards(model, ids, mask)
        for _ in range(2):
            split = sequence_rewards(model, ids, mask, cache.batch(keys, ids, mask), depth)
            assert torch.allclose(whole, split, atol=1e-5), (whole, split)
    assert list(cache.states) == [keys[0]] and cache.bytes == one_row  # only what fits is kept
    assert (cache.hits, cache.misses) == (1, 23)
