"""The reward model's stage: its versions on disk (rm-v1, rm-v2, ... and the `current` pointer)
and the gated incremental refresh a training round runs on the votes since the current one.

    kaizen reward train --data ../shared/data/hh_harmless_train.jsonl --out rm/
    kaizen reward eval --model rm/ --data ../shared/data/hh_harmless_test.jsonl
    kaizen reward refresh        # what a training round calls: votes since the last RM

The stage in one hop, by concept:
  - trainer/reward_data.py: preference pairs (files, votes), their split, tokens and batches;
  - trainer/reward_model.py: the model (the policy with a scalar head), its config, loss,
    scoring, load/save;
  - trainer/reward_train.py: the Bradley–Terry training loop (early stopping, DDP);
  - trainer/reward_eval.py: accuracy with its Wilson interval, margin, calibration;
  - this module: versions and the refresh (plan -> train -> gate -> register);
  - kaizen/reward_cli.py: `kaizen reward train | eval | refresh`.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kaizen.core.atomic_files import write_atomic
from kaizen.core.settings import Settings
from trainer.distributed import ONE_PROCESS, Dist
from trainer.reward_data import Pair, PairCounts, encode_pairs, pairs_from_events, split_pairs
from trainer.reward_eval import evaluate
from trainer.reward_model import MANIFEST, RewardConfig, load_reward_model, read_manifest, save_model
from trainer.reward_train import TrainResult, train_reward_model
from trainer.store import PreferenceStore, held_out

log = logging.getLogger(__name__)

POINTER = "current"
VERSION_RE = re.compile(r"^rm-v(\d+)$")


# -- versions ---------------------------------------------------------------------


class RewardModelMissing(RuntimeError):
    """The `current` pointer names a reward model folder that is not there whole."""


def reward_root(settings: Settings) -> Path:
    """`<data_dir>/reward`: rm-v1, rm-v2, ... and the `current` pointer."""
    return settings.data_dir / "reward"


def current_version(settings: Settings) -> Path | None:
    """The folder the pointer names, or None before the first accepted RM."""
    pointer = reward_root(settings) / POINTER
    if not pointer.is_file():
        return None
    path = reward_root(settings) / pointer.read_text().strip()
    # on disk, not an invariant of this code: checked under -O too
    if not (path / MANIFEST).is_file():
        raise RewardModelMissing(
            f"the reward model pointer {pointer} names {path}, which has no {MANIFEST} (removed or damaged): "
            f"restore that folder, or point {pointer} at another rm-v* folder of {reward_root(settings)}, "
            f"or remove {pointer} to train anew")
    return path


def register_version(settings: Settings, model: Any, tokenizer: Any, manifest: dict[str, Any]) -> Path:
    """Save as the next rm-vN and point `current` at it (pointer replaced atomically)."""
    root = reward_root(settings)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := VERSION_RE.match(p.name))]
    version = f"rm-v{max(taken, default=0) + 1}"
    path = save_model(model, tokenizer, root / version, {"version": version, **manifest})
    write_atomic(root / POINTER, version + "\n")
    return path


# -- refresh ----------------------------------------------------------------------


@dataclass
class RefreshResult:
    accepted: bool
    reason: str
    version: str | None
    """The current RM after the refresh (unchanged when rejected)."""
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RefreshPlan:
    """Everything a refresh trains on, read once (by rank 0) and handed to every rank as is."""

    config: RewardConfig
    base: Path
    """Folder the training starts from: the current RM; for the first, reward_init or the policy."""
    current: str | None
    """The current RM's name (None before the first)."""
    parent: dict[str, Any] | None
    """Its manifest."""
    base_model: str
    """The policy the RM lineage started from (recorded in every manifest)."""
    train: list[Pair]
    early_stop: list[Pair]
    held: list[Pair]
    held_counts: PairCounts
    new_counts: PairCounts
    replay_pairs: int
    through: int
    """Store rowid the plan read up to: the next refresh starts after it."""
    init: str | None = None
    """The `reward_init` folder a first refresh starts from (None: from the policy or the current RM)."""


