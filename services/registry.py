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
rebuilds the state from the audit log (services/registry_repair.py), or else the last good copy,
and warns; `kaizen models repair` writes the rebuilt state back. Retention (services/retention.py)
deletes versions through `delete`: each gets an audit entry, and version numbers are never reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from services.disk import InsufficientSpace, require_free

Stage = Literal["candidate", "canary", "champion", "retired", "rejected"]
STAGES: tuple[Stage, ...] = ("candidate", "canary", "champion", "retired", "rejected")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_VERSION_RE = re.compile(r"^v(\d+)$")
#: Files a servable version must have besides weights.
REQUIRED_FILES = ("config.json",)
#: config.json fields that must equal the serving engine's for weights to load in place.
SHAPE_FIELDS = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings")
#: Weight formats that are Python pickles: loading one can run any code, so an import refuses them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: An imported model must bring its tokenizer: a canary runs in an engine of its own, built from the folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class RegistryError(Exception):
    """A registry operation that cannot be done; the message says why, for an operator."""

    def __init__(self, message: str, *, status: int = 409, code: str = "conflict") -> None:
        super().__init__(message)
        self.status, self.code = status, code


class CorruptVersion(RegistryError):
    """A version's files do not match its manifest (or it cannot be served at all)."""

    def __init__(self, version: str, reason: str) -> None:
        super().__init__(f"version {version} is corrupt: {reason}", status=422, code="corrupt_version")
        self.version, self.reason = version, reason


class CorruptState(RegistryError):
    """`state.json` is unreadable and nothing to rebuild it from was found; the message names the repair."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=503, code="corrupt_registry_state")


class FileEntry(BaseModel):
    sha256: str
    size: int


class Manifest(BaseModel):
    """What a version is; written once at publish time, never changed."""

    format: int = MANIFEST_FORMAT
    version: str
    parent: str | None = None
    created: datetime
    reward_model: str | None = None
    """Reward-model version the policy was trained against."""
    source: str | None = None
    """Where v0 came from (the prepared base model), or the folder an imported version came from."""
    imported: bool = False
    """Brought in with `kaizen models import`, not trained here: never canaried automatically."""
    training: dict[str, Any] = Field(default_factory=dict)
    """Training metrics of the round that produced it."""
    gate: dict[str, Any] = Field(default_factory=dict)
    """Gate results: win rate over the champion, KL, sanity prompts, passed."""
    files: dict[str, FileEntry]


class VersionState(BaseModel):
    stage: Stage
    changed: datetime
    reason: str = ""


class RegistryState(BaseModel):
    """Everything that changes: which version serves, and every version's stage."""

    generation: int = 0
    champion: str | None = None
    canary: str | None = None
    canary_fraction: float = 0.0
    canary_started: datetime | None = None
    previous_champions: list[str] = Field(default_factory=list)
    """Earlier champions, most recent last: where `rollback` returns to."""
    versions: dict[str, VersionState] = Field(default_factory=dict)
    highest_version: int | None = None
    """The highest version number published so far, kept when retention deletes it: never reused."""


class AuditEntry(BaseModel):
    at: datetime
    generation: int
    action: str
    version: str | None
    who: str
    why: str
    from_stage: str | None = None
    to_stage: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class VersionInfo(BaseModel):
    """A version as operators see it: manifest + current stage."""

    version: str
    stage: Stage
    stage_changed: datetime
    stage_reason: str
    parent: str | None
    created: datetime
    reward_model: str | None
    training: dict[str, Any]
    gate: dict[str, Any]
    path: str
    size_bytes: int


def now() -> datetime:
    return datetime.now(UTC)


def version_number(version: str) -> int:
    m = _VERSION_RE.match(version)
    if not m:
        raise RegistryError(f"`{version}` is not a version name (v0, v1, ...)", status=400, code="invalid_version")
    return int(m.group(1))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so readers see the old file or the new one, never half; durable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `out` by one rename,
    on any error it is removed: readers see the old folder or the complete new one."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp made it private
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def model_shape(folder: Path) -> dict[str, Any]:
    """The config.json fields that decide whether weights fit an engine (SHAPE_FIELDS)."""
    config = json.loads((folder / "config.json").read_text())
    if not isinstance(config, dict):
        raise ValueError("config.json is not a JSON object")
    return {k: config.get(k) for k in SHAPE_FIELDS}


