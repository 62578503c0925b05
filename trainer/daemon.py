"""The trainer process: consume votes into the store, and start training rounds.

    kaizen train            # daemon until SIGINT/SIGTERM
    kaizen train --once     # drain what is on the topic now, run one round, exit

Exposes Prometheus metrics on KAIZEN_TRAINER_PORT; `kaizen_trainer_ready` is
1 once the consumer has joined its group, which `kaizen up` waits for.

A round (trainer/rounds.py) starts when KAIZEN_MIN_NEW_PREFERENCES votes arrived since the last
round started, or KAIZEN_ROUND_INTERVAL passed since it ended with at least one new vote. It runs
in a child process (`python -m trainer.rounds run`): the Kafka consumer must keep polling (its
max_poll_interval is 10 s) while PPO holds a core for minutes, and vLLM's engine wants its own
process tree. The round's file lock keeps rounds from overlapping. The child logs JSON lines;
this process follows them into its Prometheus metrics. SIGTERM stops the consumer and passes
SIGTERM to the round, which abandons itself between PPO iterations.

A round process that dies (SIGKILL from the out-of-memory killer, a crash) leaves its state file;
the daemon writes how it ended there (`last_exit`) and starts it again only after
KAIZEN_ROUND_RETRY_BACKOFF, doubled with each attempt; after KAIZEN_ROUND_MAX_ATTEMPTS starts the
round itself records that it failed (trainer/rounds.py).
"""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from prometheus_client import start_http_server

from kaizen.core import metrics, rounds_log
from kaizen.core.broker import ensure_topics
from kaizen.core.disk import record_free
from kaizen.core.atomic_files import write_atomic
from kaizen.core.settings import Settings
from trainer import round_inputs, round_record, upkeep
from trainer.consumer import PreferenceConsumer
from trainer.reward import current_version
from trainer.store import PreferenceStore, holdout_share, prompt_key

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
#: What the scheduler saw at its last check, for the operator page (`GET /admin/schedule`).
SCHEDULE_FILE = "schedule.json"


class MetricsFollower:
    """Reads new lines of <data_dir>/rounds/events.jsonl and records them as metrics."""

    def __init__(self, settings: Settings) -> None:
        self.path = rounds_log.rounds_dir(settings) / "events.jsonl"
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open() as f:
            f.seek(self.offset)
            while (line := f.readline()).endswith("\n"):
                self.offset = f.tell()
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("kind") == "iteration":
                    round_record.record_iteration_metrics(rec)
                elif rec.get("kind") == "round":
                    round_record.record_round_metrics(rec)
                elif rec.get("kind") == "retention":
                    upkeep.record_retention_metrics(rec)


