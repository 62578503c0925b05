"""The first reward model may start from a preference model trained elsewhere (`reward_init`).

A reward model trained on marker votes in one data dir is the init of another: the other's first
refresh starts from it (its held-out accuracy before training is the init's, not None), trains
`reward_epochs`, records the init in its manifest, and is gated against the init's accuracy, not
chance, so votes that would unteach what the init knew are refused. All real: the tiny model, real
training, real SQLite stores.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kaizen.core.events import PreferenceEvent
from kaizen.core.settings import Settings
from tests.test_reward import marker_vote, refresh_settings, tiny_config
from trainer.reward import (RefreshPlan, RewardModelMissing, current_version, plan_refresh,
                            refresh_reward_model, reward_root)
from trainer.reward_model import read_manifest
from trainer.store import PreferenceStore


def stored(settings: Settings, votes: list[PreferenceEvent]) -> None:
    store = PreferenceStore(settings.preferences_db)
    try:
        store.add_many(votes)
    finally:
        store.close()


def test_the_first_refresh_starts_from_reward_init_and_is_gated_against_it(tmp_path: Path,
                                                                           tiny_model: Path) -> None:
    rng = random.Random(7)
    # the init: a reward model that learned the marker from 120 votes in a data dir of its own
    elsewhere = refresh_settings(tmp_path / "elsewhere", tiny_model)
    stored(elsewhere, [marker_vote(i, rng) for i in range(120)])
    made = refresh_reward_model(elsewhere, tiny_config(epochs=3))
    init = current_version(elsewhere)
    assert made.accepted and init is not None, made.reason

    # a new service whose first votes all prefer the unmarked answer (none held out), and whose
    # held-out votes prefer the marked one: training from the init on them unteaches the marker
    settings = refresh_settings(tmp_path / "service", tiny_model).model_copy(update={"reward_init": init})
    stored(settings, [marker_vote(i, rng, held_out=True) for i in range(24)]
           + [marker_vote(i, rng, flipped=True, held_out=False) for i in range(96)])
    plan = plan_refresh(settings, tiny_config(epochs=3))
    assert isinstance(plan, RefreshPlan) and plan.base == init and plan.init == str(init)
    assert plan.config.epochs == 3  # the init never saw these votes: reward_epochs, not the warm start's
    flipped = refresh_reward_model(settings, tiny_config(epochs=3))
    before = flipped.metrics["parent_holdout"]
    assert before is not None and before["accuracy"] > 0.9  # read from the init, before training
    assert not flipped.accepted, flipped.reason
    assert "the initial reward model (reward_init)'s" in flipped.reason, flipped.reason
    assert current_version(settings) is None

    # honest votes outnumbering the flipped ones: accepted, and the manifest names the init
    stored(settings, [marker_vote(i, rng, held_out=False) for i in range(240)])
    good = refresh_reward_model(settings, tiny_config(epochs=3))
    assert good.accepted and good.version == "rm-v1", good.reason
    manifest = read_manifest(reward_root(settings) / "rm-v1")
    assert manifest["init"] == str(init) and manifest["parent"] is None
    assert manifest["metrics"]["parent_holdout"]["accuracy"] > 0.9
    assert manifest["base_model"] == str(tiny_model)  # the lineage is still the policy's


def test_a_reward_init_without_a_model_is_a_clear_error(tmp_path: Path, tiny_model: Path) -> None:
    settings = refresh_settings(tmp_path, tiny_model).model_copy(update={"reward_init": tmp_path / "nothing"})
    stored(settings, [marker_vote(i, random.Random(1)) for i in range(40)])
    with pytest.raises(RewardModelMissing, match=r"reward_init .*nothing holds no config.json"):
        plan_refresh(settings, tiny_config())
