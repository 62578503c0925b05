"""Free space on the volumes Kaizen writes big files to, checked before writing.

    from kaizen.core.disk import require_free
    require_free(path, needed, what="round", hint="run `kaizen models gc`")

A training round writes a reward model, a candidate and the registry's copy of it (each about
the model's size); PPO's weight sync writes the policy into /dev/shm. A write that meets a full
volume half-way leaves a half-written file and an error from deep inside safetensors or
shutil; checking first gives the operator the numbers and what to do instead, and nothing is
written. `free_bytes` is the one place the free space is read (shutil.disk_usage).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from kaizen.core import metrics

log = logging.getLogger(__name__)


class InsufficientSpace(RuntimeError):
    """Too little free space for a write that has not started; the message gives the numbers."""

    def __init__(self, what: str, path: Path, free: int, needed: int, hint: str) -> None:
        super().__init__(f"not enough free space for the {what}: {path} has {_mb(free)} free, "
                         f"it needs {_mb(needed)}; {hint}")
        self.what, self.path, self.free, self.needed = what, path, free, needed


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (a folder about to be created lives there)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer can still write on the volume holding `path`."""
    return int(shutil.disk_usage(existing(path)).free)


def folder_bytes(path: Path) -> int:
    """Total size of the files under `path` (0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def require_free(path: Path, needed: int, *, what: str, hint: str) -> int:
    """Raise `InsufficientSpace` unless the volume of `path` has `needed` bytes free; else the
    free bytes. (Refusals are counted where they are recorded: a round's record, see trainer/rounds.py.)"""
    free = free_bytes(path)
    if free < needed:
        raise InsufficientSpace(what, existing(path), free, needed, hint)
    return free


def record_free(volumes: dict[str, Path]) -> None:
    """`kaizen_disk_free_bytes{volume}` for each named folder (the trainer sets it at every check)."""
    for name, path in volumes.items():
        try:
            metrics.DISK_FREE_BYTES.labels(volume=name).set(free_bytes(path))
        except OSError as exc:  # a view for operators: never fail the caller
            log.warning("cannot read the free space of %s: %s", path, exc)
