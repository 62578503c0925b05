"""`kaizen reward ...`: train, evaluate and refresh the reward model from the command line.

    kaizen reward train --data ../shared/data/hh_harmless_train.jsonl --out rm/
    kaizen reward train --from-store --register        # votes in the store -> next rm-vN
    kaizen reward eval --model rm/ --data ../shared/data/hh_harmless_test.jsonl
    kaizen reward refresh                              # the gated incremental refresh

Options override the `reward_*` settings (kaizen/core/settings.py). Heavy imports (torch,
transformers) happen inside the commands, so `kaizen --help` stays fast.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from kaizen.core.log_setup import setup_logging
from kaizen.core.settings import Settings, get_settings

if TYPE_CHECKING:  # torch and transformers load inside the commands
    from trainer.distributed import Dist
    from trainer.reward_data import Pair
    from trainer.reward_model import RewardConfig
    from trainer.reward_train import TrainResult

reward_app = typer.Typer(help="The reward model: train, evaluate, refresh.", no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # a path in an error stays one line

Threads = Annotated[int | None, typer.Option(help="torch threads [settings: reward_threads]")]
MaxLength = Annotated[int | None, typer.Option(help="tokens per sequence [reward_max_length]")]
BatchSize = Annotated[int | None, typer.Option(help="pairs per micro-batch [reward_batch_size]")]
Dtype = Annotated[str | None, typer.Option(help="autocast dtype: auto | bfloat16 | float32 [reward_dtype]")]
MaxMinutes = Annotated[float | None, typer.Option(help="training time budget [reward_max_minutes]")]


def _logging() -> None:
    setup_logging(get_settings())


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/bold red] {message}")
    return typer.Exit(1)


@reward_app.command("train")
def train(
    data: Annotated[list[Path] | None, typer.Option(
        "--data", help="pairs file (shared-data or TRL JSONL); repeat for several", exists=True,
        dir_okay=False)] = None,
    from_store: Annotated[bool, typer.Option(
        "--from-store", help="train on the preference store's votes")] = False,
    out: Annotated[Path | None, typer.Option(
        help="output folder [default: <data_dir>/reward/offline]")] = None,
    register: Annotated[bool, typer.Option(
        "--register", help="save as the next rm-vN and make it current (no gate: you asked for it)")] = False,
    model: Annotated[Path | None, typer.Option(
        help="policy (or reward model) to start from [settings: model]")] = None,
    lr: Annotated[float | None, typer.Option(help="[reward_lr]")] = None,
    epochs: Annotated[int | None, typer.Option(help="[reward_epochs]")] = None,
    batch_size: BatchSize = None,
    grad_accum: Annotated[int | None, typer.Option(help="[reward_grad_accum]")] = None,
    max_length: MaxLength = None,
    train_layers: Annotated[int | None, typer.Option(
        help="top layers trained, 0 = all [reward_train_layers]")] = None,
    margin: Annotated[float | None, typer.Option(help="[reward_margin]")] = None,
    eval_fraction: Annotated[float | None, typer.Option(
        help="held out for early stopping [reward_eval_fraction]")] = None,
    eval_every: Annotated[int | None, typer.Option(help="[reward_eval_every]")] = None,
    patience: Annotated[int | None, typer.Option(help="[reward_patience]")] = None,
    seed: Annotated[int | None, typer.Option(help="[reward_seed]")] = None,
    max_minutes: MaxMinutes = None,
    dtype: Dtype = None,
    threads: Threads = None,
    progress: Annotated[bool, typer.Option(help="rich progress bar")] = True,
) -> None:
    """Train a reward model (Bradley-Terry) on pairs from files and/or the preference store.

    With KAIZEN_TRAIN_NPROC_PER_NODE (or _NNODES) above 1 it runs itself under torchrun: every
    process reads the same pairs, trains its shard of each batch (DDP), rank 0 saves."""
    from trainer import distributed

    _logging()
    settings = get_settings()
    if not data and not from_store:
        raise _fail("give --data FILE and/or --from-store")
    if distributed.wants_torchrun(settings):
        raise typer.Exit(distributed.relaunch(settings, "kaizen", sys.argv[1:]))
    dist = distributed.init(settings)
    try:
        _train(settings, dist, data, from_store, out, register, model, progress, RewardOverrides(
            lr=lr, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, max_length=max_length,
            train_layers=train_layers, margin=margin, eval_fraction=eval_fraction, eval_every=eval_every,
            patience=patience, seed=seed, max_minutes=max_minutes, dtype=dtype, threads=threads))
        # Every rank leaves the group together, once rank 0 has written the model: a rank that tore
        # the group down while rank 0 was still saving died with SIGABRT in gloo ("terminate called
        # without an active exception"; seen once in CI), failing the job after the model was written.
        dist.barrier()
    finally:
        distributed.shutdown()


@dataclass
class RewardOverrides:
    """`kaizen reward train` options that override the reward_* settings (None: the setting)."""

    lr: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    max_length: int | None = None
    train_layers: int | None = None
    margin: float | None = None
    eval_fraction: float | None = None
    eval_every: int | None = None
    patience: int | None = None
    seed: int | None = None
    max_minutes: float | None = None
    dtype: str | None = None
    threads: int | None = None


def _train(settings: Settings, dist: Dist, data: list[Path] | None, from_store: bool, out: Path | None,
           register: bool, model: Path | None, progress: bool, overrides: RewardOverrides) -> None:
    from trainer.reward import register_version, reward_root
    from trainer.reward_data import encode_pairs, split_pairs
    from trainer.reward_eval import evaluate, format_metrics
    from trainer.reward_model import RewardConfig, load_reward_model, save_model
    from trainer.reward_train import train_reward_model

    say = console.print if dist.is_main else (lambda *_a, **_k: None)
    config = RewardConfig.from_settings(settings, **asdict(overrides))
    pairs, counts = _gather_pairs(settings, data, from_store)
    train_pairs, held = split_pairs(pairs, config.eval_fraction)
    if not train_pairs:
        raise _fail(f"no pairs to train on ({counts})")
    base = model or settings.model_dir
    rm, tokenizer = load_reward_model(base, seed=config.seed)
    say(f"training on {len(train_pairs)} pairs, {len(held)} held out, from {base}"
        + (f", {dist.world_size} processes ({dist.backend})" if dist.enabled else ""))
    result = train_reward_model(rm, tokenizer, train_pairs, held, config, progress=progress, dist=dist)
    metrics = evaluate(rm, encode_pairs(tokenizer, held, config.max_length), config, tokenizer.pad_token_id,
                       dist)
    if not dist.is_main:
        return  # rank 0 writes the model
    before = result.history[0]["accuracy"] if result.history else None
    say(f"{result.stopped} after {result.steps} steps in {result.seconds:.0f} s "
        f"({result.pairs_per_s:.2f} pairs/s); held-out accuracy before training: "
        f"{'-' if before is None else f'{before:.3f}'}")
    say(format_metrics("held-out", metrics))
    if term := result.ended_term:
        say(f"ended-vs-cut-off term γ {term['gamma']:+.3f} (started at {term['gamma_start']:+.3f}: the ended "
            f"answer won {term['ended_won']} of {term['ended_won'] + term['ended_lost']} votes with one cut off)")
    manifest = _manifest(TrainedOffline(rm, tokenizer, base, counts, train_pairs, held, result, metrics),
                         config, dist)
    if register:
        path = register_version(settings, rm, tokenizer, manifest)
        console.print(f"registered {path} as the current reward model")
    else:
        path = save_model(rm, tokenizer, out or reward_root(settings) / "offline", manifest)
        console.print(f"saved {path}")


def _gather_pairs(settings: Settings, data: list[Path] | None,
                  from_store: bool) -> tuple[list[Pair], dict[str, Any]]:
    """The pairs of every --data file, then the store's trainable votes; with what each held."""
    from trainer.reward_data import pairs_from_events, read_pairs_file
    from trainer.store import PreferenceStore, held_out

    pairs: list[Pair] = []
    counts: dict[str, Any] = {}
    for path in data or []:
        try:
            found = read_pairs_file(path)
        except ValueError as exc:
            raise _fail(str(exc)) from exc
        pairs += found
        counts[str(path)] = len(found)
    if from_store:
        store = PreferenceStore(settings.preferences_db)
        try:
            events = [ev for _, ev in store.events_between(0)]
        finally:
            store.close()
        # the refresh gate's slice stays unseen here too, so later gates remain fair
        trainable = [ev for ev in events if not held_out(ev, settings.reward_holdout_fraction)]
        store_pairs, store_counts = pairs_from_events(trainable)
        pairs += store_pairs
        counts["store"] = store_counts.as_dict()
    return pairs, counts