def check_importable(src: Path, champion_dir: Path) -> list[Path]:
    """Why the Hugging Face folder `src` cannot become a version, as a `RegistryError` naming the
    file and the fix; else the files an import copies. Checks: a readable config.json whose shape
    equals the champion's, safetensors weights only (no pickles anywhere), every safetensors file's
    header readable and every shard an index names present, a tokenizer; and, if the folder carries a
    Kaizen manifest.json (an export of another registry's version), every file's sha256 against it."""
    from safetensors import safe_open

    def refuse(reason: str) -> RegistryError:
        return RegistryError(f"cannot import {src}: {reason}", status=400, code="invalid_model")

    if not src.is_dir():
        raise refuse("not a folder")
    files = [p for p in _files_of(src) if not p.relative_to(src).parts[0].startswith(".")]
    names = {str(p.relative_to(src)) for p in files}
    pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise refuse(f"{', '.join(pickles)}: pickled weights (PyTorch .bin/.pt) can run code when loaded, so "
                     "Kaizen takes safetensors only; save them with `model.save_pretrained(DIR, "
                     "safe_serialization=True)` and leave the pickles out")
    if "config.json" not in names:
        raise refuse("no config.json: not a Hugging Face model folder")
    try:
        shape = model_shape(src)
    except ValueError as exc:
        raise refuse(f"config.json is not valid JSON ({exc})") from None
    weights = sorted(n for n in names if n.endswith(".safetensors"))
    if not weights:
        raise refuse("no .safetensors weights")
    for name in weights:
        try:
            with safe_open(str(src / name), framework="pt") as f:
                if not list(f.keys()):
                    raise refuse(f"{name} holds no tensors")
        except RegistryError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise refuse(f"{name} is not a readable safetensors file ({exc})") from None
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise refuse(f"model.safetensors.index.json is unreadable ({exc})") from None
        missing = sorted(shards - names)
        if missing:
            raise refuse(f"the index names shards that are not there: {', '.join(missing)}")
    if not any(t in names for t in TOKENIZER_FILES):
        raise refuse(f"no tokenizer ({' or '.join(TOKENIZER_FILES)}): save it next to the weights "
                     "with `tokenizer.save_pretrained(DIR)`")
    champion = model_shape(champion_dir)
    if shape != champion:
        diff = ", ".join(f"{k} {shape[k]!r} (champion {champion[k]!r})" for k in SHAPE_FIELDS
                         if shape[k] != champion[k])
        raise refuse(f"config.json does not fit the serving engine: {diff}; a canary must have the "
                     "champion's architecture and sizes")
    exported = src / MANIFEST
    if exported.is_file():
        try:
            listed = Manifest.model_validate_json(exported.read_text()).files
        except ValueError as exc:
            raise refuse(f"its manifest.json is unreadable ({exc})") from None
        for name, entry in listed.items():
            p = src / name
            if not p.is_file():
                raise refuse(f"{name} is listed in its manifest.json but missing")
            if p.stat().st_size != entry.size or sha256_file(p) != entry.sha256:
                raise refuse(f"{name} does not match the sha256 in its manifest.json (damaged in transit?)")
    return files


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
            from services.registry_repair import recovered_state

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

    def _set_stage(self, state: RegistryState, version: str, stage: Stage, who: str, why: str,
                   action: str, entries: list[AuditEntry], **details: Any) -> None:
        old = state.versions.get(version)
        at = now()  # one time for the state and its audit entry: a replay of the log gives the same state
        state.versions[version] = VersionState(stage=stage, changed=at, reason=why)
        entries.append(AuditEntry(at=at, generation=0, action=action, version=version, who=who, why=why,
                                  from_stage=old.stage if old else None, to_stage=stage, details=details))

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
            raise RegistryError(f"no version {version} in the registry", status=404, code="version_not_found") from None
        except ValueError as exc:
            raise CorruptVersion(version, f"unreadable manifest ({exc})") from None

    def names(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        names = [p.name for p in self.versions_dir.iterdir() if _VERSION_RE.match(p.name) and (p / MANIFEST).is_file()]
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
        for name in REQUIRED_FILES:
            if name not in m.files or not (folder / name).is_file():
                raise CorruptVersion(version, f"missing {name}")
        if not any(n.endswith(".safetensors") for n in m.files):
            raise CorruptVersion(version, "no .safetensors weights")
        on_disk = {str(p.relative_to(folder)) for p in _files_of(folder)}
        missing = sorted(set(m.files) - on_disk)
        if missing:
            raise CorruptVersion(version, f"missing files: {', '.join(missing)}")
        for name, entry in m.files.items():
            p = folder / name
            if p.stat().st_size != entry.size:
                raise CorruptVersion(version, f"{name} is {p.stat().st_size} bytes, manifest says {entry.size}")
            if sha256_file(p) != entry.sha256:
                raise CorruptVersion(version, f"{name} does not match its sha256")
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
        nums = [version_number(p.name) for p in self.versions_dir.iterdir() if _VERSION_RE.match(p.name)]
        highest = self.state().highest_version  # versions deleted by retention keep their numbers
        if highest is not None:
            nums.append(highest)
        return f"v{max(nums) + 1 if nums else 0}"

    def _stage_folder(self, src: Path, link: bool) -> Path:
        """Copy (or hard-link) `src` into a fresh staging folder and fsync every file; refused with a
        `RegistryError` (507) before anything is written when the registry's volume cannot hold a copy."""
        if not link:
            needed = sum(p.stat().st_size for p in _files_of(src))
            try:
                require_free(self.versions_dir, needed, what="publish",
                             hint="free space with `kaizen models gc` or grow the registry's volume")
            except InsufficientSpace as exc:
                raise RegistryError(str(exc), status=507, code="insufficient_storage") from None
        staging = self.versions_dir / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        for p in _files_of(src):
            rel = p.relative_to(src)
            if rel.parts[0].startswith("."):
                continue  # e.g. a leftover `.cache` of a tool
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if link:
                try:
                    os.link(p, dest)
                    continue
                except OSError:
                    pass
            shutil.copy2(p, dest)
            with dest.open("rb") as f:
                os.fsync(f.fileno())
        return staging

    def _publish_staged(self, staging: Path, manifest_fields: dict[str, Any]) -> Manifest:
        """Hash, write the manifest, rename into place. Caller holds the lock."""
        version = self._next_version()
        files = {str(p.relative_to(staging)): FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
                 for p in _files_of(staging)}
        manifest = Manifest(version=version, created=now(), files=files, **manifest_fields)
        mpath = staging / MANIFEST
        with mpath.open("w") as f:
            f.write(manifest.model_dump_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(staging)
        os.rename(staging, self.versions_dir / version)
        _fsync_dir(self.versions_dir)
        return manifest

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
            staging = self._stage_folder(model_dir, link=True)
            try:
                m = self._publish_staged(staging, {"parent": None, "source": str(model_dir.resolve())})
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            entries: list[AuditEntry] = []
            self._set_stage(state, m.version, "champion", who, "base model", "init", entries)
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
            staging = self._stage_folder(src, link=False)
            try:
                m = self._publish_staged(staging, {
                    "parent": parent, "reward_model": reward_model,
                    "training": training or {}, "gate": gate or {}})
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            state = self.state()
            entries: list[AuditEntry] = []
            stage: Stage = "rejected" if rejected else "candidate"
            self._set_stage(state, m.version, stage, who, why or ("failed the gate" if rejected else "published"),
                            "publish", entries, parent=parent)
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
            staging = self._stage_folder(src, link=False)
            try:
                m = self._publish_staged(staging, {"parent": None, "source": str(src), "imported": True})
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            changed = sorted(n for n, e in m.files.items() if source_sums.get(n) != e.sha256)
            if changed or set(m.files) != set(source_sums):
                shutil.rmtree(self.path(m.version), ignore_errors=True)
                raise RegistryError(f"cannot import {src}: files changed while being copied "
                                    f"({', '.join(changed) or 'file list'}); try again", code="invalid_model")
            state = self.state()
            entries: list[AuditEntry] = []
            self._set_stage(state, m.version, "candidate", who, why or f"imported from {src}", "import",
                            entries, source=str(src))
            self._save(state, entries)
        self.verify(m.version)
        return m

    # -- stage changes -------------------------------------------------------------------

    def _require(self, state: RegistryState, version: str) -> VersionState:
        if not self.exists(version):
            raise RegistryError(f"no version {version} in the registry", status=404, code="version_not_found")
        return state.versions.get(version) or VersionState(stage="candidate", changed=now())

    def _expect(self, state: RegistryState, expect: int | None) -> None:
        """Compare-and-set: refuse a change decided on another generation of the state than this one
        (an automatic decision applies to exactly what it judged, never to what changed since)."""
        if expect is not None and state.generation != expect:
            raise RegistryError(f"the registry changed since the decision (generation {expect} → "
                                f"{state.generation})", code="stale_decision")

    def set_canary(self, version: str, fraction: float, *, who: str, why: str = "",
                   expect: int | None = None) -> RegistryState:
        """Serve `version` to `fraction` of users beside the champion (or change the fraction)."""
        if not 0.0 < fraction <= 1.0:
            raise RegistryError(f"fraction must be in (0, 1], got {fraction}", status=400, code="invalid_fraction")
        with self.locked():
            state = self.state()
            self._expect(state, expect)
            vs = self._require(state, version)
            entries: list[AuditEntry] = []
            if state.canary == version:
                entries.append(AuditEntry(at=now(), generation=0, action="canary_fraction", version=version,
                                          who=who, why=why, from_stage="canary", to_stage="canary",
                                          details={"from": state.canary_fraction, "to": fraction}))
                state.canary_fraction = fraction
                return self._save(state, entries)
            if state.canary is not None:
                raise RegistryError(f"{state.canary} is already on canary: promote it or roll it back first")
            if version == state.champion:
                raise RegistryError(f"{version} is the champion already")
            if vs.stage == "rejected" and not why:
                raise RegistryError(f"{version} was rejected ({vs.reason}); give a reason to canary it anyway")
            self._set_stage(state, version, "canary", who, why or "canary", "canary", entries, fraction=fraction)
            state.canary, state.canary_fraction = version, fraction
            state.canary_started = state.versions[version].changed
            return self._save(state, entries)

    def promote(self, version: str | None = None, *, who: str, why: str = "",
                expect: int | None = None) -> RegistryState:
        """Make `version` (default: the canary) the champion; the old champion retires."""
        with self.locked():
            state = self.state()
            self._expect(state, expect)
            version = version or state.canary
            if version is None:
                raise RegistryError("nothing to promote: no canary running and no version given")
            self._require(state, version)
            if version == state.champion:
                raise RegistryError(f"{version} is the champion already")
            entries: list[AuditEntry] = []
            old = state.champion
            if old is not None:
                self._set_stage(state, old, "retired", who, f"replaced by {version}", "retire", entries)
                state.previous_champions.append(old)
            if state.canary is not None and state.canary != version:
                self._set_stage(state, state.canary, "candidate", who, f"canary ended: {version} promoted",
                                "canary_end", entries)
            self._set_stage(state, version, "champion", who, why or "promoted", "promote", entries, previous=old)
            state.champion = version
            state.canary, state.canary_fraction, state.canary_started = None, 0.0, None
            return self._save(state, entries)

    def rollback(self, *, who: str, why: str = "", expect: int | None = None) -> RegistryState:
        """Withdraw the canary if one runs; otherwise return to the previous champion."""
        with self.locked():
            state = self.state()
            self._expect(state, expect)
            entries: list[AuditEntry] = []
            if state.canary is not None:
                self._set_stage(state, state.canary, "rejected", who, why or "rolled back", "rollback", entries,
                                champion=state.champion)
                state.canary, state.canary_fraction, state.canary_started = None, 0.0, None
                return self._save(state, entries)
            while state.previous_champions:
                previous = state.previous_champions.pop()
                if self.exists(previous):
                    break
            else:
                raise RegistryError("nothing to roll back to: no canary and no previous champion")
            current = state.champion
            if current is not None:
                self._set_stage(state, current, "rejected", who, why or "rolled back", "rollback", entries,
                                restored=previous)
            self._set_stage(state, previous, "champion", who, f"restored by rollback of {current}",
                            "restore", entries)
            state.champion = previous
            return self._save(state, entries)

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
                try:
                    m = self.manifest(version)
                    summary: dict[str, Any] = {"parent": m.parent, "reward_model": m.reward_model,
                                               "size_bytes": sum(f.size for f in m.files.values()),
                                               "round_id": m.training.get("round_id"), "gate": m.gate}
                except RegistryError as exc:
                    summary = {"manifest": str(exc)}
                gone = self.versions_dir / f".deleted-{version}-{uuid.uuid4().hex[:8]}"
                os.rename(self.path(version), gone)
                trash.append(gone)
                old = state.versions.pop(version, None)
                entries.append(AuditEntry(at=now(), generation=0, action="delete", version=version, who=who,
                                          why=why, from_stage=old.stage if old else None, to_stage=None,
                                          details=summary))
            _fsync_dir(self.versions_dir)
            state.highest_version = highest
            self._save(state, entries)
            for p in trash:
                shutil.rmtree(p, ignore_errors=True)
            return chosen