class RoundScheduler:
    """Decides when a round is due and runs it as a child process, one at a time."""

    def __init__(self, settings: Settings, check_every_s: float = 5.0) -> None:
        self.settings = settings
        self.check_every_s = check_every_s
        self.child: subprocess.Popen[bytes] | None = None
        self.started_at = time.time()
        self._next_check = 0.0
        self.follower = MetricsFollower(settings)

    def due(self) -> str | None:
        """Why a round is due now, or None. A cut-off round comes first, after its backoff: new votes
        do not bring a killed round back any sooner."""
        state = rounds_log.read_state(self.settings)
        if state is not None:
            if self.retry_wait(state) > 0:
                return None
            return f"a round was cut off (attempt {state.get('attempt', '?')}): resuming or restarting it"
        mark, ended = round_inputs.last_mark(self.settings)
        new = round_inputs.new_votes_since(self.settings, mark)
        if new >= self.settings.min_new_preferences:
            return f"{new} new votes (KAIZEN_MIN_NEW_PREFERENCES={self.settings.min_new_preferences})"
        since = time.time() - (ended or self.started_at)
        if new > 0 and since >= self.settings.round_interval.total_seconds():
            return f"{new} new votes and {since:.0f} s since the last round (KAIZEN_ROUND_INTERVAL)"
        return None

    def retry_wait(self, state: dict[str, Any]) -> float:
        """Seconds left before a cut-off round may start again: round_retry_backoff x 2^(attempt-1)
        after its state file was last written (its last sign of life), so a restarted daemon waits too."""
        attempt = max(1, int(state.get("attempt", 1)))
        backoff = self.settings.round_retry_backoff.total_seconds() * 2.0 ** (attempt - 1)
        try:
            last = rounds_log.state_file(self.settings).stat().st_mtime
        except FileNotFoundError:
            return 0.0
        return last + backoff - time.time()

    def report(self, due: str | None) -> dict[str, Any]:
        """What decides the next round, as numbers: written to <data_dir>/rounds/schedule.json at every
        check, so the operator page can say what happens next without reaching into the trainer."""
        s = self.settings
        mark, ended = round_inputs.last_mark(s)
        store = PreferenceStore(s.preferences_db)
        try:
            total = store.count()
            new = int(store.db.execute(
                "SELECT COUNT(*) FROM preferences WHERE rowid > ?", (mark,)).fetchone()[0])
            decided = [json.loads(messages) for (messages,) in store.db.execute(
                "SELECT json_extract(event, '$.messages') FROM preferences WHERE choice IN ('0', '1')")]
        finally:
            store.close()
        fraction = s.reward_holdout_fraction
        held_out = sum(1 for messages in decided if holdout_share(prompt_key(messages)) < fraction)
        since = ended or self.started_at
        report = {
            "checked_at": time.time(), "trainer_started": self.started_at, "last_round_ended": ended,
            "votes_total": total, "votes_decided": len(decided), "votes_held_out": held_out,
            "new_votes": new, "min_new_preferences": s.min_new_preferences,
            "round_interval_s": s.round_interval.total_seconds(),
            "interval_due_at": since + s.round_interval.total_seconds(),
            "reward_model": rm.name if (rm := current_version(s)) is not None else None,
            "reward_min_holdout": s.reward_min_holdout, "reward_holdout_fraction": s.reward_holdout_fraction,
            "round_running": self.child is not None or rounds_log.round_running(s), "due": due,
        }
        path = rounds_log.rounds_dir(s) / SCHEDULE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report))
        tmp.replace(path)  # readers see the old report or the new one
        return report

    def _report(self, due: str | None) -> None:
        try:
            self.report(due)
        except (OSError, sqlite3.Error) as exc:  # only a view for operators: never stop the trainer
            log.warning("could not write the schedule report: %s", exc)

    def tick(self) -> None:
        self.follower.poll()
        if self.child is not None:
            code = self.child.poll()
            if code is None:
                return
            log.info("training round process exited with %d", code)
            self.child = None
            self.follower.poll()
            if code != 0:
                self._note_exit(code)
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.check_every_s
        from trainer.rollout_engine import sync_base  # torch is loaded in the daemon anyway (trainer.reward)

        record_free({"data": self.settings.data_dir, "registry": self.settings.registry_path,
                     "shm": sync_base(self.settings.ppo_sync_dir) or self.settings.data_dir})
        if rounds_log.round_running(self.settings):
            self._report(None)
            return  # someone else's round (e.g. `kaizen rounds run`)
        why = self.due()
        self._report(why)
        if why:
            log.info("starting a training round: %s", why)
            self.child = start_round_process(self.settings)

    def _note_exit(self, code: int) -> None:
        """A round process that died left its state file: say how it ended there, for the record the
        round writes when it gives up (and for `kaizen rounds list`)."""
        state = rounds_log.read_state(self.settings)
        if state is None or rounds_log.round_running(self.settings):
            return
        if code < 0:
            name = signal.Signals(-code).name
            oom = " (the out-of-memory killer's signal)" if name == "SIGKILL" else ""
            state["last_exit"] = f"killed by {name}{oom}"
        else:
            state["last_exit"] = f"exited with {code}"
        write_atomic(rounds_log.state_file(self.settings), json.dumps(state, indent=2, default=str))
        log.warning("training round %s was cut off in phase %r (%s); retrying in %.0f s",
                    state.get("round_id"), state.get("phase"), state["last_exit"],
                    max(0.0, self.retry_wait(state)))

    def stop(self, grace_s: float) -> None:
        if self.child is None or self.child.poll() is not None:
            return
        self.child.send_signal(signal.SIGTERM)
        try:
            self.child.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("training round did not stop within %.0f s: killing it (the next start recovers)", grace_s)
            self.child.kill()
            self.child.wait()
        self.follower.poll()