@dataclass
class TrainedOffline:
    """What `kaizen reward train` trained, on what, and how it did: the manifest's content."""

    model: Any
    tokenizer: Any
    base: Path
    counts: dict[str, Any]
    """Pairs per --data file, and the store's PairCounts."""
    train_pairs: list[Pair]
    held: list[Pair]
    result: TrainResult
    metrics: dict[str, Any]
    """Held-out metrics after training (reward_eval.evaluate)."""


def _manifest(trained: TrainedOffline, config: RewardConfig, dist: Dist) -> dict[str, Any]:
    """The manifest.json of an offline-trained reward model (no parent: it starts a lineage)."""
    from trainer.reward_eval import reward_stats

    result, held = trained.result, trained.held
    reference = held or trained.train_pairs[:256]
    return {
        "parent": None, "base_model": str(trained.base), "created": datetime.now(UTC).isoformat(),
        "data": {"files": trained.counts, "train_pairs": len(trained.train_pairs),
                 "early_stop_pairs": len(held), "trained_through_rowid": 0},
        "metrics": {"held_out": trained.metrics, "train": {**result.record(), "losses": result.losses}},
        "reward_norm": {**(trained.metrics["norm"] if held else
                           reward_stats(trained.model, trained.tokenizer, reference, config)),
                        "reference": "held-out split, both answers" if held else "first training pairs"},
        "config": asdict(config),
        "distributed": dist.describe(),
    }


