"""The reward model: Bradley–Terry training on preference pairs, evaluation, gated refresh.

    kaizen reward train --data ../shared/data/hh_harmless_train.jsonl --out rm/
    kaizen reward eval --model rm/ --data ../shared/data/hh_harmless_test.jsonl
    kaizen reward refresh        # what a training round calls: votes since the last RM

The model is the policy's own architecture with the LM head swapped for one scalar
(`AutoModelForSequenceClassification`, num_labels=1, initialised from the policy). It reads
the chat-templated conversation plus the answer and is scored at the last real token.

On CPU (2 cores, shared with the chat engine; bench/README.md has the numbers) what made
training fastest: bf16 autocast over float32 weights (AMX), one torch thread, the top 8 of
30 layers trained, length-bucketed batches with dynamic padding, max_length 384.

Order of the file: config, model, loss, evaluation, training, registry + refresh.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.atomic_files import atomic_folder, write_atomic
from services.settings import Settings
from trainer.distributed import ONE_PROCESS, Dist, wrap_ddp
from trainer.reward_data import (
    EncodedPair,
    Pair,
    PairCounts,
    collate_pairs,
    encode_pairs,
    length_batches,
    pad_sequences,
    pairs_from_events,
    split_pairs,
)
from trainer.store import PreferenceStore, held_out

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
POINTER = "current"
VERSION_RE = re.compile(r"^rm-v(\d+)$")


#: RewardConfig fields whose value is the setting `reward_<name>` (services/settings.py documents each).
FROM_SETTINGS = ("max_length", "batch_size", "grad_accum", "lr", "epochs", "margin", "train_layers", "dtype",
                 "threads", "eval_fraction", "eval_every", "patience", "seed", "max_minutes")


def _setting(name: str) -> Any:
    """The default of setting `reward_<name>`: one source, so a bare RewardConfig() trains as the
    trainer does with no KAIZEN_REWARD_* set (it had lr 2e-5 and 1 epoch against the settings' 5e-5
    and 3). The environment's values come in through `RewardConfig.from_settings`."""
    return Settings.model_fields[f"reward_{name}"].default


@dataclass
class RewardConfig:
    """One reward-model training run. Build it with `from_settings` (the settings, then the CLI's
    overrides); the field defaults are the settings' defaults, for tests and tools."""

    max_length: int = _setting("max_length")
    """Tokens per conversation + answer, cut from the left (reward_data.encode_conversation)."""
    batch_size: int = _setting("batch_size")
    """Pairs per micro-batch: 2 x batch_size sequences per forward."""
    grad_accum: int = _setting("grad_accum")
    """Micro-batches per optimizer step."""
    lr: float = _setting("lr")
    """Peak AdamW learning rate (after warmup)."""
    epochs: int = _setting("epochs")
    """Passes over the training pairs."""
    margin: float = _setting("margin")
    """Bradley-Terry margin m in -log sigma(r+ - r- - m); 0 is the plain loss."""
    train_layers: int = _setting("train_layers")
    """Top decoder layers trained, plus final norm and score head; 0 trains everything."""
    dtype: str = _setting("dtype")
    """Autocast dtype of forward passes; parameters and AdamW state stay float32. "auto" is
    resolved for this machine when the config is made (services/hardware.py)."""
    threads: int | None = _setting("threads")
    """torch threads; None: one per core."""
    eval_fraction: float = _setting("eval_fraction")
    """Share of training pairs held out for early stopping."""
    eval_every: int = _setting("eval_every")
    """Optimizer steps between held-out evaluations."""
    patience: int = _setting("patience")
    """Evaluations without a better held-out accuracy before training stops."""
    seed: int = _setting("seed")
    max_minutes: float | None = _setting("max_minutes")
    """Wall-clock budget; None: none."""
    # -- not settings: fixed parts of the recipe --
    warmup_fraction: float = 0.05
    """Share of optimizer steps with a linearly rising lr; then linear decay to 0."""
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.dtype == "auto":
            from services.hardware import choose_dtype

            choice = choose_dtype("auto")
            log.info("reward model dtype %s", choice)
            self.dtype = choice.dtype

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> RewardConfig:
        """The settings' `reward_*` values; an override that is not None replaces one (the CLI's options)."""
        values = {name: getattr(settings, f"reward_{name}") for name in FROM_SETTINGS}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def apply_threads(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)


