"""Rebuilding the registry's `state.json` when it cannot be read.

    kaizen models repair --dry-run            # what would be written, and from what
    kaizen models repair                      # write it (the damaged file is kept beside it)
    kaizen models repair --champion v7        # no audit log and no good copy: say what serves

`state.json` holds what serves; every change to it is written to `audit.jsonl` first, and a copy
of every state written is kept in `state.last-good.json`. So a damaged `state.json` (a disk
error, a hand edit) loses nothing: the last good copy is the state last written, and where it is
missing or older than the audit log, `replay` applies the audit log's entries in order and gets
the state back, generation included. Readers (`Registry.state()`, the chat API at start and at every
poll) use the rebuilt state in memory and log a warning; the next registry change, or `kaizen
models repair`, writes it. Where neither can be read, `CorruptState` names the repair command,
with `--champion` to say which version serves (every other version is then `retired`: nothing
is canaried by surprise).

A crash between the audit entry and the state write (see `Registry._save`) leaves an entry for a
change that was not saved; a replay applies it. That is the one way a replayed state can differ
from the last one written, and the audit log says it happened.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from kaizen.core.atomic_files import write_atomic
from kaizen.core.registry import Registry
from kaizen.core.registry_schema import (
    AuditEntry,
    CorruptState,
    RegistryError,
    RegistryState,
    VersionState,
    now,
    version_number,
)

log = logging.getLogger(__name__)
REPAIR_COMMAND = "kaizen models repair"
_warned: set[tuple[str, float]] = set()


def replay(entries: list[AuditEntry]) -> RegistryState:
    """The state the audit log's entries produce, applied in order (each `Registry` change logs
    every stage it sets, with its generation)."""
    state = RegistryState()
    highest = 0
    for e in entries:
        state.generation = max(state.generation, e.generation)
        v = e.version
        if v is None:
            continue
        highest = max(highest, version_number(v))
        if e.action == "delete":  # retention: the folder is gone, its number stays taken
            state.versions.pop(v, None)
            state.highest_version = highest
            continue
        if e.action == "canary_fraction":
            state.canary_fraction = float(e.details.get("to", state.canary_fraction))
            continue
        if e.to_stage is None:
            continue
        stage = VersionState.model_validate({"stage": e.to_stage, "changed": e.at, "reason": e.why}).stage
        state.versions[v] = VersionState(stage=stage, changed=e.at, reason=e.why)
        if state.canary == v and stage != "canary":
            state.canary, state.canary_fraction, state.canary_started = None, 0.0, None
        if e.action == "retire":
            state.previous_champions.append(v)
        elif e.action == "restore" and v in state.previous_champions:
            # rollback pops previous champions down to the one it restores
            while state.previous_champions and state.previous_champions.pop() != v:
                pass
        if stage == "champion":
            state.champion = v
        elif state.champion == v:
            state.champion = None
        if stage == "canary":
            state.canary, state.canary_started = v, e.at
            state.canary_fraction = float(e.details.get("fraction", state.canary_fraction))
    return state


def _read_good_copy(registry: Registry) -> RegistryState | None:
    try:
        return RegistryState.model_validate_json(registry.good_state_file.read_text())
    except (FileNotFoundError, ValueError):
        return None


def rebuild(registry: Registry) -> tuple[RegistryState, str] | None:
    """(state, where it came from): the last good copy when it is as new as the audit log (it is the
    state last written, exactly), else the audit log replayed (newer: a crash came between the
    two writes; or a registry from before the copy was kept); None if neither can be read."""
    entries = registry.audit()
    good = _read_good_copy(registry)
    if good is not None and good.generation >= max((e.generation for e in entries), default=-1):
        return good, f"the last good copy ({registry.good_state_file.name}, generation {good.generation})"
    if entries:
        return replay(entries), f"the audit log ({len(entries)} entries)"
    return None


def recovered_state(registry: Registry, error: str) -> RegistryState:
    """What `Registry.state()` returns for an unreadable `state.json`: the rebuilt state, with a
    warning once per damaged file; `CorruptState` naming the repair when nothing can rebuild it."""
    found = rebuild(registry)
    if found is None:
        raise CorruptState(f"registry state {registry.state_file} is unreadable ({error}) and there is no "
                           f"audit log or last good copy to rebuild it from: run `{REPAIR_COMMAND} "
                           "--champion V` with the version that should serve (see `ls "
                           f"{registry.versions_dir}`)")
    state, source = found
    try:
        key = (str(registry.state_file), registry.state_file.stat().st_mtime)
    except OSError:
        key = (str(registry.state_file), 0.0)
    if key not in _warned:
        _warned.add(key)
        log.warning("registry state %s is unreadable (%s): using the state rebuilt from %s (champion "
                    "%s, canary %s); run `%s` to write it back", registry.state_file, error, source,
                    state.champion, state.canary, REPAIR_COMMAND)
    return state


@dataclass
class RepairResult:
    needed: bool
    """False: state.json was readable, nothing was changed."""
    source: str
    state: RegistryState
    written: bool
    damaged_copy: str | None = None
    """Where the unreadable state.json was moved to (kept for inspection)."""


def _from_disk(registry: Registry, champion: str) -> RegistryState:
    names = registry.names()
    if champion not in names:
        raise RegistryError(f"--champion {champion}: no such version in {registry.versions_dir} (there are: "
                            f"{', '.join(names) or 'none'})", status=404, code="version_not_found")
    state = RegistryState(champion=champion,
                          highest_version=max(version_number(v) for v in names))
    for v in names:
        why = f"{REPAIR_COMMAND}: state rebuilt from the folders"
        state.versions[v] = VersionState(stage="champion" if v == champion else "retired", changed=now(),
                                         reason=why)
    return state


def repair(registry: Registry, *, who: str, dry_run: bool = False,
           champion: str | None = None) -> RepairResult:
    """Write a rebuilt `state.json` when the current one is unreadable (module docstring); the
    damaged file is renamed to `state.json.damaged-<time>` and the repair gets an audit entry."""
    with registry.locked():
        try:
            current = RegistryState.model_validate_json(registry.state_file.read_text())
            return RepairResult(False, "state.json is readable", current, False)
        except FileNotFoundError:
            if not registry.names():
                return RepairResult(False, "empty registry", RegistryState(), False)
        except ValueError:
            pass
        found = rebuild(registry) if champion is None else None
        if found is None:
            if champion is None:
                raise CorruptState(f"nothing to rebuild {registry.state_file} from (no audit log, no last "
                                   f"good copy): run `{REPAIR_COMMAND} --champion V` with the version that "
                                   "should serve")
            state = _from_disk(registry, champion)
            source = f"the version folders, champion {champion} (given)"
        else:
            state, source = found
        if dry_run:
            return RepairResult(True, source, state, False)
        damaged = None
        if registry.state_file.exists():
            stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
            damaged_path = registry.state_file.with_name(f"{registry.state_file.name}.damaged-{stamp}")
            registry.state_file.rename(damaged_path)
            damaged = str(damaged_path)
        entry = AuditEntry(at=now(), generation=0, action="repair", version=None, who=who,
                           why=f"state.json rebuilt from {source}", details={"damaged_copy": damaged})
        state.generation += 1
        entry.generation = state.generation
        with registry.audit_file.open("a") as f:
            f.write(entry.model_dump_json() + "\n")
        text = state.model_dump_json(indent=2)
        write_atomic(registry.state_file, text)
        write_atomic(registry.good_state_file, text)
        return RepairResult(True, source, state, True, damaged)
