"""The training rounds' log and state, as both sides read them.

    kaizen rounds list                # read_rounds: <data_dir>/rounds/rounds.jsonl, newest first
    GET /admin/rounds                 # the same for the operator page

The trainer (trainer/round_record.py) writes these files; the chat API only reads them, so the reader
lives here, on the services side, and services/ never imports trainer/:
  - `<data_dir>/rounds/rounds.jsonl`: one JSON line per finished round (`ROUNDS_LOG`);
  - `<data_dir>/rounds/state.json`: the round in progress and its phase (`STATE_FILE`);
  - `<data_dir>/rounds/round.lock`: the flock the running round holds (`LOCK_FILE`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kaizen.core.settings import Settings

ROUNDS_LOG = "rounds.jsonl"
STATE_FILE = "state.json"
LOCK_FILE = "round.lock"


class RoundBusy(RuntimeError):
    """Another round holds the lock."""


def rounds_dir(settings: Settings) -> Path:
    return settings.data_dir / "rounds"


def state_file(settings: Settings) -> Path:
    return rounds_dir(settings) / STATE_FILE


def read_state(settings: Settings) -> dict[str, Any] | None:
    """The state file of the round in progress (or cut off by a crash); None without one."""
    try:
        data: dict[str, Any] = json.loads(state_file(settings).read_text())
        return data
    except (FileNotFoundError, ValueError):
        return None


@contextlib.contextmanager
def round_lock(settings: Settings) -> Iterator[None]:
    """Exclusive, non-blocking: raises RoundBusy when another process runs a round."""
    path = rounds_dir(settings) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RoundBusy(f"another training round holds {path}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def round_running(settings: Settings) -> bool:
    try:
        with round_lock(settings):
            return False
    except RoundBusy:
        return True


def read_rounds(settings: Settings, limit: int = 20) -> list[dict[str, Any]]:
    """The last `limit` rounds, newest first; a round in progress (or cut off by a crash)
    comes first with outcome "running" (or "interrupted") and its phase. For the operator page and `kaizen rounds list`."""
    out: list[dict[str, Any]] = []
    path = rounds_dir(settings) / ROUNDS_LOG
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))  # a torn last line after a crash is skipped
    out.reverse()
    state = read_state(settings)
    if state is not None:  # a state file without a lock holder is a round cut off by a crash
        out.insert(0, {**state, "outcome": "running" if round_running(settings) else "interrupted"})
    return out[:limit]