# -- model ------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # Loading from the policy always reports `score.weight` as newly initialised:
    # that is the point, so the report and the per-tensor progress bar are noise here.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def load_reward_model(path: Path, seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer) from a policy folder (new score head, seeded) or a reward-model folder.

    Parameters are float32: AdamW updates of ~1e-5 vanish in bf16 weights; speed comes
    from bf16 autocast instead (RewardConfig.dtype).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)  # the score head's initialisation
    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
    return model, tokenizer


def freeze_lower_layers(model: Any, train_layers: int) -> int:
    """Train only the top `train_layers` decoder layers, final norm and score head (0: all).

    Frozen layers below build no autograd graph, so a step costs one forward plus the
    backward of the top layers only. Returns the number of trainable parameters.
    """
    layers = model.base_model.layers
    for p in model.parameters():
        p.requires_grad_(train_layers == 0 or train_layers >= len(layers))
    if 0 < train_layers < len(layers):
        for module in [*layers[-train_layers:], model.base_model.norm, model.score]:
            for p in module.parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def sequence_rewards(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward of each sequence, read at its last real token.

    input_ids, attention_mask: (B, T), padded on either side. Returns (B,).
    Position ids count real tokens only, so a left-padded row scores as it would alone.
    We read the score ourselves instead of using the HF head's pooling: that pooling looks
    for `pad_token_id`, which in SmolLM2 is <|im_end|>, a real token of every turn.
    """
    device = model.score.weight.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    B, T = input_ids.shape
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids).last_hidden_state  # (B, T, H)
    last = (torch.arange(T, device=input_ids.device) * attention_mask).argmax(-1)  # (B,) last 1 per row
    h_last = hidden[torch.arange(B, device=input_ids.device), last]  # (B, H)
    return model.score(h_last).squeeze(-1).float()  # (B, 1) -> (B,)


class RewardForward(nn.Module):
    """`sequence_rewards` as a module's forward, so DistributedDataParallel can wrap it (DDP
    synchronises the gradients of what runs through its wrapped module's forward)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return sequence_rewards(self.model, input_ids, attention_mask)


def _autocast(config: RewardConfig, device: torch.device | None = None) -> contextlib.AbstractContextManager[Any]:
    if config.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type if device is not None else "cpu", dtype=getattr(torch, config.dtype))


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


# -- loss -------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: float | torch.Tensor = 0.0
) -> torch.Tensor:
    """Mean over pairs of -log σ(r₊ − r₋ − m). chosen_rewards, rejected_rewards: (B,); returns ().

    P(chosen ≻ rejected) = σ(r₊ − r₋): Bradley & Terry (1952), the reward-model loss of
    Ouyang et al. 2022 (InstructGPT, eq. 1); the margin m is Touvron et al. 2023 (Llama 2, eq. 2).
    logsigmoid, not log(sigmoid(.)), stays finite for large negative differences.
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin).mean()  # Ouyang et al. 2022, eq. 1


# -- evaluation -------------------------------------------------------------------


@torch.no_grad()
def score_pairs(model: Any, encoded: Sequence[EncodedPair], config: RewardConfig,
                pad_id: int, dist: Dist = ONE_PROCESS) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of every pair's chosen and rejected answer: (N,), (N,), on every rank.

    With N ranks each scores every N-th batch and a sum over ranks fills in the rest (each
    pair is scored by exactly one rank; the others contribute zeros)."""
    model.eval()
    chosen, rejected = torch.zeros(len(encoded)), torch.zeros(len(encoded))
    for batch in dist.shard(length_batches(encoded, config.batch_size * 2, rng=None)):
        ids, mask = collate_pairs([encoded[i] for i in batch], pad_id)  # (2b, T)
        with _autocast(config, _device(model)):
            r = sequence_rewards(model, ids, mask).cpu()  # (2b,)
        chosen[batch], rejected[batch] = r[: len(batch)], r[len(batch):]
    if dist.enabled:
        both = dist.all_reduce_sum(torch.stack([chosen, rejected]))  # (2, N)
        chosen, rejected = both[0], both[1]
    return chosen, rejected


