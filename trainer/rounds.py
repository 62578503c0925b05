"""Training rounds: refresh the reward model, PPO from the champion, gate, publish.

    python -m trainer.rounds run      # one round now (what the trainer daemon starts in a child process)
    kaizen rounds run | list          # the same from the CLI; list reads <data_dir>/rounds/rounds.jsonl

A round, in order:
  1. refresh: when votes arrived since the current reward model, `refresh_reward_model` (its own
     gate keeps the better RM); no RM at all: the round is skipped;
  2. PPO: `ppo_iterations` iterations from the registry's champion (trainer/ppo.py), prompts are
     the users' turns stored with the votes (held-out slice excluded) plus `ppo_prompt_file`;
  3. gate: on held-out prompts (the store's stable-hash holdout, never trained on) the candidate's
     sampled answers beat the champion's by RM win rate >= gate_min_win (ties, rewards within
     gate_tie_margin of each other or the same answer, count half), its
     mean KL to the reference (the champion) is <= gate_max_kl, and every sanity prompt's greedy
     answer matches its expected regex;
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
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services import metrics
from services.disk import InsufficientSpace
from services.registry import write_atomic
from services.rounds_log import (RoundBusy, read_rounds, read_state, round_lock,  # noqa: F401 (re-exported)
                                 round_running, rounds_dir)
from services.rounds_log import state_file as _state_file
from services.settings import Settings
from trainer import upkeep
from trainer.store import PreferenceStore, held_out

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
DEFAULT_SANITY = [{"prompt": "What is the capital of France?", "expect": "Paris"}]


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


def sanity_set(settings: Settings) -> list[dict[str, str]]:
    if settings.gate_sanity_file is None:
        return DEFAULT_SANITY
    out = []
    for line in settings.gate_sanity_file.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out.append({"prompt": str(rec["prompt"]), "expect": str(rec["expect"])})
    return out


# -- the round ------------------------------------------------------------------------------


@dataclass
class RoundContext:
    settings: Settings
    round_id: str
    started: float
    state: dict[str, Any]

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
    reward, ppo = _heavy("trainer.reward"), _heavy("trainer.ppo")
    while True:
        command, payload = dist.broadcast()
        log.info("rank %d: %s", dist.rank, command)
        if command == "done":
            return
        if command == "refresh":
            reward.train_refresh(payload, dist=dist)
        elif command == "ppo":
            config = payload["config"]
            policy, tokenizer, _ = ppo.load_policy(payload["champion"])
            reference, _, _ = ppo.load_policy(payload["champion"])
            scorer = ppo.RewardScorer.load(payload["reward_model"], settings.reward_max_length)
            trainer = ppo.PPOTrainer(config, policy, reference, tokenizer, None, scorer, None, dist)
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
    with round_lock(settings):
        prior = read_state(settings)  # what a round cut off before this one left, if anything
        upkeep.remove_sync_leftovers(settings, prior)
        resume, how = _recover(settings)
        log.info("training round: %s", how)
        if resume is not None and resume.get("phase") == "published":
            ctx = RoundContext(settings, resume["round_id"], time.time(), resume)
            record = _finish(ctx, "published" if resume["stage"] != "rejected" else "rejected",
                             {"version": resume["version"], "recovery": how}, record_metrics)
            return record
        attempts = int(prior.get("attempt", 0)) if prior else 0
        if prior is not None and attempts >= settings.round_max_attempts:
            return _give_up(settings, prior, record_metrics)
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
        ctx = RoundContext(settings, rid, time.time(), state)
        try:
            upkeep.require_disk_space(settings)
        except InsufficientSpace as exc:
            log.error("training round %s refused: %s", rid, exc)
            return _finish(ctx, "failed", {"error": str(exc), "space_refused": exc.what}, record_metrics)
        ctx.save()  # the attempt counts from here, whatever kills the round next
        try:
            return _run(ctx, engine, stop, progress, record_metrics, resume is not None, crew)
        except Exception as exc:
            log.exception("training round %s failed", rid)
            shutil.rmtree(ctx.work, ignore_errors=True)
            details = {"error": f"{type(exc).__name__}: {exc}"}
            if isinstance(exc, InsufficientSpace):
                details["space_refused"] = exc.what
            return _finish(ctx, "failed", details, record_metrics)


def _give_up(settings: Settings, prior: dict[str, Any], record_metrics: bool) -> dict[str, Any]:
    """The start after `round_max_attempts` cut-off starts: record the round as failed and leave it."""
    cut, reason = upkeep.give_up(settings, prior)
    log.error("training round %s failed: %s", prior.get("round_id"), reason)
    ctx = RoundContext(settings, str(prior.get("round_id")), time.time(), {**prior, "cut_off": cut})
    return _finish(ctx, "failed", {"error": reason, "reason": reason}, record_metrics)


def _finish(ctx: RoundContext, outcome: str, details: dict[str, Any], record_metrics: bool) -> dict[str, Any]:
    now = time.time()
    record = {k: v for k, v in ctx.state.items() if k not in ("phase_started",)}
    record.update(kind="round", outcome=outcome, ended=datetime.now(UTC).isoformat(), ended_ts=now,
                  seconds=now - ctx.started, **details)
    _json_line(rounds_dir(ctx.settings) / "events.jsonl", record)
    _json_line(rounds_dir(ctx.settings) / "rounds.jsonl", record)
    _state_file(ctx.settings).unlink(missing_ok=True)
    shutil.rmtree(ctx.work, ignore_errors=True)
    if record_metrics:
        record_round_metrics(record)
    if outcome in ("published", "rejected"):
        _retention(ctx.settings, record_metrics)
    log.info("training round %s: %s (%.0f s)", ctx.round_id, outcome, record["seconds"])
    return record


def _retention(settings: Settings, record_metrics: bool) -> None:
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


def _run(ctx: RoundContext, engine: Any, stop: threading.Event | None, progress: bool, record_metrics: bool,
         resuming: bool, crew: Crew) -> dict[str, Any]:
    reward = _heavy("trainer.reward")
    PPOConfig = _heavy("trainer.ppo").PPOConfig
    RewardConfig, current_version, read_manifest = reward.RewardConfig, reward.current_version, reward.read_manifest
    refresh_reward_model = reward.refresh_reward_model

    settings = ctx.settings
    def stopped() -> bool:
        return stop is not None and stop.is_set()

    registry = _registry(settings)
    serving = registry.state().champion

    # 1. reward model ---------------------------------------------------------------------------
    timings: dict[str, float] = {}
    if not resuming:
        ctx.phase("refresh")
        t0 = time.monotonic()
        current = current_version(settings)
        mark = int(read_manifest(current)["data"]["trained_through_rowid"]) if current else 0
        if new_votes_since(settings, mark) > 0:
            base = registry.path(serving) if serving else settings.model_dir
            result = refresh_reward_model(settings, RewardConfig.from_settings(settings), base_model=base,
                                          progress=progress, dist=crew.dist or _one_process(),
                                          announce=lambda plan: crew.order("refresh", plan))
            ctx.state["reward_refresh"] = {"accepted": result.accepted, "reason": result.reason}
        timings["refresh"] = time.monotonic() - t0
    rm = current_version(settings)
    if rm is None:
        return _finish(ctx, "skipped", {"reason": "no reward model yet (too few held-out votes to accept one)"},
                       record_metrics)
    ctx.state["reward_model"] = rm.name
    holdout = read_manifest(rm).get("metrics", {}).get("holdout") or {}
    ctx.state["reward_accuracy"] = holdout.get("accuracy")
    train_prompts, held_prompts = store_prompts(settings)
    held_prompts = held_prompts[: settings.gate_prompts]
    if not train_prompts:
        return _finish(ctx, "skipped", {"reason": "no training prompts"}, record_metrics)
    if not held_prompts:
        return _finish(ctx, "skipped", {"reason": "no held-out prompts for the gate"}, record_metrics)
    ctx.state.update(train_prompts=len(train_prompts), held_out_prompts=len(held_prompts))
    if "champion" not in ctx.state:  # a resumed round keeps the champion it started from
        ctx.state["champion"] = serving or registry.init_base(settings.model_dir, who="trainer")
    champion = ctx.state["champion"]
    if stopped():
        return _finish(ctx, "abandoned", {"reason": "SIGTERM before PPO"}, record_metrics)

    config = PPOConfig.from_settings(settings)
    own_engine = engine is None
    if own_engine:
        t0 = time.monotonic()
        engine = _heavy("trainer.ppo").RolloutEngine(settings, registry.path(champion), max_model_len=settings.engine_max_model_len,
                               seed=settings.ppo_seed)
        timings["engine_start"] = time.monotonic() - t0
    else:
        timings["engine_reset"] = engine.load_weights(registry.path(champion))
    try:
        return _ppo_gate_publish(ctx, engine, config, rm, champion, train_prompts, held_prompts, stopped,
                                 progress, record_metrics, resuming, timings, crew)
    finally:
        if own_engine:
            engine.shutdown()


def _gate_answers(engine: Any, tokenizer: Any, prompts: list[Messages], settings: Settings,
                  config: Any) -> tuple[list[list[int]], list[Any]]:
    encode_prompt = _heavy("trainer.ppo").encode_prompt
    ids = [encode_prompt(tokenizer, m, config.max_prompt_length) for m in prompts]
    # the same seeds for champion and candidate: differences come from the weights
    samples = engine.generate(ids, max_tokens=config.response_length, temperature=config.temperature,
                              n=settings.gate_samples, seed=settings.ppo_seed + 7_919)
    return ids, samples


def _ppo_gate_publish(ctx: RoundContext, engine: Any, config: Any, rm: Path, champion: str,
                      train_prompts: list[Messages], held_prompts: list[Messages], stopped: Callable[[], bool],
                      progress: bool, record_metrics: bool, resuming: bool,
                      timings: dict[str, float], crew: Crew) -> dict[str, Any]:
    import torch

    ppo = _heavy("trainer.ppo")
    PPOTrainer, RewardScorer, encode_prompt, kl_to_reference = \
        ppo.PPOTrainer, ppo.RewardScorer, ppo.encode_prompt, ppo.kl_to_reference
    load_policy, run_ppo, save_policy, sync_folder = ppo.load_policy, ppo.run_ppo, ppo.save_policy, ppo.sync_folder

    settings = ctx.settings
    registry = _registry(settings)
    champion_dir = registry.path(champion)
    scorer = RewardScorer.load(rm, settings.reward_max_length)
    reference, tokenizer, saved_dtype = load_policy(champion_dir)
    config.apply_threads()

    # champion's answers to the held-out prompts, while the engine still holds its weights
    t0 = time.monotonic()
    held_ids, champ = _gate_answers(engine, tokenizer, held_prompts, settings, config)
    timings["gate_champion"] = time.monotonic() - t0
    candidate = ctx.work / "candidate"

    # 2. PPO -------------------------------------------------------------------------------------
    events = rounds_dir(settings) / "events.jsonl"
    if not resuming:
        ctx.phase("ppo", iterations_done=0, reward_model=rm.name)
        policy, _, _ = load_policy(champion_dir)

        def on_iteration(st: Any) -> None:
            rec = {"kind": "iteration", "round_id": ctx.round_id, "at": datetime.now(UTC).isoformat(),
                   **st.as_dict(), "kl_coef_next": trainer.kl_ctl.value}
            _json_line(events, rec)
            if record_metrics:
                record_iteration_metrics(rec)
            ctx.phase("ppo", iterations_done=st.iteration)

        t0 = time.monotonic()
        crew.order("ppo", {"config": config, "champion": champion_dir, "reward_model": rm, "prompts": train_prompts})
        with sync_folder(config) as sync_dir:
            ctx.state["sync_dir"] = str(sync_dir)  # a kill leaves it in /dev/shm: the next start removes it
            ctx.save()
            trainer = PPOTrainer(config, policy, reference, tokenizer, engine, scorer, sync_dir,
                                 crew.dist or _one_process())
            history = run_ppo(config, trainer, train_prompts, on_iteration=on_iteration, should_stop=stopped,
                              progress=progress)
        timings["ppo"] = time.monotonic() - t0
        if stopped():
            return _finish(ctx, "abandoned", {"reason": f"SIGTERM after {len(history)} PPO iterations"},
                           record_metrics)
        ctx.state["ppo"] = _summary(history)
        ctx.state["ppo_config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(config).items()}
        ctx.state["distributed"] = trainer.dist.describe()
        save_policy(policy, tokenizer, candidate, saved_dtype)
        del policy
        ctx.phase("gate")

    # 3. gate ------------------------------------------------------------------------------------
    t0 = time.monotonic()
    timings["load_candidate"] = engine.load_weights(candidate)  # vLLM reads the saved folder itself
    _, cand = _gate_answers(engine, tokenizer, held_prompts, settings, config)
    cand_policy, _, _ = load_policy(candidate)
    kls = kl_to_reference(cand_policy, reference, tokenizer, [held_ids[s.prompt] for s in cand],
                          [s.token_ids for s in cand], config.temperature)
    del cand_policy
    cand = sorted(cand, key=lambda s: int(s.prompt))  # pairs by prompt: same seeds, same order
    champ = sorted(champ, key=lambda s: int(s.prompt))
    prompts_of = [held_prompts[s.prompt] for s in cand]
    def unended(ss: list[Any]) -> torch.Tensor:
        return torch.tensor([0.0 if s.finished else 1.0 for s in ss])

    r_cand = scorer(prompts_of, [s.text for s in cand]) - config.missing_eos_penalty * unended(cand)
    r_champ = scorer([held_prompts[s.prompt] for s in champ], [s.text for s in champ]) - \
        config.missing_eos_penalty * unended(champ)
    # the same answer, or rewards closer than the reward model can tell apart, is a tie: a saturated
    # RM scores "Yes." 0.989 and "Yes" 0.982, and counting that as a loss made the gate a coin toss
    same = torch.tensor([a.token_ids == b.token_ids for a, b in zip(cand, champ, strict=True)])
    tie = same | ((r_cand - r_champ).abs() <= settings.gate_tie_margin)
    wins = float(((r_cand > r_champ) & ~tie).sum()) + 0.5 * float(tie.sum())
    win_rate = wins / len(r_cand)
    sanity = []
    for item in sanity_set(settings):
        ids = [encode_prompt(tokenizer, [{"role": "user", "content": item["prompt"]}], config.max_prompt_length)]
        answer = engine.generate(ids, max_tokens=config.response_length, temperature=0.0)[0].text
        sanity.append({**item, "answer": answer, "passed": re.search(item["expect"], answer) is not None})
    wilson_interval = _heavy("trainer.reward").wilson_interval
    mean_kl = sum(kls) / len(kls)
    gate = {
        "win_rate": win_rate, "win_rate_ci95": list(wilson_interval(round(wins), len(r_cand))),
        "pairs": len(r_cand), "ties": int(tie.sum()), "tie_margin": settings.gate_tie_margin,
        "min_win": settings.gate_min_win,
        "reward_candidate": float(r_cand.mean()), "reward_champion": float(r_champ.mean()),
        "kl": mean_kl, "max_kl": settings.gate_max_kl,
        "sanity": sanity, "sanity_passed": all(s["passed"] for s in sanity),
    }
    failed = []
    if win_rate < settings.gate_min_win:
        failed.append(f"win rate {win_rate:.3f} < {settings.gate_min_win}")
    if mean_kl > settings.gate_max_kl:
        failed.append(f"KL {mean_kl:.3f} > {settings.gate_max_kl}")
    if not gate["sanity_passed"]:
        failed.append("sanity: " + ", ".join(repr(s["prompt"]) for s in sanity if not s["passed"]))
    gate["passed"] = not failed
    gate["failed"] = failed
    timings["gate"] = time.monotonic() - t0
    ctx.state["gate"] = gate

    # 4. publish ---------------------------------------------------------------------------------
    ctx.phase("publish")
    from services.model_events import emit

    why = "passed the gate" if not failed else "failed the gate: " + "; ".join(failed)
    training = {"round_id": ctx.round_id, "ppo": ctx.state.get("ppo"), "config": ctx.state.get("ppo_config"),
                "reward_refresh": ctx.state.get("reward_refresh"), "timings": timings,
                "distributed": ctx.state.get("distributed", {"world_size": 1, "backend": "none"})}
    t0 = time.monotonic()
    m = registry.publish(candidate, parent=champion, who="trainer", why=why, reward_model=rm.name,
                         training=training, gate=gate, rejected=bool(failed))
    timings["publish"] = time.monotonic() - t0
    outcome = "rejected" if failed else "published"
    emit(settings, "rejected" if failed else "published", m.version, who="trainer", round_id=ctx.round_id,
         parent=champion, gate_passed=not failed, win_rate=win_rate, kl=mean_kl)
    return _finish(ctx, outcome, {"version": m.version, "timings": timings}, record_metrics)


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
