"""Training rounds: refresh the reward model, PPO from the champion, gate, publish.

    python -m trainer.rounds run      # one round now (what the trainer daemon starts in a child process)
    kaizen rounds run | list          # the same from the CLI; list reads <data_dir>/rounds/rounds.jsonl

A round, in order:
  1. refresh: when votes arrived since the current reward model, `refresh_reward_model` (its own
     gate keeps the better RM); no RM at all: the round is skipped;
  2. PPO: `ppo_iterations` iterations from the registry's champion (trainer/ppo.py), prompts are
     the users' turns stored with the votes (held-out slice excluded) plus `ppo_prompt_file`
     (trainer/round_inputs.py);
  3. gate (trainer/gate.py, the decision a pure `gate_verdict`): on held-out prompts (the store's
     stable-hash holdout, never trained on) the candidate's sampled answers beat the champion's by
     RM win rate >= gate_min_win (ties, rewards within gate_tie_margin of each other or the same
     answer, count half), its mean KL to the reference (the champion) is <= gate_max_kl, and every
     sanity prompt's greedy answer matches its expected regex;
  4. publish: `Registry.publish` (rejected=True when the gate fails: kept, never served) and the
     model event.

Crash safety: `<data_dir>/rounds/state.json` names the round and its phase, written atomically
before each phase; the candidate folder is complete before the gate phase starts; the registry
publishes atomically. After SIGKILL the next round says what it does: "resuming" (the candidate
exists: gate and publish again; or the registry already holds the round's version: just record
it) or "restarting" (anything earlier). Votes live in the store, which a round only reads.
One round at a time: an flock on `<data_dir>/rounds/round.lock`.

A round that keeps being cut off (the out-of-memory killer's SIGKILL) is not restarted forever:
each start counts an `attempt` in the state file, the daemon waits `round_retry_backoff` (doubled
per attempt) before the next, and the start after `round_max_attempts` records the round as
failed, with the phases it died in, and leaves it. Each start first removes the /dev/shm weight
sync folder a killed round left (named in the state file; or any `kaizen-ppo-<pid>-*` whose
process is gone). Before anything is written, a round checks the free space on the data dir's
and the registry's volumes (`round_disk_space_factor` x the champion's size + `disk_reserve_bytes`)
and fails at once, with the numbers, when it is short. After it publishes it runs retention
(kaizen/core/retention.py), the same as `kaizen models gc`. These chores live in trainer/upkeep.py.

Logs: one JSON line per PPO iteration and per round in `<data_dir>/rounds/events.jsonl`; round
records also in `rounds.jsonl` (what kaizen/core/rounds_log.py's `read_rounds` and `kaizen rounds
list` show).

Several training processes (KAIZEN_TRAIN_NPROC_PER_NODE / KAIZEN_TRAIN_NNODES; the daemon starts
the round under torchrun): rank 0 leads the round as above, alone with the lock, the store, the
engine, the gate and the registry; the other ranks `follow` it: they wait for its commands
("refresh": train the reward model on this plan; "ppo": run PPO on these prompts) and run their
share of that training beside it (trainer/round_crew.py, trainer/distributed.py), until "done".
A rank that dies fails every rank's next collective: rank 0 records the round as failed (or,
killed itself, leaves the state file that the next round recovers from); nothing is published
either way.

Where things are: this module starts a round (recovery, attempts, the disk check) and is the
child process's entry point; the phases (refresh -> train candidate -> gate -> publish) are in
trainer/round_phases.py; the state file, the records and the metrics in trainer/round_record.py;
the prompts and whether a round is due in trainer/round_inputs.py; the other ranks in
trainer/round_crew.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from kaizen.core.disk import InsufficientSpace
from kaizen.core.log_setup import setup_logging
from kaizen.core.registry import Registry
from kaizen.core.rounds_log import RoundBusy, read_state, round_lock, rounds_dir
from kaizen.core.settings import Settings, get_settings
from trainer import distributed, upkeep
from trainer.rollout_engine import RolloutEngine
from trainer.round_crew import Crew, follow
from trainer.round_phases import run_phases
from trainer.round_record import RoundContext, RoundOptions, finish
from trainer.store import PreferenceStore

log = logging.getLogger(__name__)


def _published_by(settings: Settings, round_id: str) -> tuple[str, str] | None:
    """(version, stage) the registry holds from round `round_id`; None: none."""
    for info in Registry(settings.registry_path).all_versions():
        if info.training.get("round_id") == round_id:
            return info.version, info.stage
    return None


def _recover(settings: Settings) -> tuple[dict[str, Any] | None, str]:
    """What a crashed round left: (state to resume from or None, what we do, in words)."""
    state = read_state(settings)
    if state is None:
        return None, "fresh round"
    rid, phase = state.get("round_id"), state.get("phase")
    published = _published_by(settings, str(rid))
    if published is not None:
        version, stage = published
        return {**state, "phase": "published", "version": version, "stage": stage}, \
            f"resuming round {rid}: the registry already holds its {version} ({stage}); recording it"
    candidate = rounds_dir(settings) / "work" / str(rid) / "candidate"
    if phase in ("gate", "publish") and (candidate / "config.json").is_file():
        return state, f"resuming round {rid} at the gate: its candidate was saved before the crash"
    shutil.rmtree(rounds_dir(settings) / "work" / str(rid), ignore_errors=True)
    return None, f"restarting: round {rid} was cut off in phase {phase!r} before its candidate was saved"


def run_round(settings: Settings, *, engine: RolloutEngine | None = None,
              stop: threading.Event | None = None, progress: bool = False, record_metrics: bool = True,
              crew: Crew | None = None) -> dict[str, Any]:
    """One training round (module docstring). Returns its record, as logged in rounds.jsonl.

    `engine`: a RolloutEngine to reuse (tests share one); otherwise one is started on the champion
    and shut down at the end. `stop`: set it (SIGTERM) to abandon the round between PPO iterations.
    `crew`: the other training ranks when this is rank 0 of several.
    """
    options = RoundOptions(progress=progress, record_metrics=record_metrics)
    with round_lock(settings):
        prior = read_state(settings)  # what a round cut off before this one left, if anything
        upkeep.remove_sync_leftovers(settings, prior)
        resume, how = _recover(settings)
        log.info("training round: %s", how)
        if resume is not None and resume.get("phase") == "published":
            ctx = RoundContext(settings, resume["round_id"], time.time(), resume, options)
            return finish(ctx, "published" if resume["stage"] != "rejected" else "rejected",
                          {"version": resume["version"], "recovery": how})
        attempts = int(prior.get("attempt", 0)) if prior else 0
        if prior is not None and attempts >= settings.round_max_attempts:
            return _give_up(settings, prior, options)
        ctx = _start(settings, prior, resume, how, options)
        try:
            upkeep.require_disk_space(settings)
        except InsufficientSpace as exc:
            log.error("training round %s refused: %s", ctx.round_id, exc)
            return finish(ctx, "failed", {"error": str(exc), "space_refused": exc.what})
        ctx.save()  # the attempt counts from here, whatever kills the round next
        try:
            return run_phases(ctx, engine, stop, crew or Crew(), resuming=resume is not None)
        except Exception as exc:
            log.exception("training round %s failed", ctx.round_id)
            shutil.rmtree(ctx.work, ignore_errors=True)
            details = {"error": f"{type(exc).__name__}: {exc}"}
            if isinstance(exc, InsufficientSpace):
                details["space_refused"] = exc.what
            return finish(ctx, "failed", details)


def _start(settings: Settings, prior: dict[str, Any] | None, resume: dict[str, Any] | None, how: str,
           options: RoundOptions) -> RoundContext:
    """The round's context: the id of the round it resumes or restarts, else a new one; this
    start counted as one more attempt, the phases the earlier starts died in recorded."""
    attempts = int(prior.get("attempt", 0)) if prior else 0
    rid = str((resume or prior or {}).get("round_id") or
              datetime.now(UTC).strftime("r%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6])
    store = PreferenceStore(settings.preferences_db)
    try:
        mark = store.last_rowid()
    finally:
        store.close()
    state = resume or {"round_id": rid, "started": datetime.now(UTC).isoformat(), "store_mark": mark}
    state["recovery"] = how
    state["attempt"] = attempts + 1
    if prior is not None:
        state["cut_off"] = upkeep.cut_offs(prior)
    return RoundContext(settings, rid, time.time(), state, options)


def _give_up(settings: Settings, prior: dict[str, Any], options: RoundOptions) -> dict[str, Any]:
    """The start after `round_max_attempts` cut-off starts: record the round as failed and leave it."""
    cut, reason = upkeep.give_up(settings, prior)
    log.error("training round %s failed: %s", prior.get("round_id"), reason)
    ctx = RoundContext(settings, str(prior.get("round_id")), time.time(), {**prior, "cut_off": cut}, options)
    return finish(ctx, "failed", {"error": reason, "reason": reason})


# -- child-process entry point ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.rounds run`: one round; SIGTERM abandons it between PPO iterations.
    Exit codes: 0 finished (any outcome but failed), 1 failed, 75 another round is running."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["run"]:
        print("usage: python -m trainer.rounds run", file=sys.stderr)
        return 2
    settings = get_settings()
    setup_logging(settings)
    stop = threading.Event()

    def _term(signum: int, _frame: Any) -> None:
        log.info("signal %d: abandoning the round after the current step", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    dist = distributed.init(settings)  # the one-process job unless torchrun started us
    try:
        if not dist.is_main:
            follow(settings, dist, stop)
            return 0
        crew = Crew(dist if dist.enabled else None)
        try:
            record = run_round(settings, stop=stop, progress=sys.stderr.isatty(), crew=crew)
        except RoundBusy as exc:
            log.warning("%s", exc)
            return 75
        finally:
            crew.dismiss()
    finally:
        distributed.shutdown()
    print(json.dumps({k: record.get(k) for k in ("round_id", "outcome", "version", "reason", "error")}),
          flush=True)
    return 1 if record["outcome"] == "failed" else 0


def _exit(code: int) -> None:
    """Leave the process. Under torchrun, skip the interpreter's teardown: the round's state
    is already committed atomically, and tearing down gloo's and the engine client's C++
    threads after the process group is gone sometimes aborts the process ("terminate called
    without an active exception", SIGABRT), which torchrun reports as a failed round."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    _exit(main())