@torch.no_grad()
def score_texts(model: Any, tokenizer: Any, seqs: Sequence[list[int]], config: RewardConfig) -> torch.Tensor:
    """Rewards of single token sequences: (N,)."""
    model.eval()
    out = torch.empty(len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    step = config.batch_size * 2
    for start in range(0, len(order), step):
        idx = order[start:start + step]
        ids, mask = pad_sequences([seqs[i] for i in idx], tokenizer.pad_token_id)
        with _autocast(config, _device(model)):
            out[idx] = sequence_rewards(model, ids, mask).cpu()
    return out


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (Wilson 1927); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


#: Calibration buckets of the model's own confidence σ(|r₊ − r₋|).
CONFIDENCE_EDGES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def pairwise_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, Any]:
    """Accuracy (Wilson 95%), mean margin and calibration of rewards (N,), (N,).

    Calibration: pairs bucketed by the model's confidence σ(|margin|) in the order it
    prefers; a calibrated model is right about as often as the bucket's mean confidence.
    A score tie (margin exactly 0) counts as wrong.
    """
    margin = chosen - rejected  # (N,)
    n, correct = len(margin), int((margin > 0).sum())
    low, high = wilson_interval(correct, n)
    confidence = torch.sigmoid(margin.abs())  # (N,)
    buckets = []
    for lo, hi in zip(CONFIDENCE_EDGES[:-1], CONFIDENCE_EDGES[1:], strict=True):
        inside = (confidence >= lo) & ((confidence < hi) if hi < 1.0 else (confidence <= hi))
        k = int(inside.sum())
        buckets.append({
            "confidence": f"{lo:.1f}-{hi:.1f}", "pairs": k,
            "accuracy": float((margin[inside] > 0).float().mean()) if k else None,
            "mean_confidence": float(confidence[inside].mean()) if k else None,
        })
    return {
        "pairs": n,
        "accuracy": correct / n if n else None,
        "accuracy_ci95": [low, high],
        "mean_margin": float(margin.mean()) if n else None,
        "bt_loss": float(bradley_terry_loss(chosen, rejected)) if n else None,
        "calibration": buckets,
    }


def evaluate(model: Any, encoded: Sequence[EncodedPair], config: RewardConfig, pad_id: int,
             dist: Dist = ONE_PROCESS) -> dict[str, Any]:
    """`pairwise_metrics` of `encoded`; the same numbers on every rank (score_pairs)."""
    chosen, rejected = score_pairs(model, encoded, config, pad_id, dist)
    return pairwise_metrics(chosen, rejected)


def format_metrics(name: str, m: dict[str, Any]) -> str:
    """A few human lines: accuracy with interval, margin, calibration table."""
    if not m["pairs"]:
        return f"{name}: no pairs"
    lo, hi = m["accuracy_ci95"]
    lines = [f"{name}: accuracy {m['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}, n={m['pairs']}), "
             f"mean margin {m['mean_margin']:+.3f}, BT loss {m['bt_loss']:.3f}",
             "  confidence  pairs  accuracy  mean conf"]
    for b in m["calibration"]:
        acc = "-" if b["accuracy"] is None else f"{b['accuracy']:.3f}"
        conf = "-" if b["mean_confidence"] is None else f"{b['mean_confidence']:.3f}"
        lines.append(f"  {b['confidence']:>10}  {b['pairs']:>5}  {acc:>8}  {conf:>9}")
    return "\n".join(lines)


# -- training ---------------------------------------------------------------------


@dataclass
class TrainResult:
    steps: int
    pairs_seen: int
    """Over all ranks."""
    seconds: float
    stopped: str
    """Why training ended: "done", "early stop", "time budget"."""
    best_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    """Held-out accuracy at each evaluation: [{"step", "accuracy", "bt_loss"}]."""
    losses: list[float] = field(default_factory=list)
    """The loss curve: mean Bradley-Terry loss of each optimizer step's pairs (all ranks)."""

    @property
    def pairs_per_s(self) -> float:
        return self.pairs_seen / self.seconds if self.seconds else 0.0


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.2f} held-out {task.fields[held]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled,
    )