def plan_refresh(settings: Settings, config: RewardConfig,
                 base_model: Path | None = None) -> RefreshPlan | RefreshResult:
    """What the next refresh trains on, or why there is none (module docstring of `refresh_reward_model`)."""
    current = current_version(settings)
    init = _initial_model(settings) if current is None else None
    parent = read_manifest(current) if current else None
    mark = int(parent["data"]["trained_through_rowid"]) if parent else 0
    store = PreferenceStore(settings.preferences_db)
    try:
        through = store.last_rowid()
        rows = store.events_between(0, through)
    finally:
        store.close()
    fraction = settings.reward_holdout_fraction
    held_events = [ev for _, ev in rows if held_out(ev, fraction)]
    new_events = [ev for rid, ev in rows if rid > mark and not held_out(ev, fraction)]
    old_events = [ev for rid, ev in rows if rid <= mark and not held_out(ev, fraction)]
    ties = config.tie_weight > 0  # tied votes train as pairs labelled 0.5; the test reads decided ones
    held, held_counts = pairs_from_events(held_events)
    new, new_counts = pairs_from_events(new_events, ties)
    old, _ = pairs_from_events(old_events, ties)
    name = current.name if current else None
    if not new:
        return RefreshResult(False, f"no new votes with a preference since {name or 'the start'}", name)
    if len(held) < settings.reward_min_holdout:
        return RefreshResult(False, f"only {len(held)} held-out pairs, need {settings.reward_min_holdout} "
                                    "to judge a new reward model", name)
    if current is not None and settings.reward_warm_epochs is not None:
        config = replace(config, epochs=settings.reward_warm_epochs)  # warm: the parent knows the old votes
    rng = random.Random(f"{config.seed}:{through}")
    replay = rng.sample(old, min(len(old), round(settings.reward_replay_fraction * len(new))))
    train_pairs, stop_pairs = split_pairs(new + replay, config.eval_fraction, salt="early-stop:")
    if sum(p.decided for p in stop_pairs) < settings.reward_early_stop_min_pairs:
        train_pairs, stop_pairs = train_pairs + stop_pairs, []
    stop_pairs = [p for p in stop_pairs if p.decided]  # a tie has no right answer to stop on
    # the lineage's first policy: what this RM was first trained from
    lineage = str(parent.get("base_model")) if parent else str(base_model or settings.model_dir)
    return RefreshPlan(config, current or init or base_model or settings.model_dir, name, parent, lineage,
                       train_pairs, stop_pairs, held, held_counts, new_counts, len(replay), through,
                       init=str(init) if init else None)


def _initial_model(settings: Settings) -> Path | None:
    """`reward_init`, checked on disk: a folder with a model's config.json, or None when unset."""
    init = settings.reward_init
    if init is not None and not (init / "config.json").is_file():
        raise RewardModelMissing(
            f"reward_init {init} holds no config.json: point KAIZEN_REWARD_INIT at a folder that "
            f"`kaizen reward train --out` wrote, or unset it to start from the policy")
    return init


@dataclass
class Trained:
    """A refresh's trained model with its numbers, on every rank."""

    model: Any
    tokenizer: Any
    result: TrainResult
    before: dict[str, Any] | None
    after: dict[str, Any]


def train_refresh(plan: RefreshPlan, *, progress: bool = False, dist: Dist = ONE_PROCESS) -> Trained:
    """The part of a refresh every rank runs: load, measure the parent, train, measure again. The
    training's max_minutes counts from here."""
    started = time.monotonic()
    config = plan.config
    config.apply_threads()
    model, tokenizer = load_reward_model(plan.base, seed=config.seed)
    model.to(dist.device)
    enc_held = encode_pairs(tokenizer, plan.held, config.max_length)
    started_trained = plan.current or plan.init  # a reward model already: what training must not undo
    before = evaluate(model, enc_held, config, tokenizer.pad_token_id, dist) if started_trained else None
    result = train_reward_model(model, tokenizer, plan.train, plan.early_stop, config, progress=progress,
                                dist=dist, clock_from=started)
    after = evaluate(model, enc_held, config, tokenizer.pad_token_id, dist)
    return Trained(model, tokenizer, result, before, after)


