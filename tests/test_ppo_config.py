"""PPOConfig has one source of defaults: the `ppo_*` settings (trainer/ppo_config.py)."""

from __future__ import annotations

import dataclasses

import pytest

from kaizen.core.settings import Settings
from trainer.ppo_config import FROM_SETTINGS, RENAMED, PPOConfig


def test_every_setting_backed_field_defaults_to_its_setting() -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    for name in FROM_SETTINGS:
        assert defaults[name] == Settings.model_fields[f"ppo_{name}"].default, name
    for name, setting in RENAMED.items():
        assert defaults[name] == Settings.model_fields[setting].default, name
    # every field is a setting but the two fixed parts of the recipe
    assert set(defaults) - set(FROM_SETTINGS) - set(RENAMED) == {"whiten_rewards", "max_grad_norm"}


def test_from_settings_reads_the_settings_then_the_overrides() -> None:
    settings = Settings(ppo_lr=1e-3, ppo_epochs=3, ppo_batch_size=8, policy_algorithm="rloo", rloo_k=4)
    config = PPOConfig.from_settings(settings, epochs=1, minibatches=None)
    assert (config.lr, config.epochs, config.batch_size) == (1e-3, 1, 8)
    assert config.minibatches == settings.ppo_minibatches  # None: no override
    assert (config.algorithm, config.rloo_k, config.prompts_per_iteration) == ("rloo", 4, 2)


def test_rloo_batch_must_split_into_whole_groups() -> None:
    with pytest.raises(ValueError, match="multiple of rloo_k"):
        PPOConfig.from_settings(Settings(ppo_batch_size=6, policy_algorithm="rloo", rloo_k=4))


def test_dpo_takes_dpo_samples_answers_per_prompt_and_a_batch_of_whole_groups() -> None:
    config = PPOConfig.from_settings(Settings(ppo_batch_size=8, policy_algorithm="dpo", dpo_beta=0.2))
    assert (config.prompts_per_iteration, config.answers_per_prompt, config.dpo_beta) == (4, 2, 0.2)
    assert not config.value_head and PPOConfig().value_head  # only PPO trains a value head
    with pytest.raises(ValueError, match="multiple of dpo_samples 2"):
        PPOConfig.from_settings(Settings(ppo_batch_size=7, policy_algorithm="dpo"))
    best_of_4 = PPOConfig.from_settings(Settings(ppo_batch_size=12, policy_algorithm="dpo", dpo_samples=4))
    assert (best_of_4.prompts_per_iteration, best_of_4.answers_per_prompt) == (3, 4)
    with pytest.raises(ValueError, match="multiple of dpo_samples 4"):
        PPOConfig.from_settings(Settings(ppo_batch_size=10, policy_algorithm="dpo", dpo_samples=4))


def test_raft_takes_raft_samples_answers_per_prompt_and_a_batch_of_whole_groups() -> None:
    config = PPOConfig.from_settings(Settings(ppo_batch_size=16, policy_algorithm="raft", raft_samples=8))
    assert (config.algorithm, config.answers_per_prompt, config.prompts_per_iteration) == ("raft", 8, 2)
    assert not config.value_head
    with pytest.raises(ValueError, match="multiple of raft_samples 8"):
        PPOConfig.from_settings(Settings(ppo_batch_size=12, policy_algorithm="raft", raft_samples=8))