def train_reward_model(
    model: Any, tokenizer: Any, train: Sequence[Pair], held_out: Sequence[Pair], config: RewardConfig,
    *, progress: bool = True, dist: Dist = ONE_PROCESS,
) -> TrainResult:
    """Fit `model` to `train` pairs in place; early-stop on accuracy on `held_out`.

    Micro-batches of similar-length pairs (dynamic padding), `grad_accum` of them per AdamW
    step, linear warmup then decay. Every `eval_every` steps the held-out accuracy is
    measured; the best weights (step 0 included) are restored at the end.

    On N ranks (trainer/distributed.py) every rank builds the same micro-batches from the same
    seed; of each step's `grad_accum` micro-batches rank r takes those at positions r, r + N, ...
    and DDP averages the gradients, so a step sees exactly the pairs one process would
    (the global batch is batch_size x grad_accum pairs whatever N is). Held-out scoring is
    sharded too; every rank reaches the same metrics and so the same stop decisions.
    """
    if not train:
        raise ValueError("train: no pairs to train on")
    config.apply_threads()
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    pad_id = tokenizer.pad_token_id
    model.to(dist.device)
    enc_train = encode_pairs(tokenizer, train, config.max_length)
    enc_held = encode_pairs(tokenizer, held_out, config.max_length)
    n_trainable = freeze_lower_layers(model, config.train_layers)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    log.info("reward training: %d pairs (%d cut to %d tokens), %d held out, %.1fM trainable parameters, "
             "%d process(es)", len(enc_train), sum(e.truncated for e in enc_train), config.max_length,
             len(enc_held), n_trainable / 1e6, dist.world_size)
    forward = wrap_ddp(RewardForward(model), dist)

    batches_per_epoch = math.ceil(len(enc_train) / config.batch_size)
    total_steps = max(1, math.ceil(batches_per_epoch / config.grad_accum) * config.epochs)
    warmup = max(1, int(total_steps * config.warmup_fraction))
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup))))

    def held_out_score(step: int) -> tuple[float, float]:
        # (accuracy, -BT loss): accuracy decides, the loss breaks its frequent ties
        m = evaluate(model, enc_held, config, pad_id, dist)
        history.append({"step": step, "accuracy": m["accuracy"], "bt_loss": m["bt_loss"]})
        model.train()
        return float(m["accuracy"]), -float(m["bt_loss"])

    history: list[dict[str, Any]] = []
    losses: list[float] = []
    best, best_step, best_state = (-1.0, -math.inf), 0, None
    stale, step, seen, stopped = 0, 0, 0, "done"
    if enc_held:
        best = held_out_score(0)
        best_state = {n: p.detach().clone() for n, p in zip(names, params, strict=True)}
    deadline = time.monotonic() + config.max_minutes * 60 if config.max_minutes else math.inf
    started = time.monotonic()
    run_loss = run_acc = None
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with _progress(progress and dist.is_main) as bar:
        task = bar.add_task("reward model", total=total_steps, loss=float("nan"), acc=float("nan"),
                            held=f"{best[0]:.3f}" if enc_held else "-")
        for _epoch in range(config.epochs):
            batches = length_batches(enc_train, config.batch_size, rng)
            for first in range(0, len(batches), config.grad_accum):
                group = batches[first:first + config.grad_accum]
                step_loss, step_acc, n_pairs = _accumulate(forward, group, enc_train, pad_id, config, dist)
                seen += n_pairs
                run_loss = step_loss if run_loss is None else 0.9 * run_loss + 0.1 * step_loss
                run_acc = step_acc if run_acc is None else 0.9 * run_acc + 0.1 * step_acc
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(step_loss)
                bar.update(task, completed=step, loss=run_loss, acc=run_acc)
                if enc_held and step % config.eval_every == 0:
                    score = held_out_score(step)
                    bar.update(task, held=f"{score[0]:.3f}")
                    if score > best:
                        best, best_step, stale = score, step, 0
                        best_state = {n: p.detach().clone() for n, p in zip(names, params, strict=True)}
                    else:
                        stale += 1
                    if dist.any(stale >= config.patience):
                        stopped = "early stop"
                        break
                if dist.any(time.monotonic() > deadline):  # clocks differ: one rank's deadline stops all
                    stopped = "time budget"
                    break
            if stopped != "done":
                break
    seconds = time.monotonic() - started
    if enc_held and (not history or history[-1]["step"] != step):
        score = held_out_score(step)
        if score > best:
            best, best_step, best_state = score, step, None  # the current weights are the best
    if best_state is not None and best_step != step:
        with torch.no_grad():
            for n, p in zip(names, params, strict=True):
                p.copy_(best_state[n])
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    seen = int(dist.all_reduce_sum(torch.tensor([float(seen)])).item())
    log.info("reward training %s after %d steps (%.0f s, %.2f pairs/s); best held-out step %d",
             stopped, step, seconds, seen / seconds if seconds else 0.0, best_step)
    return TrainResult(step, seen, seconds, stopped, best_step if enc_held else step, history, losses)