@reward_app.command("eval")
def eval_(
    model: Annotated[Path, typer.Option("--model", help="reward-model folder", exists=True, file_okay=False)],
    data: Annotated[list[Path], typer.Option("--data", help="pairs file; repeat for several", exists=True,
                                             dir_okay=False)],
    out: Annotated[Path | None, typer.Option(help="JSON report [default: <model>/eval.json]")] = None,
    max_length: MaxLength = None,
    batch_size: BatchSize = None,
    dtype: Dtype = None,
    threads: Threads = None,
) -> None:
    """Pairwise accuracy (Wilson 95% interval), mean margin and calibration per file, as text and JSON."""
    from trainer.reward_data import encode_pairs, read_pairs_file
    from trainer.reward_eval import evaluate, format_metrics
    from trainer.reward_model import RewardConfig, load_reward_model

    _logging()
    config = RewardConfig.from_settings(get_settings(), max_length=max_length, batch_size=batch_size,
                                        dtype=dtype, threads=threads)
    config.apply_threads()
    if not (model / "config.json").is_file():
        raise _fail(f"{model} is not a Hugging Face model folder (no config.json)")
    rm, tokenizer = load_reward_model(model)
    report: dict[str, Any] = {"model": str(model), "max_length": config.max_length, "files": {}}
    for path in data:
        try:
            pairs = read_pairs_file(path)
        except ValueError as exc:
            raise _fail(str(exc)) from exc
        encoded = encode_pairs(tokenizer, pairs, config.max_length)
        metrics = evaluate(rm, encoded, config, tokenizer.pad_token_id)
        report["files"][str(path)] = metrics
        console.print(format_metrics(path.name, metrics))
    target = out or model / "eval.json"
    target.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {target}")


@reward_app.command("refresh")
def refresh(
    model: Annotated[Path | None, typer.Option(
        help="policy to start from when no RM exists yet [settings: model]")] = None,
    max_minutes: MaxMinutes = None,
    threads: Threads = None,
) -> None:
    """Warm-start from the current RM on the votes since, gate on the held-out slice, keep the better."""
    from trainer.reward import refresh_reward_model
    from trainer.reward_model import RewardConfig

    _logging()
    settings = get_settings()
    config = RewardConfig.from_settings(settings, max_minutes=max_minutes, threads=threads)
    result = refresh_reward_model(settings, config, base_model=model, progress=True)
    console.print(f"{result.reason}; current: {result.version or 'none'}")
