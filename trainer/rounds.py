"""Training rounds: refresh the reward model, PPO from the champion, gate, publish.

    python -m trainer.rounds run      # one round now (what the trainer daemon starts in a child process)
    kaizen rounds run | list          # the same from the CLI; list reads <data_dir>/rounds/rounds.jsonl

A round, in order:
  1. refresh: when votes arrived since the current reward model, `refresh_reward_model` (its own
     gate keeps the better RM); no RM at all: the round is skipped;
  2. PPO: `ppo_iterations` iterations from the registry's champion (trainer/ppo.py), prompts are
     the users' turns stored with the votes (held-out slice excluded) plus `ppo_prompt_file`;
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
(services/retention.py), the same as `kaizen models gc`. These chores live in trainer/upkeep.py.

Logs: one JSON line per PPO iteration and per round in `<data_dir>/rounds/events.jsonl`; round
records also in `rounds.jsonl` (what `read_rounds` and `kaizen rounds list` show).

Several training processes (KAIZEN_TRAIN_NPROC_PER_NODE / KAIZEN_TRAIN_NNODES; the daemon starts
the round under torchrun): rank 0 leads the round as above, alone with the lock, the store, the
engine, the gate and the registry; the other ranks `follow` it: they wait for its commands
("refresh": train the reward model on this plan; "ppo": run PPO on these prompts) and run their
share of that training beside it (trainer/distributed.py), until "done". A rank that dies fails
every rank's next collective: rank 0 records the round as failed (or, killed itself, leaves the
state file that the next round recovers from); nothing is published either way.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services import metrics
from services.disk import InsufficientSpace
from services.atomic_files import write_atomic
from services.rounds_log import (RoundBusy, read_rounds, read_state, round_lock,  # noqa: F401 (re-exported)
                                 round_running, rounds_dir)
from services.rounds_log import state_file as _state_file
from services.settings import Settings
from trainer import upkeep
from trainer.store import PreferenceStore, held_out

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


# -- where things live ---------------------------------------------------------------------


def _json_line(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def last_mark(settings: Settings) -> tuple[int, float | None]:
    """(store rowid the last round started from, unix time it ended); (0, None) before any."""
    rounds = [r for r in read_rounds(settings, 1000) if r.get("outcome") not in ("running", "interrupted")]
    if not rounds:
        return 0, None
    return int(rounds[0].get("store_mark", 0)), float(rounds[0].get("ended_ts", 0)) or None


def new_votes_since(settings: Settings, mark: int) -> int:
    store = PreferenceStore(settings.preferences_db)
    try:
        return int(store.db.execute("SELECT COUNT(*) FROM preferences WHERE rowid > ?", (mark,)).fetchone()[0])
    finally:
        store.close()


# -- prompts --------------------------------------------------------------------------------


def _key(messages: Messages) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def store_prompts(settings: Settings) -> tuple[list[Messages], list[Messages]]:
    """(training prompts, held-out prompts) from the conversations stored with the votes,
    de-duplicated; held out = the prompts the RM refresh holds out (store.held_out), so the
    gate never sees a prompt PPO trained on. A prompt on both sides counts as held out."""
    store = PreferenceStore(settings.preferences_db)
    try:
        rows = store.events_between(0)
    finally:
        store.close()
    train: dict[str, Messages] = {}
    held: dict[str, Messages] = {}
    for _, ev in rows:
        messages = [{"role": m.role, "content": m.content} for m in ev.messages]
        if not messages or messages[-1]["role"] != "user":
            continue
        side = held if held_out(ev, settings.reward_holdout_fraction) else train
        side.setdefault(_key(messages), messages)
    for k in held:
        train.pop(k, None)
    if settings.ppo_prompt_file is not None:
        for m in read_prompt_file(settings.ppo_prompt_file):
            if _key(m) not in held:
                train.setdefault(_key(m), m)
    return list(train.values()), list(held.values())


def read_prompt_file(path: Path) -> list[Messages]:
    """JSONL: {"prompt": str} or {"messages": [...]}, one per line."""
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if "messages" in rec:
                out.append([{"role": str(m["role"]), "content": str(m["content"])} for m in rec["messages"]])
            else:
                out.append([{"role": "user", "content": str(rec["prompt"])}])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{lineno}: not a prompt ({exc})") from exc
    return out


# -- the round ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundOptions:
    """How a round runs, beside the settings (`run_round`'s keywords)."""

    progress: bool = False
    """A progress bar over the PPO iterations (on a terminal)."""
    record_metrics: bool = True
    """Set the Prometheus metrics of rounds and PPO iterations."""


@dataclass
class RoundContext:
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
        write_atomic(_state_file(self.settings), json.dumps(self.state, indent=2, default=str))

    @property
    def work(self) -> Path:
        return rounds_dir(self.settings) / "work" / self.round_id


def _heavy(name: str) -> Any:
    """torch/vLLM-backed trainer modules, imported when a round runs: `kaizen rounds list` and the
    daemon import this module and must stay light."""
    return importlib.import_module(name)


def _one_process() -> Any:
    return _heavy("trainer.distributed").ONE_PROCESS


def _registry(settings: Settings) -> Any:
    from services.registry import Registry

    return Registry(settings.registry_path)


def _published_by(settings: Settings, round_id: str) -> Any:
    for info in _registry(settings).all_versions():
        if info.training.get("round_id") == round_id:
            return info
    return None


def _recover(settings: Settings) -> tuple[dict[str, Any] | None, str]:
    """What a crashed round left: (state to resume from or None, what we do, in words)."""
    state = read_state(settings)
    if state is None:
        return None, "fresh round"
    rid, phase = state.get("round_id"), state.get("phase")
    info = _published_by(settings, str(rid))
    if info is not None:
        return {**state, "phase": "published", "version": info.version, "stage": info.stage}, \
            f"resuming round {rid}: the registry already holds its {info.version} ({info.stage}); recording it"
    candidate = rounds_dir(settings) / "work" / str(rid) / "candidate"
    if phase in ("gate", "publish") and (candidate / "config.json").is_file():
        return state, f"resuming round {rid} at the gate: its candidate was saved before the crash"
    shutil.rmtree(rounds_dir(settings) / "work" / str(rid), ignore_errors=True)
    return None, f"restarting: round {rid} was cut off in phase {phase!r} before its candidate was saved"


@dataclass
class Crew:
    """Rank 0's handle on the other training ranks (none in a one-process round)."""

    dist: Any = None
    """trainer.distributed.Dist; None: one process."""

    @property
    def size(self) -> int:
        return int(self.dist.world_size) if self.dist is not None else 1

    def order(self, command: str, payload: Any) -> None:
        """Every other rank runs `command` on `payload` beside rank 0 (see `follow`)."""
        if self.size > 1:
            self.dist.broadcast((command, payload))

    def dismiss(self) -> None:
        """The round is over for the followers; a rank that died already cannot be told."""
        if self.size > 1:
            with contextlib.suppress(Exception):
                self.dist.broadcast(("done", None))


def follow(settings: Settings, dist: Any, stop: threading.Event) -> None:
    """A rank other than 0: run rank 0's training commands until it says "done"."""
    reward, ppo, policy = _heavy("trainer.reward"), _heavy("trainer.ppo"), _heavy("trainer.policy")
    while True:
        command, payload = dist.broadcast()
        log.info("rank %d: %s", dist.rank, command)
        if command == "done":
            return
        if command == "refresh":
            reward.train_refresh(payload, dist=dist)
        elif command == "ppo":
            config = payload["config"]
            model, tokenizer, _ = policy.load_policy(payload["champion"])
            reference, _, _ = policy.load_policy(payload["champion"])
            scorer = policy.RewardScorer.load(payload["reward_model"], settings.reward_max_length)
            trainer = ppo.PPOTrainer(config, model, reference, tokenizer, None, scorer, None, dist)
            ppo.run_ppo(config, trainer, payload["prompts"], should_stop=stop.is_set)
        else:
            raise ValueError(f"rank {dist.rank}: unknown command {command!r} from rank 0")


def run_round(settings: Settings, *, engine: Any = None, stop: threading.Event | None = None,
              progress: bool = False, record_metrics: bool = True, crew: Crew | None = None) -> dict[str, Any]:
    """One training round (module docstring). Returns its record, as logged in rounds.jsonl.

    `engine`: a RolloutEngine to reuse (tests share one); otherwise one is started on the champion
    and shut down at the end. `stop`: set it (SIGTERM) to abandon the round between PPO iterations.
    `crew`: the other training ranks when this is rank 0 of several.
    """
    crew = crew or Crew()
    options = RoundOptions(progress=progress, record_metrics=record_metrics)
    with round_lock(settings):
        prior = read_state(settings)  # what a round cut off before this one left, if anything
        upkeep.remove_sync_leftovers(settings, prior)
        resume, how = _recover(settings)
        log.info("training round: %s", how)
        if resume is not None and resume.get("phase") == "published":
            ctx = RoundContext(settings, resume["round_id"], time.time(), resume, options)
            record = _finish(ctx, "published" if resume["stage"] != "rejected" else "rejected",
                             {"version": resume["version"], "recovery": how})
            return record
        attempts = int(prior.get("attempt", 0)) if prior else 0
        if prior is not None and attempts >= settings.round_max_attempts:
            return _give_up(settings, prior, options)
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
        ctx = RoundContext(settings, rid, time.time(), state, options)
        try:
            upkeep.require_disk_space(settings)
        except InsufficientSpace as exc:
            log.error("training round %s refused: %s", rid, exc)
            return _finish(ctx, "failed", {"error": str(exc), "space_refused": exc.what})
        ctx.save()  # the attempt counts from here, whatever kills the round next
        try:
            return _run(ctx, engine, stop, crew, resuming=resume is not None)
        except Exception as exc:
            log.exception("training round %s failed", rid)
            shutil.rmtree(ctx.work, ignore_errors=True)
            details = {"error": f"{type(exc).__name__}: {exc}"}
            if isinstance(exc, InsufficientSpace):
                details["space_refused"] = exc.what
            return _finish(ctx, "failed", details)


def _give_up(settings: Settings, prior: dict[str, Any], options: RoundOptions) -> dict[str, Any]:
    """The start after `round_max_attempts` cut-off starts: record the round as failed and leave it."""
    cut, reason = upkeep.give_up(settings, prior)
    log.error("training round %s failed: %s", prior.get("round_id"), reason)
    ctx = RoundContext(settings, str(prior.get("round_id")), time.time(), {**prior, "cut_off": cut}, options)
    return _finish(ctx, "failed", {"error": reason, "reason": reason})


def _finish(ctx: RoundContext, outcome: str, details: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    record = {k: v for k, v in ctx.state.items() if k not in ("phase_started",)}
    record.update(kind="round", outcome=outcome, ended=datetime.now(UTC).isoformat(), ended_ts=now,
                  seconds=now - ctx.started, **details)
    _json_line(rounds_dir(ctx.settings) / "events.jsonl", record)
    _json_line(rounds_dir(ctx.settings) / "rounds.jsonl", record)
    _state_file(ctx.settings).unlink(missing_ok=True)
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
        _json_line(rounds_dir(settings) / "events.jsonl", rec)
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
    if record.get("reward_accuracy") is not None:
        metrics.REWARD_MODEL_ACCURACY.set(float(record["reward_accuracy"]))


def record_iteration_metrics(it: dict[str, Any]) -> None:
    metrics.PPO_REWARD_MEAN.set(float(it["reward_mean"]))
    metrics.PPO_KL.set(float(it["kl"]))
    metrics.PPO_KL_COEF.set(float(it["kl_coef_next"]))
    metrics.PPO_ITERATIONS.inc()
    metrics.PPO_SAMPLES_PER_SECOND.set(float(it["samples_per_s"]))


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """timings[name] = the seconds the block took."""
    started = time.monotonic()
    try:
        yield
    finally:
        timings[name] = time.monotonic() - started


@dataclass
class RoundJob:
    """What the phases after the reward model share: train candidate -> gate -> publish."""

    registry: Any
    """services.registry.Registry"""
    engine: Any
    """trainer.rollout_engine.RolloutEngine, holding the champion's weights at the start"""
    config: Any
    """trainer.ppo.PPOConfig"""
    reward_model: Path
    champion: str
    train_prompts: list[Messages]
    held_prompts: list[Messages]
    stopped: Callable[[], bool]
    """True once SIGTERM asked the round to stop."""
    crew: Crew
    resuming: bool
    """The candidate was saved before a crash: gate and publish it, no PPO."""
    timings: dict[str, float]


def _run(ctx: RoundContext, engine: Any, stop: threading.Event | None, crew: Crew, *,
         resuming: bool) -> dict[str, Any]:
    """The round's work: refresh the reward model, choose the prompts, start the engine; then
    train candidate -> gate -> publish (`_ppo_gate_publish`)."""
    reward = _heavy("trainer.reward")
    settings = ctx.settings

    def stopped() -> bool:
        return stop is not None and stop.is_set()

    registry = _registry(settings)
    serving = registry.state().champion
    timings: dict[str, float] = {}
    if not resuming:
        _refresh(ctx, registry, serving, crew, timings)
    rm = reward.current_version(settings)
    if rm is None:
        return _finish(ctx, "skipped", {"reason": "no reward model yet (too few held-out votes to accept one)"})
    ctx.state["reward_model"] = rm.name
    holdout = _heavy("trainer.reward_model").read_manifest(rm).get("metrics", {}).get("holdout") or {}
    ctx.state["reward_accuracy"] = holdout.get("accuracy")
    train_prompts, held_prompts = store_prompts(settings)
    held_prompts = held_prompts[: settings.gate_prompts]
    if not train_prompts:
        return _finish(ctx, "skipped", {"reason": "no training prompts"})
    if not held_prompts:
        return _finish(ctx, "skipped", {"reason": "no held-out prompts for the gate"})
    ctx.state.update(train_prompts=len(train_prompts), held_out_prompts=len(held_prompts))
    if "champion" not in ctx.state:  # a resumed round keeps the champion it started from
        ctx.state["champion"] = serving or registry.init_base(settings.model_dir, who="trainer")
    champion = ctx.state["champion"]
    if stopped():
        return _finish(ctx, "abandoned", {"reason": "SIGTERM before PPO"})

    config = _heavy("trainer.ppo").PPOConfig.from_settings(settings)
    own_engine = engine is None
    if own_engine:
        with _timed(timings, "engine_start"):
            engine = _heavy("trainer.rollout_engine").RolloutEngine(
                settings, registry.path(champion), max_model_len=settings.engine_max_model_len,
                seed=settings.ppo_seed)
    else:
        timings["engine_reset"] = engine.load_weights(registry.path(champion))
    job = RoundJob(registry=registry, engine=engine, config=config, reward_model=rm, champion=champion,
                   train_prompts=train_prompts, held_prompts=held_prompts, stopped=stopped, crew=crew,
                   resuming=resuming, timings=timings)
    try:
        return _ppo_gate_publish(ctx, job)
    finally:
        if own_engine:
            engine.shutdown()


def _refresh(ctx: RoundContext, registry: Any, serving: str | None, crew: Crew,
             timings: dict[str, float]) -> None:
    """1. reward model: retrained when votes arrived since the current one (its own gate keeps the better)."""
    reward, reward_model = _heavy("trainer.reward"), _heavy("trainer.reward_model")
    settings = ctx.settings
    ctx.phase("refresh")
    with _timed(timings, "refresh"):
        current = reward.current_version(settings)
        mark = int(reward_model.read_manifest(current)["data"]["trained_through_rowid"]) if current else 0
        if new_votes_since(settings, mark) > 0:
            base = registry.path(serving) if serving else settings.model_dir
            result = reward.refresh_reward_model(settings, reward_model.RewardConfig.from_settings(settings),
                                                 base_model=base, progress=ctx.options.progress,
                                                 dist=crew.dist or _one_process(),
                                                 announce=lambda plan: crew.order("refresh", plan))
            ctx.state["reward_refresh"] = {"accepted": result.accepted, "reason": result.reason}


def _ppo_gate_publish(ctx: RoundContext, job: RoundJob) -> dict[str, Any]:
    """2. train candidate (PPO; skipped when resuming) -> 3. gate -> 4. publish."""
    settings, config = ctx.settings, job.config
    policy = _heavy("trainer.policy")
    gate = _heavy("trainer.gate")
    scorer = policy.RewardScorer.load(job.reward_model, settings.reward_max_length)
    reference, tokenizer, saved_dtype = policy.load_policy(job.registry.path(job.champion))
    models = gate.GateModels(scorer, reference, tokenizer)
    config.apply_threads()
    # champion's answers to the held-out prompts, while the engine still holds its weights
    with _timed(job.timings, "gate_champion"):
        held_ids, champ = gate.gate_answers(job.engine, tokenizer, job.held_prompts, settings, config)
    candidate = ctx.work / "candidate"
    if not job.resuming:
        abandoned = _train_candidate(ctx, job, models, candidate, saved_dtype)
        if abandoned is not None:
            return abandoned
    record, verdict = _gate(ctx, job, models, candidate, held_ids, champ)
    return _publish(ctx, job, candidate, record, verdict)


def _train_candidate(ctx: RoundContext, job: RoundJob, models: Any, candidate: Path,
                     saved_dtype: Any) -> dict[str, Any] | None:
    """2. PPO from the champion on the training prompts, saved to `candidate` (then the "gate" phase).
    Returns the round's record when SIGTERM cut it short, else None."""
    ppo, policy_mod = _heavy("trainer.ppo"), _heavy("trainer.policy")
    sync_folder = _heavy("trainer.rollout_engine").sync_folder
    settings, config = ctx.settings, job.config
    champion_dir = job.registry.path(job.champion)
    events = rounds_dir(settings) / "events.jsonl"
    ctx.phase("ppo", iterations_done=0, reward_model=job.reward_model.name)
    policy, _, _ = policy_mod.load_policy(champion_dir)

    def on_iteration(st: Any) -> None:
        rec = {"kind": "iteration", "round_id": ctx.round_id, "at": datetime.now(UTC).isoformat(),
               **st.as_dict(), "kl_coef_next": trainer.kl_ctl.value}
        _json_line(events, rec)
        if ctx.options.record_metrics:
            record_iteration_metrics(rec)
        ctx.phase("ppo", iterations_done=st.iteration)

    with _timed(job.timings, "ppo"):
        job.crew.order("ppo", {"config": config, "champion": champion_dir, "reward_model": job.reward_model,
                               "prompts": job.train_prompts})
        with sync_folder(config.sync_dir) as sync_dir:
            ctx.state["sync_dir"] = str(sync_dir)  # a kill leaves it in /dev/shm: the next start removes it
            ctx.save()
            trainer = ppo.PPOTrainer(config, policy, models.reference, models.tokenizer, job.engine,
                                     models.scorer, sync_dir, job.crew.dist or _one_process())
            history = ppo.run_ppo(config, trainer, job.train_prompts, on_iteration=on_iteration,
                                  should_stop=job.stopped, progress=ctx.options.progress)
    if job.stopped():
        return _finish(ctx, "abandoned", {"reason": f"SIGTERM after {len(history)} PPO iterations"})
    ctx.state["ppo"] = _summary(history)
    ctx.state["ppo_config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(config).items()}
    ctx.state["distributed"] = trainer.dist.describe()
    policy_mod.save_policy(policy, models.tokenizer, candidate, saved_dtype)
    ctx.phase("gate")
    return None


def _gate(ctx: RoundContext, job: RoundJob, models: Any, candidate: Path, held_ids: list[list[int]],
          champ: list[Any]) -> tuple[dict[str, Any], Any]:
    """3. the candidate against the champion on the held-out prompts (trainer/gate.py): (record, verdict)."""
    gate = _heavy("trainer.gate")
    with _timed(job.timings, "gate"):
        job.timings["load_candidate"] = job.engine.load_weights(candidate)  # vLLM reads the saved folder itself
        record, verdict = gate.measure_gate(job.engine, candidate, models, job.held_prompts, held_ids, champ,
                                            ctx.settings, job.config)
    ctx.state["gate"] = record
    return record, verdict


def _publish(ctx: RoundContext, job: RoundJob, candidate: Path, gate: dict[str, Any],
             verdict: Any) -> dict[str, Any]:
    """4. the candidate into the registry (rejected=True when the gate failed: kept, never served)
    and its model event."""
    from services.model_events import emit

    ctx.phase("publish")
    training = {"round_id": ctx.round_id, "ppo": ctx.state.get("ppo"), "config": ctx.state.get("ppo_config"),
                "reward_refresh": ctx.state.get("reward_refresh"), "timings": job.timings,
                "distributed": ctx.state.get("distributed", {"world_size": 1, "backend": "none"})}
    with _timed(job.timings, "publish"):
        m = job.registry.publish(candidate, parent=job.champion, who="trainer", why=verdict.reason,
                                 reward_model=job.reward_model.name, training=training, gate=gate,
                                 rejected=not verdict.passed)
    outcome = "published" if verdict.passed else "rejected"
    emit(ctx.settings, "published" if verdict.passed else "rejected", m.version, who="trainer",
         round_id=ctx.round_id, parent=job.champion, gate_passed=verdict.passed, win_rate=verdict.win_rate,
         kl=gate["kl"])
    return _finish(ctx, outcome, {"version": m.version, "timings": job.timings})


def _summary(history: list[Any]) -> dict[str, Any]:
    if not history:
        return {"iterations": 0}
    first, last = history[0], history[-1]
    return {"iterations": len(history), "reward_first": first.reward_mean, "reward_last": last.reward_mean,
            "kl_last": last.kl, "kl_coef_last": last.kl_coef,
            "samples_per_s": sum(h.samples_per_s for h in history) / len(history),
            "seconds": {k: sum(h.seconds.get(k, 0.0) for h in history) for k in first.seconds}}


# -- child-process entry point ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.rounds run`: one round; SIGTERM abandons it between PPO iterations.
    Exit codes: 0 finished (any outcome but failed), 1 failed, 75 another round is running."""
    from services.settings import get_settings

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["run"]:
        print("usage: python -m trainer.rounds run", file=sys.stderr)
        return 2
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def _term(signum: int, _frame: Any) -> None:
        log.info("signal %d: abandoning the round after the current step", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    distributed = _heavy("trainer.distributed")
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
