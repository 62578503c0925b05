"""A training round's bookkeeping: its context and state file, its record, its metrics.

    from trainer.round_record import RoundContext, finish   # the round (trainer/rounds.py) and its phases

`RoundContext` names the round and marks each phase in `<data_dir>/rounds/state.json`, written
atomically before the phase starts (what a round cut off by SIGKILL is recovered from).
`finish` ends a round with an outcome: its record goes to `events.jsonl` and `rounds.jsonl`
(what kaizen/core/rounds_log.py reads back), the state file and the work folder go, retention
runs after a round that published, and the Prometheus metrics of rounds and PPO iterations
are set (the trainer daemon sets them too, from the records a child round wrote).

Light at import (no torch): the daemon imports this module.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kaizen.core import metrics
from kaizen.core.atomic_files import write_atomic
from kaizen.core.rounds_log import rounds_dir, state_file
from kaizen.core.settings import Settings
from trainer import upkeep

log = logging.getLogger(__name__)


def json_line(path: Path, record: dict[str, Any]) -> None:
    """Append `record` as one JSON line to `path`, flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class RoundOptions:
    """How a round runs, beside the settings (`run_round`'s keywords)."""

    progress: bool = False
    """A progress bar over the PPO iterations (on a terminal)."""
    record_metrics: bool = True
    """Set the Prometheus metrics of rounds and PPO iterations."""


@dataclass
class RoundContext:
    """One round: its id, start, state (saved to the state file) and options."""

    settings: Settings
    round_id: str
    started: float
    state: dict[str, Any]
    options: RoundOptions = field(default_factory=RoundOptions)

    def phase(self, name: str, **extra: Any) -> None:
        self.state.update(phase=name, phase_started=datetime.now(UTC).isoformat(), **extra)
        self.save()
        log.info("round %s: %s", self.round_id, name)

    def save(self) -> None:
        write_atomic(state_file(self.settings), json.dumps(self.state, indent=2, default=str))

    @property
    def work(self) -> Path:
        return rounds_dir(self.settings) / "work" / self.round_id

    @property
    def events(self) -> Path:
        """events.jsonl: one JSON line per PPO iteration and per round."""
        return rounds_dir(self.settings) / "events.jsonl"


def finish(ctx: RoundContext, outcome: str, details: dict[str, Any]) -> dict[str, Any]:
    """End the round with `outcome` (published, rejected, skipped, abandoned, failed): log its
    record, drop the state file and work folder, run retention after a publish. Returns the record."""
    now = time.time()
    record = {k: v for k, v in ctx.state.items() if k not in ("phase_started",)}
    record.update(kind="round", outcome=outcome, ended=datetime.now(UTC).isoformat(), ended_ts=now,
                  seconds=now - ctx.started, **details)
    json_line(ctx.events, record)
    json_line(rounds_dir(ctx.settings) / "rounds.jsonl", record)
    state_file(ctx.settings).unlink(missing_ok=True)
    shutil.rmtree(ctx.work, ignore_errors=True)
    if ctx.options.record_metrics:
        record_round_metrics(record)
    if outcome in ("published", "rejected"):
        _retention(ctx.settings, record_metrics=ctx.options.record_metrics)
    log.info("training round %s: %s (%.0f s)", ctx.round_id, outcome, record["seconds"])
    return record


def _retention(settings: Settings, *, record_metrics: bool) -> None:
    """Retention after a round that published (trainer/upkeep.py), logged as a "retention" event."""
    rec = upkeep.retention(settings)
    if rec is not None:
        json_line(rounds_dir(settings) / "events.jsonl", rec)
        if record_metrics:
            upkeep.record_retention_metrics(rec)


def record_round_metrics(record: dict[str, Any]) -> None:
    outcome = record.get("outcome", "failed")
    metrics.ROUNDS.labels(outcome=outcome).inc()
    if record.get("space_refused"):
        metrics.DISK_SPACE_REFUSALS.labels(what=str(record["space_refused"])).inc()
    metrics.ROUND_DURATION.observe(float(record.get("seconds", 0.0)))
    if outcome != "failed":
        metrics.LAST_ROUND_COMPLETED.set(float(record.get("ended_ts", time.time())))
    gate = record.get("gate") or {}
    if gate.get("win_rate") is not None:
        metrics.GATE_WIN_RATE.set(float(gate["win_rate"]))
    if gate.get("lc_win_rate") is not None:
        metrics.GATE_LC_WIN_RATE.set(float(gate["lc_win_rate"]))
    if record.get("reward_accuracy") is not None:
        metrics.REWARD_MODEL_ACCURACY.set(float(record["reward_accuracy"]))


def record_iteration_metrics(it: dict[str, Any]) -> None:
    metrics.PPO_REWARD_MEAN.set(float(it["reward_mean"]))
    metrics.PPO_KL.set(float(it["kl"]))
    metrics.PPO_KL_COEF.set(float(it["kl_coef_next"]))
    metrics.PPO_ITERATIONS.inc()
    metrics.PPO_SAMPLES_PER_SECOND.set(float(it["samples_per_s"]))
    if it.get("pair_accuracy") is not None:  # DPO's (trainer/dpo.py); PPO and RLOO have none
        metrics.DPO_PAIR_ACCURACY.set(float(it["pair_accuracy"]))