def refresh_reward_model(settings: Settings, config: RewardConfig | None = None, *,
                         base_model: Path | None = None, progress: bool = False, dist: Dist = ONE_PROCESS,
                         announce: Callable[[RefreshPlan], None] | None = None) -> RefreshResult:
    """One incremental refresh of the reward model from the preference store.

    1. The held-out slice: votes whose prompt hashes below `reward_holdout_fraction`
       (store.held_out); no RM ever trains on them (nor on their prompts), so it is a fair test
       for all versions.
    2. New votes: stored after the current RM's mark (`trained_through_rowid`), plus a replay
       sample of older ones (`reward_replay_fraction` x the new ones) against forgetting.
    3. Warm-start from the current RM (for the first: `reward_init` if set, else the policy
       `base_model`), train: a warm start for `reward_warm_epochs`, a first RM for `reward_epochs`.
    4. Gate: accept unless held-out accuracy falls more than `reward_gate_tolerance` below the
       current RM's (for the first RM: `reward_init`'s, or 0.5, chance). Rejected votes are not marked as
       trained: the next refresh sees them again together with newer ones.

    Distributed (called on rank 0 only): `announce(plan)` hands the plan to the other ranks,
    which run `train_refresh` on it alongside; only rank 0 gates and registers.
    """
    config = config or RewardConfig.from_settings(settings)
    config.apply_threads()
    plan = plan_refresh(settings, config, base_model)
    if isinstance(plan, RefreshResult):
        return plan
    if announce is not None:
        announce(plan)
    trained = train_refresh(plan, progress=progress, dist=dist)
    return gate_and_register(settings, plan, trained, dist)


def gate_and_register(settings: Settings, plan: RefreshPlan, trained: Trained,
                      dist: Dist = ONE_PROCESS) -> RefreshResult:
    """Step 4 of the refresh, on rank 0: keep the new RM unless it reads the held-out votes worse."""
    result, before, after, name = trained.result, trained.before, trained.after, plan.current
    floor = (before["accuracy"] if before else 0.5) - settings.reward_gate_tolerance
    metrics = {"holdout": after, "parent_holdout": before, "gate_floor": floor,
               "train": result.record()}
    parent_label = name or ("the initial reward model (reward_init)" if plan.init else None)
    against = f"{parent_label}'s {before['accuracy']:.3f}" if before else "chance (0.5)"
    if after["accuracy"] < floor:
        reason = (f"rejected: held-out accuracy {after['accuracy']:.3f} is below {against} by more than "
                  f"the tolerance {settings.reward_gate_tolerance} (n={after['pairs']}); "
                  f"{name or 'no RM'} stays current")
        log.warning("reward refresh %s", reason)
        return RefreshResult(False, reason, name, metrics)
    manifest = {
        "parent": name,
        "base_model": plan.base_model,
        "init": plan.init,
        "created": datetime.now(UTC).isoformat(),
        "data": {"new": plan.new_counts.as_dict(), "replay_pairs": plan.replay_pairs,
                 "holdout": plan.held_counts.as_dict(), "early_stop_pairs": len(plan.early_stop),
                 "trained_through_rowid": plan.through},
        "metrics": metrics,
        "reward_norm": {**after["norm"], "reference": "held-out slice, both answers"},
        "config": asdict(plan.config),
        "distributed": dist.describe(),
    }
    path = register_version(settings, trained.model, trained.tokenizer, manifest)
    reason = f"accepted: held-out accuracy {after['accuracy']:.3f} vs {against} (n={after['pairs']})"
    log.info("reward refresh %s as %s", reason, path.name)
    return RefreshResult(True, reason, path.name, metrics)