def _accumulate(forward: nn.Module, group: Sequence[list[int]], encoded: Sequence[EncodedPair], pad_id: int,
                config: RewardConfig, dist: Dist) -> tuple[float, float, int]:
    """Forward and backward of this rank's micro-batches of one optimizer step.

    Each micro-batch's loss is weighted N / len(group): DDP averages over the N ranks, so the
    gradient is the mean over the step's micro-batches, as with one process. A rank with no
    micro-batch in a short last group runs one with weight 0, so the all-reduce meets every
    rank. Returns (the step's mean loss and accuracy over all ranks, pairs this rank trained on).
    """
    mine = list(range(dist.rank, len(group), dist.world_size))
    work = [(j, 1.0) for j in mine] or [(0, 0.0)]
    scale = dist.world_size / len(group)
    sums = torch.zeros(2)  # loss, accuracy: sums over this rank's micro-batches, / len(group)
    pairs = 0
    device = dist.device
    for k, (j, weight) in enumerate(work):
        sync = k == len(work) - 1 or not dist.enabled
        with contextlib.nullcontext() if sync else forward.no_sync():  # type: ignore[operator]
            ids, mask = collate_pairs([encoded[x] for x in group[j]], pad_id)  # (2b, T)
            with _autocast(config, device):
                rewards = forward(ids, mask)  # (2b,)
            chosen_rewards, rejected_rewards = rewards.chunk(2)  # (b,), (b,)
            loss = bradley_terry_loss(chosen_rewards, rejected_rewards, config.margin)
            (loss * (weight * scale)).backward()
        if weight:
            pairs += len(group[j])
            acc = (chosen_rewards > rejected_rewards).float().mean()
            sums += torch.stack([loss.detach().float().cpu(), acc.cpu()]) / len(group)
    sums = dist.all_reduce_sum(sums)
    return float(sums[0]), float(sums[1]), pairs


# -- registry + refresh -------------------------------------------------------------


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
    if not (path / MANIFEST).is_file():  # on disk, not an invariant of this code: checked under -O too
        raise RewardModelMissing(f"the reward model pointer {pointer} names {path}, which has no {MANIFEST} "
                                 f"(removed or damaged): restore that folder, or point {pointer} at another "
                                 f"rm-v* folder of {reward_root(settings)}, or remove {pointer} to train anew")
    return path


def read_manifest(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((path / MANIFEST).read_text())
    return data


def reward_stats(model: Any, tokenizer: Any, pairs: Sequence[Pair], config: RewardConfig) -> dict[str, Any]:
    """Mean and std of rewards over both answers of `pairs`: PPO normalises rewards with them."""
    enc = encode_pairs(tokenizer, pairs, config.max_length)
    r = score_texts(model, tokenizer, [e.chosen for e in enc] + [e.rejected for e in enc], config)
    return {"mean": float(r.mean()) if len(r) else 0.0,
            "std": float(r.std()) if len(r) > 1 else 1.0, "n": len(r)}


def save_model(model: Any, tokenizer: Any, out: Path, manifest: dict[str, Any]) -> Path:
    """Write an HF folder plus manifest.json into a temp dir, then rename it to `out` at once."""
    with atomic_folder(out) as tmp:
        with _quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out.resolve()


def register_version(settings: Settings, model: Any, tokenizer: Any, manifest: dict[str, Any]) -> Path:
    """Save as the next rm-vN and point `current` at it (pointer replaced atomically)."""
    root = reward_root(settings)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := VERSION_RE.match(p.name))]
    version = f"rm-v{max(taken, default=0) + 1}"
    path = save_model(model, tokenizer, root / version, {"version": version, **manifest})
    write_atomic(root / POINTER, version + "\n")
    return path


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
    """Folder the training starts from: the current RM, or the policy for the first one."""
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


