"""Evaluating a reward model on preference pairs: pairwise accuracy with its Wilson interval,
mean margin, Bradley–Terry loss and calibration, sharded over ranks; the reward statistics
PPO normalises with; and the length-controlled win rate that the round's gate (trainer/gate.py) and
the loop's evaluation (simulation/evaluate.py) read beside the raw one.

    kaizen reward eval --model rm/ --data ../shared/data/hh_harmless_test.jsonl

`evaluate` is what early stopping (trainer/reward_train.py), the refresh's gate
(trainer/reward.py) and `kaizen reward eval` (kaizen/reward_cli.py) read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from trainer.distributed import ONE_PROCESS, Dist
from trainer.reward_data import EncodedPair, Pair, collate_pairs, encode_pairs, length_batches
from trainer.reward_model import (
    RewardConfig,
    autocast,
    bradley_terry_loss,
    model_device,
    score_texts,
    sequence_rewards,
)


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
        with autocast(config, model_device(model)):
            r = sequence_rewards(model, ids, mask).cpu()  # (2b,)
        chosen[batch], rejected[batch] = r[: len(batch)], r[len(batch):]
    if dist.enabled:
        both = dist.all_reduce_sum(torch.stack([chosen, rejected]))  # (2, N)
        chosen, rejected = both[0], both[1]
    return chosen, rejected


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
    """`pairwise_metrics` of `encoded` and, as "norm", the `score_norm` of both answers' scores (what
    a manifest's reward_norm holds: read here, a refresh need not score its held-out slice a second
    time after its held-out metrics, as it did until 2026-12-06); the same numbers on every rank."""
    chosen, rejected = score_pairs(model, encoded, config, pad_id, dist)
    return {**pairwise_metrics(chosen, rejected), "norm": score_norm(torch.cat([chosen, rejected]))}


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


def reward_stats(model: Any, tokenizer: Any, pairs: Sequence[Pair], config: RewardConfig) -> dict[str, Any]:
    """Mean and std of rewards over both answers of `pairs`: PPO normalises rewards with them."""
    enc = encode_pairs(tokenizer, pairs, config.max_length)
    seqs = [e.chosen for e in enc] + [e.rejected for e in enc]
    return score_norm(score_texts(model, tokenizer, seqs, config))


def score_norm(rewards: torch.Tensor) -> dict[str, Any]:
    """{"mean", "std", "n"} of rewards (N,); 0 and 1 where there are too few to measure."""
    return {"mean": float(rewards.mean()) if len(rewards) else 0.0,
            "std": float(rewards.std()) if len(rewards) > 1 else 1.0, "n": len(rewards)}


def length_controlled_win_rate(outcomes: Sequence[float], length_diffs: Sequence[float],
                               l2: float = 1e-3) -> float:
    """The win rate at equal length: σ(θ₀) of the logistic regression outcome ~ θ₀ + θ₁·tanh(Δ/s).

    outcomes: 1 win, 0 loss, 0.5 tie (a fractional response: half a win, half a loss);
    length_diffs: the version's answer minus the other's (v0's in the evaluation, the champion's in
    the gate), in tokens; s: their standard deviation.
    AlpacaEval 2.0's length-controlled win rate (Dubois et al. 2024) in its simplest form: the
    judge's preference for longer (or shorter) answers goes into θ₁, what is left at Δ = 0 is
    the preference for the version itself. Fitted by Newton's method (a tiny L2 keeps it finite
    when every verdict is the same).
    """
    import numpy as np

    y = np.asarray(outcomes, dtype=np.float64)
    if len(y) == 0:
        return float("nan")
    d = np.asarray(length_diffs, dtype=np.float64)
    scale = d.std() or 1.0
    X = np.stack([np.ones_like(d), np.tanh(d / scale)], axis=1)  # (n, 2)
    theta = np.zeros(2)
    for _ in range(50):
        p = 1 / (1 + np.exp(-(X @ theta)))
        grad = X.T @ (p - y) + l2 * theta
        hess = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-9:
            break
    return float(1 / (1 + np.exp(-theta[0])))
