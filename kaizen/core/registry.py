"""The model registry: versions, their stages, and an audit log of every change.

Shared by the chat API (which serves what it says), the trainer (which
publishes into it) and the operator CLI. It is a folder, so it works on one
machine and on a shared volume (a PVC in Kubernetes):

    <registry>/versions/v0/          Hugging Face folder + manifest.json (immutable)
    <registry>/versions/v1/ ...
    <registry>/state.json            champion, canary + fraction, stage of each version
    <registry>/state.last-good.json  a copy of the last state written, for `kaizen models repair`
    <registry>/audit.jsonl           one line per change: who, when, what, why
    <registry>/.lock                 flock: one writer at a time across processes

Publishing is atomic: files are written into ``versions/.staging-*``, fsynced,
described by a manifest holding every file's sha256, and only then renamed to
``versions/vN``. A crash leaves at most a staging folder, which the next
writer removes; a half-written version never exists under its name.

Stages: ``candidate → canary → champion → retired``, and ``rejected`` (failed
the gate, or rolled back). ``state.json`` is replaced atomically (write, fsync,
rename) under the lock, and its ``generation`` grows with each change, so a
reader can tell cheaply whether anything changed.

A `state.json` that cannot be read (damaged, or edited by hand) does not stop readers: `state()`
rebuilds the state from the audit log (kaizen/core/registry_repair.py), or else the last good copy,
and warns; `kaizen models repair` writes the rebuilt state back. Retention (kaizen/core/retention.py)
deletes versions through `delete`: each gets an audit entry, and version numbers are never reused.

This class does the locking and the reading and writing; what the files hold and the errors are in
kaizen/core/registry_schema.py, the stage transitions in kaizen/core/registry_stages.py, a version
folder's checks and writing in kaizen/core/version_folder.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kaizen.core import registry_stages as stages
from kaizen.core.atomic_files import fsync_dir, write_atomic
from kaizen.core.registry_schema import (
    MANIFEST,
    VERSION_RE,
    AuditEntry,
    CorruptVersion,
    Manifest,
    RegistryError,
    RegistryState,
    Stage,
    VersionInfo,
    VersionState,
    now,
    version_number,
)
from kaizen.core.version_folder import check_files, check_importable, seal_version, sha256_file, stage_folder


class Registry:
    """One registry folder. Cheap to construct; every call re-reads the disk."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.state_file = self.root / "state.json"
        self.good_state_file = self.root / "state.last-good.json"
        self.audit_file = self.root / "audit.jsonl"
        self.lock_file = self.root / ".lock"

    # -- locking and state -------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock across processes (flock on `.lock`); also tidies crash leftovers."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        with self.lock_file.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                self._remove_staging()
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _remove_staging(self) -> None:
        for pattern in (".staging-*", ".deleted-*"):  # an unfinished publish, or a deletion's leftovers
            for p in self.versions_dir.glob(pattern):
                shutil.rmtree(p, ignore_errors=True)

    def state(self) -> RegistryState:
        """The current state; when `state.json` is unreadable, the one rebuilt from the audit log (or
        the last good copy), with a warning naming `kaizen models repair`; `CorruptState` if neither."""
        try:
            return RegistryState.model_validate_json(self.state_file.read_text())
        except FileNotFoundError:
            return RegistryState()
        except ValueError as exc:  # bad JSON, a wrong field, bytes that are not UTF-8
            from kaizen.core.registry_repair import recovered_state

            return recovered_state(self, f"{type(exc).__name__}: {str(exc).splitlines()[0]}")

    def _save(self, state: RegistryState, entries: list[AuditEntry]) -> RegistryState:
        """Write the new state (atomically) and its audit entries. Caller holds the lock."""
        state.generation += 1
        for e in entries:
            e.generation = state.generation
        # Audit first: a crash between the two leaves an entry for a change that did not
        # happen (visible, harmless), never a change without its entry.
        with self.audit_file.open("a") as f:
            for e in entries:
                f.write(e.model_dump_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        text = state.model_dump_json(indent=2)
        write_atomic(self.state_file, text)
        write_atomic(self.good_state_file, text)
        return state
    # -- reading versions ----------------------------------------------------------------

    def path(self, version: str) -> Path:
        version_number(version)
        return self.versions_dir / version

    def exists(self, version: str) -> bool:
        return (self.path(version) / MANIFEST).is_file()

    def manifest(self, version: str) -> Manifest:
        path = self.path(version) / MANIFEST
        try:
            return Manifest.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise RegistryError(f"no version {version} in the registry", status=404,
                                code="version_not_found") from None
        except ValueError as exc:
            raise CorruptVersion(version, f"unreadable manifest ({exc})") from None

    def names(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        names = [p.name for p in self.versions_dir.iterdir()
                 if VERSION_RE.match(p.name) and (p / MANIFEST).is_file()]
        return sorted(names, key=version_number)

    def info(self, version: str, state: RegistryState | None = None) -> VersionInfo:
        state = state or self.state()
        m = self.manifest(version)
        vs = state.versions.get(version) or VersionState(stage="candidate", changed=m.created)
        return VersionInfo(
            version=version, stage=vs.stage, stage_changed=vs.changed, stage_reason=vs.reason,
            parent=m.parent, created=m.created, reward_model=m.reward_model, training=m.training,
            gate=m.gate, path=str(self.path(version)), size_bytes=sum(f.size for f in m.files.values()),
        )

    def all_versions(self) -> list[VersionInfo]:
        state = self.state()
        out = []
        for v in self.names():
            try:
                out.append(self.info(v, state))
            except CorruptVersion:
                continue  # listed by `verify`, never served
        return out

    def lineage(self, version: str) -> list[str]:
        """The version, its parent, its parent's parent, ... down to v0."""
        chain = [version]
        seen = {version}
        while True:
            parent = self.manifest(chain[-1]).parent
            if parent is None or parent in seen:
                return chain
            chain.append(parent)
            seen.add(parent)

    def verify(self, version: str) -> Manifest:
        """Check every file against the manifest; raise `CorruptVersion` on any mismatch."""
        folder = self.path(version)
        if not folder.is_dir():
            raise RegistryError(f"no version {version} in the registry", status=404, code="version_not_found")
        m = self.manifest(version)
        check_files(folder, version, m)
        return m

    def audit(self, limit: int | None = None, version: str | None = None) -> list[AuditEntry]:
        if not self.audit_file.exists():
            return []
        entries = []
        for line in self.audit_file.read_text().splitlines():
            if line.strip():
                try:
                    e = AuditEntry.model_validate_json(line)
                except ValueError:
                    continue  # a torn last line after a crash
                if version is None or e.version == version:
                    entries.append(e)
        return entries[-limit:] if limit else entries

    # -- writing versions ----------------------------------------------------------------

    def _next_version(self) -> str:
        nums = [version_number(p.name) for p in self.versions_dir.iterdir() if VERSION_RE.match(p.name)]
        highest = self.state().highest_version  # versions deleted by retention keep their numbers
        if highest is not None:
            nums.append(highest)
        return f"v{max(nums) + 1 if nums else 0}"

    def _publish_staged(self, staging: Path, manifest_fields: dict[str, Any]) -> Manifest:
        """Hash, write the manifest, rename into place as the next version. Caller holds the lock."""
        return seal_version(staging, self.versions_dir / self._next_version(), manifest_fields)

    def _add(self, src: Path, *, link: bool, manifest_fields: dict[str, Any]) -> Manifest:
        """Stage `src` and publish it as the next version; the staging folder goes on any error.
        Caller holds the lock."""
        staging = stage_folder(self.versions_dir, src, link=link)
        try:
            return self._publish_staged(staging, manifest_fields)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def init_base(self, model_dir: Path, who: str = "system") -> str:
        """Register `model_dir` as v0, the first champion, if the registry is empty.

        Files are hard-linked where the filesystem allows (no copy of the weights).
        Returns the champion's name either way."""
        with self.locked():
            state = self.state()
            if self.names():
                if state.champion is None:
                    raise RegistryError(f"registry {self.root} has versions but no champion: "
                                        "promote one with `kaizen models promote V`")
                return state.champion
            model_dir = Path(model_dir)
            if not (model_dir / "config.json").is_file():
                raise RegistryError(f"{model_dir} is not a Hugging Face model folder (no config.json)",
                                    status=400, code="invalid_model")
            m = self._add(model_dir, link=True,
                          manifest_fields={"parent": None, "source": str(model_dir.resolve())})
            entries: list[AuditEntry] = []
            stages.set_stage(state, m.version, "champion", who, "base model", "init", entries)
            state.champion = m.version
            self._save(state, entries)
            return m.version

    def publish(self, src: Path, *, parent: str | None, who: str, why: str = "",
                reward_model: str | None = None, training: dict[str, Any] | None = None,
                gate: dict[str, Any] | None = None, rejected: bool = False) -> Manifest:
        """Copy the model folder `src` in as the next version (candidate, or rejected).

        The caller's folder is left as it was; the registry's copy is complete and
        fsynced before it gets its name."""
        src = Path(src)
        if not (src / "config.json").is_file():
            raise RegistryError(f"{src} is not a Hugging Face model folder (no config.json)",
                                status=400, code="invalid_model")
        with self.locked():
            m = self._add(src, link=False, manifest_fields={
                "parent": parent, "reward_model": reward_model,
                "training": training or {}, "gate": gate or {}})
            state = self.state()
            entries: list[AuditEntry] = []
            stage: Stage = "rejected" if rejected else "candidate"
            why = why or ("failed the gate" if rejected else "published")
            stages.set_stage(state, m.version, stage, who, why, "publish", entries, parent=parent)
            self._save(state, entries)
            return m

    def import_folder(self, src: Path, *, who: str, why: str = "") -> Manifest:
        """Register a Hugging Face folder trained elsewhere as the next version, a candidate.

        Refused with a `RegistryError` naming the reason unless `check_importable` passes against
        the champion. The copy is hashed from the source first and verified after the rename, so a
        version never differs from the folder it came from."""
        src = Path(src).resolve()
        state = self.state()
        if state.champion is None:
            raise RegistryError(f"registry {self.root} has no champion yet: start the chat API once "
                                "(`kaizen up`) so the base model is registered as v0", code="no_champion")
        files = check_importable(src, self.path(state.champion))
        source_sums = {str(p.relative_to(src)): sha256_file(p) for p in files}
        with self.locked():
            m = self._add(src, link=False,
                          manifest_fields={"parent": None, "source": str(src), "imported": True})
            changed = sorted(n for n, e in m.files.items() if source_sums.get(n) != e.sha256)
            if changed or set(m.files) != set(source_sums):
                shutil.rmtree(self.path(m.version), ignore_errors=True)
                raise RegistryError(f"cannot import {src}: files changed while being copied "
                                    f"({', '.join(changed) or 'file list'}); try again", code="invalid_model")
            state = self.state()
            entries: list[AuditEntry] = []
            stages.set_stage(state, m.version, "candidate", who, why or f"imported from {src}", "import",
                             entries, source=str(src))
            self._save(state, entries)
        self.verify(m.version)
        return m

    # -- stage changes (kaizen/core/registry_stages.py decides them; these lock, read and save) ------

    def _require(self, state: RegistryState, version: str) -> VersionState:
        if not self.exists(version):
            raise RegistryError(f"no version {version} in the registry", status=404, code="version_not_found")
        return state.versions.get(version) or VersionState(stage="candidate", changed=now())

    def set_canary(self, version: str, fraction: float, *, who: str, why: str = "",
                   expect: int | None = None) -> RegistryState:
        """Serve `version` to `fraction` of users beside the champion (or change the fraction)."""
        if not 0.0 < fraction <= 1.0:
            raise RegistryError(f"fraction must be in (0, 1], got {fraction}", status=400,
                                code="invalid_fraction")
        with self.locked():
            state = self.state()
            stages.expect_generation(state, expect)
            current = self._require(state, version)
            return self._save(state, stages.canary(state, version, current, fraction, who=who, why=why))

    def promote(self, version: str | None = None, *, who: str, why: str = "",
                expect: int | None = None) -> RegistryState:
        """Make `version` (default: the canary) the champion; the old champion retires."""
        with self.locked():
            state = self.state()
            stages.expect_generation(state, expect)
            version = version or state.canary
            if version is None:
                raise RegistryError("nothing to promote: no canary running and no version given")
            self._require(state, version)
            return self._save(state, stages.promote(state, version, who=who, why=why))

    def rollback(self, *, who: str, why: str = "", expect: int | None = None) -> RegistryState:
        """Withdraw the canary if one runs; otherwise return to the previous champion."""
        with self.locked():
            state = self.state()
            stages.expect_generation(state, expect)
            return self._save(state, stages.rollback(state, self.exists, who=who, why=why))

    def delete(self, choose: Callable[[RegistryState, list[str]], dict[str, str]], *,
               who: str) -> dict[str, str]:
        """Delete the versions `choose(state, names)` returns ({version: why}), decided under the lock
        on the current state; the champion and the canary are refused whatever it says. Each version
        is renamed out of sight at once (`.deleted-*`, gone from `names()`), then its audit entry
        (with the manifest's gate and training summary, which go with the folder) and the new state
        are written, then its files removed. Returns what was deleted."""
        with self.locked():
            state = self.state()
            chosen = choose(state, self.names())
            serving = {v for v in (state.champion, state.canary) if v is not None}
            assert not serving & set(chosen), f"retention chose a serving version: {serving & set(chosen)}"
            if not chosen:
                return {}
            entries: list[AuditEntry] = []
            trash: list[Path] = []
            highest = max([version_number(v) for v in self.names()] + [state.highest_version or 0])
            for version, why in chosen.items():
                summary = self._deletion_summary(version)
                gone = self.versions_dir / f".deleted-{version}-{uuid.uuid4().hex[:8]}"
                os.rename(self.path(version), gone)
                trash.append(gone)
                entries.append(stages.forget(state, version, who=who, why=why, summary=summary))
            fsync_dir(self.versions_dir)
            state.highest_version = highest
            self._save(state, entries)
            for p in trash:
                shutil.rmtree(p, ignore_errors=True)
            return chosen

    def _deletion_summary(self, version: str) -> dict[str, Any]:
        """What a deleted version's audit entry keeps of its manifest (which goes with the folder)."""
        try:
            m = self.manifest(version)
        except RegistryError as exc:
            return {"manifest": str(exc)}
        return {"parent": m.parent, "reward_model": m.reward_model,
                "size_bytes": sum(f.size for f in m.files.values()),
                "round_id": m.training.get("round_id"), "gate": m.gate}