def plan_refresh(settings: Settings, config: RewardConfig, base_model: Path | None = None) -> RefreshPlan | RefreshResult:
    """What the next refresh trains on, or why there is none (module docstring of `refresh_reward_model`)."""
    current = current_version(settings)
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
    held, held_counts = pairs_from_events(held_events)
    new, new_counts = pairs_from_events(new_events)
    old, _ = pairs_from_events(old_events)
    name = current.name if current else None
    if not new:
        return RefreshResult(False, f"no new votes with a preference since {name or 'the start'}", name)
    if len(held) < settings.reward_min_holdout:
        return RefreshResult(False, f"only {len(held)} held-out pairs, need {settings.reward_min_holdout} "
                                    "to judge a new reward model", name)
    rng = random.Random(f"{config.seed}:{through}")
    replay = rng.sample(old, min(len(old), round(settings.reward_replay_fraction * len(new))))
    train_pairs, stop_pairs = split_pairs(new + replay, config.eval_fraction, salt="early-stop:")
    if len(stop_pairs) < settings.reward_early_stop_min_pairs:
        train_pairs, stop_pairs = train_pairs + stop_pairs, []
    # the lineage's first policy: what this RM was first trained from
    lineage = str(parent.get("base_model")) if parent else str(base_model or settings.model_dir)
    return RefreshPlan(config, current or base_model or settings.model_dir, name, parent, lineage, train_pairs,
                       stop_pairs, held, held_counts, new_counts, len(replay), through)


@dataclass
class Trained:
    """A refresh's trained model with its numbers, on every rank."""

    model: Any
    tokenizer: Any
    result: TrainResult
    before: dict[str, Any] | None
    after: dict[str, Any]


def train_refresh(plan: RefreshPlan, *, progress: bool = False, dist: Dist = ONE_PROCESS) -> Trained:
    """The part of a refresh every rank runs: load, measure the parent, train, measure again."""
    config = plan.config
    config.apply_threads()
    model, tokenizer = load_reward_model(plan.base, seed=config.seed)
    model.to(dist.device)
    enc_held = encode_pairs(tokenizer, plan.held, config.max_length)
    before = evaluate(model, enc_held, config, tokenizer.pad_token_id, dist) if plan.current else None
    result = train_reward_model(model, tokenizer, plan.train, plan.early_stop, config, progress=progress, dist=dist)
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
    3. Warm-start from the current RM (the policy `base_model` for the first), train.
    4. Gate: accept unless held-out accuracy falls more than `reward_gate_tolerance` below the
       current RM's (below 0.5, chance, for the first RM). Rejected votes are not marked as
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


def gate_and_register(settings: Settings, plan: RefreshPlan, trained: Trained, dist: Dist = ONE_PROCESS) -> RefreshResult:
    """Step 4 of the refresh, on rank 0: keep the new RM unless it reads the held-out votes worse."""
    result, before, after, name = trained.result, trained.before, trained.after, plan.current
    floor = (before["accuracy"] if before else 0.5) - settings.reward_gate_tolerance
    metrics = {"holdout": after, "parent_holdout": before, "gate_floor": floor,
               "train": {"steps": result.steps, "seconds": result.seconds, "pairs_per_s": result.pairs_per_s,
                         "stopped": result.stopped, "best_step": result.best_step, "history": result.history}}
    against = f"{name}'s {before['accuracy']:.3f}" if before else "chance (0.5)"
    if after["accuracy"] < floor:
        reason = (f"rejected: held-out accuracy {after['accuracy']:.3f} is below {against} by more than "
                  f"the tolerance {settings.reward_gate_tolerance} (n={after['pairs']}); {name or 'no RM'} stays current")
        log.warning("reward refresh %s", reason)
        return RefreshResult(False, reason, name, metrics)
    manifest = {
        "parent": name,
        "base_model": plan.base_model,
        "created": datetime.now(UTC).isoformat(),
        "data": {"new": plan.new_counts.as_dict(), "replay_pairs": plan.replay_pairs,
                 "holdout": plan.held_counts.as_dict(), "early_stop_pairs": len(plan.early_stop),
                 "trained_through_rowid": plan.through},
        "metrics": metrics,
        "reward_norm": {**reward_stats(trained.model, trained.tokenizer, plan.held, plan.config),
                        "reference": "held-out slice, both answers"},
        "config": asdict(plan.config),
        "distributed": dist.describe(),
    }
    path = register_version(settings, trained.model, trained.tokenizer, manifest)
    reason = f"accepted: held-out accuracy {after['accuracy']:.3f} vs {against} (n={after['pairs']})"
    log.info("reward refresh %s as %s", reason, path.name)
    return RefreshResult(True, reason, path.name, metrics)


__all__ = [
    "PairCounts", "RewardConfig", "bradley_terry_loss", "evaluate", "load_reward_model", "pairwise_metrics",
    "RefreshPlan", "plan_refresh", "refresh_reward_model", "sequence_rewards", "train_refresh", "train_reward_model",
    "wilson_interval",
]
