"""Housekeeping around a training round: free space before it, a killed round's /dev/shm
leftovers, retention after it.

    kaizen models gc [--dry-run]     # collect_garbage by hand (trainer/rounds.py runs it after a round)

trainer/rounds.py calls these under the round lock: `give_up` on a round cut off too often (with
the attempts and the phases it died in), `require_disk_space` before anything is written
(round_disk_space_factor x the champion's size + disk_reserve_bytes, on the data dir's and the
registry's volumes), `remove_sync_leftovers` at every start (a SIGKILLed round leaves its weight
sync folder, about the policy's float32 size, in RAM), `retention` after a round that published.
Light at import (the trainer's daemon imports it): torch-backed modules load when called.
"""

from __future__ import annotations

import importlib
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kaizen.core import metrics
from kaizen.core.disk import folder_bytes, require_free
from kaizen.core.registry import Registry
from kaizen.core.retention import GcPlan, collect
from kaizen.core.settings import Settings

log = logging.getLogger(__name__)


def cut_offs(prior: dict[str, Any]) -> list[dict[str, Any]]:
    """The attempts of a round cut off so far, the last one (`prior`, its state file) included: its
    phase, when, and the exit the daemon saw (if it did)."""
    return [*prior.get("cut_off", []), {"attempt": prior.get("attempt"), "phase": prior.get("phase"),
                                        "at": prior.get("phase_started"), "exit": prior.get("last_exit")}]


def give_up(settings: Settings, prior: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """(attempts, the reason recorded) for a round cut off round_max_attempts times."""
    cut = cut_offs(prior)
    how = "; ".join(f"attempt {c.get('attempt')} in phase {c.get('phase')!r}" +
                    (f" ({c['exit']})" if c.get("exit") else "") for c in cut)
    reason = (f"cut off {len(cut)} times, KAIZEN_ROUND_MAX_ATTEMPTS={settings.round_max_attempts}: {how}. "
              "A SIGKILL is usually the out-of-memory killer: give the trainer more memory, or lower "
              "KAIZEN_PPO_BATCH_SIZE / KAIZEN_REWARD_BATCH_SIZE; the next round starts on new votes")
    return cut, reason


def require_disk_space(settings: Settings) -> None:
    """`InsufficientSpace` unless the data dir's and the registry's volumes can take a round's files:
    a refreshed reward model, the candidate and the registry's copy (each about the champion's size)."""
    registry = Registry(settings.registry_path)
    champion = registry.state().champion
    size = folder_bytes(registry.path(champion) if champion else settings.model_dir)
    needed = int(size * settings.round_disk_space_factor) + settings.disk_reserve_bytes
    hint = (f"{settings.round_disk_space_factor:g} x the champion's {size / 1e6:,.0f} MB "
            f"(KAIZEN_ROUND_DISK_SPACE_FACTOR) + KAIZEN_DISK_RESERVE_BYTES; free space with "
            "`kaizen models gc`, or grow the volume")
    seen: set[int] = set()
    for path in (settings.data_dir, settings.registry_path):
        path.mkdir(parents=True, exist_ok=True)
        device = path.stat().st_dev
        if device not in seen:  # one volume for both: the need is for all the round's files at once
            seen.add(device)
            require_free(path, needed, what="round", hint=hint)


def remove_sync_leftovers(settings: Settings, prior: dict[str, Any] | None) -> None:
    """Remove the /dev/shm weight-sync folder a killed round left: the one its state file names, and
    any `kaizen-ppo-<pid>-*` in the sync base whose process is gone (killed before it was named)."""
    engine = importlib.import_module("trainer.rollout_engine")
    named = (prior or {}).get("sync_dir")
    if named and Path(named).name.startswith(engine.SYNC_PREFIX):
        shutil.rmtree(named, ignore_errors=True)
    for folder in engine.stale_sync_folders(engine.sync_base(settings.ppo_sync_dir)):
        log.info("removing %s, left by a killed round", folder)
        shutil.rmtree(folder, ignore_errors=True)


def collect_garbage(settings: Settings, *, dry_run: bool = False, who: str = "trainer") -> GcPlan:
    """Retention over the registry and the trainer's reward models (kaizen/core/retention.py)."""
    reward = importlib.import_module("trainer.reward")
    root = reward.reward_root(settings)
    numbered = [(int(m.group(1)), p) for p in root.iterdir()
                if (m := reward.VERSION_RE.match(p.name))] if root.is_dir() else []
    return collect(settings, reward_models=[p for _, p in sorted(numbered)],
                   current_reward_model=reward.current_version(settings), dry_run=dry_run, who=who)


def retention(settings: Settings) -> dict[str, Any] | None:
    """Retention after a round that published: the "retention" event to log, or None when it failed
    (logged; the next round or `kaizen models gc` tries again: it never fails a published round)."""
    try:
        plan = collect_garbage(settings, who="trainer")
    except Exception:  # noqa: BLE001 - retention must not undo a published round
        log.exception("retention after the round failed; `kaizen models gc` runs it by hand")
        return None
    return {"kind": "retention", "at": datetime.now(UTC).isoformat(), "versions": sorted(plan.versions),
            "reward_models": sorted(plan.reward_models), "bytes_freed": plan.bytes_freed}


def record_retention_metrics(rec: dict[str, Any]) -> None:
    metrics.RETENTION_DELETED.labels(kind="version").inc(len(rec.get("versions", [])))
    metrics.RETENTION_DELETED.labels(kind="reward_model").inc(len(rec.get("reward_models", [])))
    metrics.RETENTION_FREED_BYTES.inc(float(rec.get("bytes_freed", 0)))
