"""The registry's stage transitions, as changes to a `RegistryState` in memory.

Stages: ``candidate → canary → champion → retired``, and ``rejected`` (failed the gate, or rolled
back). Each function here checks that a change is allowed, applies it to the state it is given,
and returns the audit entries that describe it (one per stage set, so a replay of the audit log
gives the same state: kaizen/core/registry_repair.py). It touches no file: `Registry`
(kaizen/core/registry.py) takes the lock, reads the state, calls one of these and saves the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kaizen.core.registry_schema import AuditEntry, RegistryError, RegistryState, Stage, VersionState, now


def set_stage(state: RegistryState, version: str, stage: Stage, who: str, why: str,
              action: str, entries: list[AuditEntry], **details: Any) -> None:
    """Put `version` on `stage` and append the audit entry that says so."""
    old = state.versions.get(version)
    at = now()  # one time for the state and its audit entry: a replay of the log gives the same state
    state.versions[version] = VersionState(stage=stage, changed=at, reason=why)
    entries.append(AuditEntry(at=at, generation=0, action=action, version=version, who=who, why=why,
                              from_stage=old.stage if old else None, to_stage=stage, details=details))


def expect_generation(state: RegistryState, expect: int | None) -> None:
    """Compare-and-set: refuse a change decided on another generation of the state than this one
    (an automatic decision applies to exactly what it judged, never to what changed since)."""
    if expect is not None and state.generation != expect:
        raise RegistryError(f"the registry changed since the decision (generation {expect} → "
                            f"{state.generation})", code="stale_decision")


def canary(state: RegistryState, version: str, current: VersionState, fraction: float, *,
           who: str, why: str) -> list[AuditEntry]:
    """Serve `version` (now on `current`) to `fraction` of users beside the champion, or change the
    fraction of the running canary."""
    entries: list[AuditEntry] = []
    if state.canary == version:
        entries.append(AuditEntry(at=now(), generation=0, action="canary_fraction", version=version,
                                  who=who, why=why, from_stage="canary", to_stage="canary",
                                  details={"from": state.canary_fraction, "to": fraction}))
        state.canary_fraction = fraction
        return entries
    if state.canary is not None:
        raise RegistryError(f"{state.canary} is already on canary: promote it or roll it back first")
    if version == state.champion:
        raise RegistryError(f"{version} is the champion already")
    if current.stage == "rejected" and not why:
        raise RegistryError(f"{version} was rejected ({current.reason}); give a reason to canary it anyway")
    set_stage(state, version, "canary", who, why or "canary", "canary", entries, fraction=fraction)
    state.canary, state.canary_fraction = version, fraction
    state.canary_started = state.versions[version].changed
    return entries


def promote(state: RegistryState, version: str, *, who: str, why: str) -> list[AuditEntry]:
    """Make `version` the champion; the old champion retires, a canary other than `version` ends."""
    if version == state.champion:
        raise RegistryError(f"{version} is the champion already")
    entries: list[AuditEntry] = []
    old = state.champion
    if old is not None:
        set_stage(state, old, "retired", who, f"replaced by {version}", "retire", entries)
        state.previous_champions.append(old)
    if state.canary is not None and state.canary != version:
        set_stage(state, state.canary, "candidate", who, f"canary ended: {version} promoted",
                  "canary_end", entries)
    set_stage(state, version, "champion", who, why or "promoted", "promote", entries, previous=old)
    state.champion = version
    state.canary, state.canary_fraction, state.canary_started = None, 0.0, None
    return entries


def rollback(state: RegistryState, exists: Callable[[str], bool], *, who: str, why: str) -> list[AuditEntry]:
    """Withdraw the canary if one runs; otherwise return to the most recent previous champion whose
    folder `exists` (retention may have deleted older ones)."""
    entries: list[AuditEntry] = []
    if state.canary is not None:
        set_stage(state, state.canary, "rejected", who, why or "rolled back", "rollback", entries,
                  champion=state.champion)
        state.canary, state.canary_fraction, state.canary_started = None, 0.0, None
        return entries
    while state.previous_champions:
        previous = state.previous_champions.pop()
        if exists(previous):
            break
    else:
        raise RegistryError("nothing to roll back to: no canary and no previous champion")
    current = state.champion
    if current is not None:
        set_stage(state, current, "rejected", who, why or "rolled back", "rollback", entries,
                  restored=previous)
    set_stage(state, previous, "champion", who, f"restored by rollback of {current}", "restore", entries)
    state.champion = previous
    return entries


def forget(state: RegistryState, version: str, *, who: str, why: str, summary: dict[str, Any]) -> AuditEntry:
    """Drop a deleted version from the state; the audit entry keeps `summary` (what its manifest said)."""
    old = state.versions.pop(version, None)
    return AuditEntry(at=now(), generation=0, action="delete", version=version, who=who, why=why,
                      from_stage=old.stage if old else None, to_stage=None, details=summary)
