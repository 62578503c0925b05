"""Retention: which model versions and reward models to keep, and deleting the rest.

    kaizen models gc --dry-run      # what would be deleted, and why
    kaizen models gc                # delete it (a training round does this after it publishes)

Every round publishes a full copy of the policy (rejected ones too) and may add a reward model of
about the same size; without deleting, the registry's volume fills in days. Kept, always: the
champion, the canary, candidates (a decision is pending), v0 (the base model, hard links to the
prepared model: deleting it frees nothing, and the chat API falls back to it), and the last
`retention_keep_champions` earlier champions (what `kaizen models rollback` returns to). Deleted:
rejected versions beyond the newest `retention_keep_rejected` (their gate numbers stay in the
audit log's `delete` entry), and retired versions older than the kept champions. Reward models:
the current one and the newest `retention_keep_reward_models` in all are kept.

Versions are deleted through `Registry.delete` (under the registry's lock, decided on the state
as it is then); reward models by renaming each out of sight first (`.deleted-*`), so a reader
sees a whole folder or none. Which reward models exist is the trainer's layout: callers pass them
(trainer/upkeep.py `collect_garbage`, which also records the kaizen_retention_* metrics).
"""

from __future__ import annotations

import logging
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kaizen.core.registry import Registry
from kaizen.core.registry_schema import RegistryState, version_number
from kaizen.core.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class GcPlan:
    """What retention deletes (name → why) and keeps (name → why), with the bytes it frees."""

    versions: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    reward_models: dict[str, str] = field(default_factory=dict)
    kept_reward_models: dict[str, str] = field(default_factory=dict)
    bytes_freed: int = 0
    dry_run: bool = True

    def as_dict(self) -> dict[str, object]:
        return {"versions": self.versions, "kept": self.kept, "reward_models": self.reward_models,
                "kept_reward_models": self.kept_reward_models, "bytes_freed": self.bytes_freed,
                "dry_run": self.dry_run}


def choose_versions(state: RegistryState, names: list[str], *, keep_champions: int,
                    keep_rejected: int) -> tuple[dict[str, str], dict[str, str]]:
    """({version: why deleted}, {version: why kept}) for the versions `names` on disk."""
    kept: dict[str, str] = {}
    if "v0" in names:
        kept["v0"] = "the base model (hard links: deleting it frees nothing)"
    if state.champion in names:
        kept[state.champion] = "champion"
    if state.canary is not None and state.canary in names:
        kept[state.canary] = "canary"
    previous = [v for v in dict.fromkeys(reversed(state.previous_champions)) if v in names and v not in kept]
    for v in previous[:keep_champions]:
        kept[v] = "earlier champion (a rollback target)"
    stage_of = {v: (state.versions[v].stage if v in state.versions else "candidate") for v in names}
    rejected = sorted((v for v in names if stage_of[v] == "rejected" and v not in kept), key=version_number)
    for v in rejected[len(rejected) - keep_rejected:] if keep_rejected else []:
        kept[v] = "rejected, among the newest kept for inspection"
    delete: dict[str, str] = {}
    for v in names:
        if v in kept:
            continue
        vs = state.versions.get(v)
        if stage_of[v] == "rejected":
            delete[v] = f"rejected ({vs.reason if vs else 'no reason recorded'})"
        elif stage_of[v] == "retired":
            delete[v] = f"retired, older than the {keep_champions} earlier champions kept"
        else:
            kept[v] = f"{stage_of[v]}: awaiting a decision"
    return delete, kept


def choose_reward_models(folders: list[Path], current: Path | None, keep: int) -> tuple[dict[str, str],
                                                                                          dict[str, str]]:
    """({name: why deleted}, {name: why kept}) for reward-model folders given oldest first."""
    kept = {p.name: "newest" for p in folders[len(folders) - keep:]} if keep else {}
    if current is not None:
        kept[current.name] = "current"
    delete = {p.name: f"older than the newest {keep}" for p in folders if p.name not in kept}
    return delete, kept


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.stat().st_nlink == 1)


def collect(settings: Settings, *, reward_models: list[Path], current_reward_model: Path | None,
            dry_run: bool = False, who: str = "retention") -> GcPlan:
    """Plan retention (module docstring) and, unless `dry_run`, carry it out.

    `reward_models`: the trainer's reward-model folders, oldest first; `current_reward_model`:
    the one in use. Bytes freed count files with no other hard link (v0's are the base model's)."""
    registry = Registry(settings.registry_path)
    plan = GcPlan(dry_run=dry_run)

    def choose(state: RegistryState, names: list[str]) -> dict[str, str]:
        delete, kept = choose_versions(state, names, keep_champions=settings.retention_keep_champions,
                                       keep_rejected=settings.retention_keep_rejected)
        plan.versions, plan.kept = delete, kept
        plan.bytes_freed = sum(_size(registry.path(v)) for v in delete)
        return {} if dry_run else delete

    if registry.versions_dir.is_dir():
        if dry_run:
            choose(registry.state(), registry.names())
        else:
            registry.delete(choose, who=who)
    plan.reward_models, plan.kept_reward_models = choose_reward_models(
        reward_models, current_reward_model, settings.retention_keep_reward_models)
    by_name = {p.name: p for p in reward_models}
    for name in plan.reward_models:
        plan.bytes_freed += _size(by_name[name])
    if dry_run:
        return plan
    for name in plan.reward_models:
        folder = by_name[name]
        gone = folder.with_name(f".deleted-{name}-{uuid.uuid4().hex[:8]}")
        folder.rename(gone)  # out of sight at once, then removed
        shutil.rmtree(gone, ignore_errors=True)
    if plan.versions or plan.reward_models:
        log.info("retention deleted versions %s and reward models %s (%.0f MB)", sorted(plan.versions),
                 sorted(plan.reward_models), plan.bytes_freed / 1e6)
    return plan
