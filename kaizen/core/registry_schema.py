"""The registry's vocabulary: stage names, the records its files hold, and its errors.

`Manifest` is a version's `manifest.json` (written once at publish time), `RegistryState` is
`state.json` (which version serves, every version's stage), `AuditEntry` is one line of
`audit.jsonl`. The registry itself (kaizen/core/registry.py), its stage transitions
(kaizen/core/registry_stages.py), its version folders (kaizen/core/version_folder.py) and its repair
(kaizen/core/registry_repair.py) all speak in these terms.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

Stage = Literal["candidate", "canary", "champion", "retired", "rejected"]
STAGES: tuple[Stage, ...] = ("candidate", "canary", "champion", "retired", "rejected")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
VERSION_RE = re.compile(r"^v(\d+)$")


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
    m = VERSION_RE.match(version)
    if not m:
        raise RegistryError(f"`{version}` is not a version name (v0, v1, ...)", status=400,
                            code="invalid_version")
    return int(m.group(1))
