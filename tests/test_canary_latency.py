"""The canary's latency rule: a slower canary is rolled back, noise is not (real registry and
store; the health numbers are set as the API records them)."""

from __future__ import annotations

from collections import deque
from pathlib import Path

from services.comparisons import ComparisonStore
from kaizen.core.registry import Registry
from services.rollout import Rollout
from services.rollout_health import VersionHealth
from tests.conftest import make_settings
from tests.test_registry import fake_model

COLLECTING = {"verdict": "collecting", "reason": "collecting votes", "votes": 0}


def judge_with(tmp_path: Path, champion_ttft: float, canary_ttft: float) -> tuple[str, str]:
    settings = make_settings(tmp_path / "data", canary_min_requests=20)
    registry = Registry(settings.registry_path)
    registry.init_base(fake_model(tmp_path / "m0", "base"))
    registry.publish(fake_model(tmp_path / "m1", "next"), parent="v0", who="test")
    state = registry.set_canary("v1", 0.5, who="test")
    store = ComparisonStore.from_settings(settings)
    try:
        rollout = Rollout(settings, store)
        rollout.health = {"v0": VersionHealth(requests=40, ttft=deque([champion_ttft] * 40)),
                          "v1": VersionHealth(requests=40, ttft=deque([canary_ttft] * 40))}
        return rollout.judge(state, dict(COLLECTING))
    finally:
        store.close()


def test_a_much_slower_canary_is_rolled_back(tmp_path: Path) -> None:
    verdict, why = judge_with(tmp_path, champion_ttft=0.2, canary_ttft=0.9)
    assert verdict == "rollback" and "time to first token" in why


def test_milliseconds_on_a_small_model_are_not_a_slower_version(tmp_path: Path) -> None:
    """3.6x the champion's 16 ms is 42 ms more: noise (a freshly loaded engine's first answers, a busy
    CI machine). It rolled back the loop benchmark's first version; only a difference above
    canary_min_ttft_increase_s counts."""
    verdict, _ = judge_with(tmp_path, champion_ttft=0.016, canary_ttft=0.058)
    assert verdict == "collecting"