def round_command(settings: Settings) -> list[str]:
    """`python -m trainer.rounds run`, under torchrun when more than one training process is set."""
    if settings.train_world_size > 1:
        from trainer.distributed import torchrun_command  # torch: only where several processes train

        return torchrun_command(settings, "trainer.rounds", "run")
    return [sys.executable, "-m", "trainer.rounds", "run"]


def start_round_process(settings: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen(round_command(settings), env=settings.child_env(), cwd=ROOT)


def run_worker(settings: Settings, *, retry_s: float = 5.0) -> int:
    """`kaizen train` on a node whose train_node_rank is above 0: join every round node 0 starts.

    Each pass runs this node's share of a round under torchrun, which waits at the rendezvous
    (train_master_addr:port) until node 0's daemon starts the next round. No consumer here: node
    0 alone reads the votes. Serves /metrics with kaizen_trainer_ready 1 for the probes, and the
    time the last round it took part in finished (the KaizenNoTrainingRound alert reads every pod).
    Returns the number of rounds joined (when stopped by SIGTERM/SIGINT).
    """
    start_http_server(settings.trainer_port, addr=settings.trainer_host)
    metrics.TRAINER_READY.set(1)
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def _stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    joined = 0
    log.info("training worker: node %d of %d, rendezvous %s:%d", settings.train_node_rank, settings.train_nnodes,
             settings.train_master_addr, settings.train_master_port)
    while not stopping:
        child = start_round_process(settings)
        code = child.wait()
        if code == 0:  # a round finished (any outcome but failed): the no-round alert reads this
            joined += 1
            metrics.LAST_ROUND_COMPLETED.set(time.time())
        if code != 0 and not stopping:
            log.info("round processes exited with %d; rejoining in %.0f s", code, retry_s)
            time.sleep(retry_s)
    metrics.TRAINER_READY.set(0)
    return joined


def run_one_round(settings: Settings) -> dict[str, Any] | None:
    """One round in a child process, waited for; its record (None if it could not start)."""
    child = start_round_process(settings)
    try:
        child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGTERM)
        child.wait()
    if child.returncode == 75:
        log.warning("another training round is running")
        return None
    done = [r for r in rounds_log.read_rounds(settings, 1) if r.get("outcome") != "running"]
    return done[0] if done else None


def run(settings: Settings, *, once: bool = False, idle_polls_to_finish: int = 3) -> int:
    """Run the consumer (and rounds); with `once`, drain the topic and stop. Returns events stored."""
    ensure_topics(settings)
    store = PreferenceStore(settings.preferences_db)
    consumer = PreferenceConsumer(settings, store)
    scheduler: RoundScheduler | None = None
    if not once:
        start_http_server(settings.trainer_port, addr=settings.trainer_host)
        log.info("trainer metrics on http://%s:%d/metrics", settings.trainer_host, settings.trainer_port)
        scheduler = RoundScheduler(settings)

        def _stop(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: stopping after the current poll", signum)
            consumer.stop()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    log.info("consuming %s as group %s from %s (store: %s)", settings.topic_preferences,
             settings.consumer_group, settings.bootstrap_servers, settings.preferences_db)
    try:
        if once:
            idle = 0
            deadline = time.monotonic() + settings.kafka_max_poll_interval_ms / 1000 * 3
            while idle < idle_polls_to_finish:
                n = consumer.poll_once()
                # until the group is joined an empty poll means nothing
                idle = idle + 1 if (n == 0 and consumer.joined) else 0
                if time.monotonic() > deadline and not consumer.joined:
                    log.warning("could not join group %s in time", settings.consumer_group)
                    break
        else:
            assert scheduler is not None
            try:
                while not consumer.stopping:
                    consumer.poll_once()  # bounded by kafka_poll_timeout_ms
                    metrics.TRAINER_READY.set(1 if consumer.joined else 0)
                    scheduler.tick()
            finally:
                metrics.TRAINER_READY.set(0)
                scheduler.stop(grace_s=max(1.0, settings.stop_grace_s - 5))
    finally:
        consumer.close()
        store.close()
    log.info("trainer stopped: %d stored, %d duplicates, %d dead-lettered",
             consumer.stats.stored, consumer.stats.duplicates, consumer.stats.dead_lettered)
    return consumer.stats.stored
