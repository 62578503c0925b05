"""Reward-model benchmark: Bradley–Terry on real human pairs, accuracy per file.

    python bench/reward.py --max-minutes 20          # the full run recorded in bench/README.md
    python bench/reward.py --speed                   # seconds per step for threads/dtype/layers choices

Trains the default model's reward model (SmolLM2-135M-Instruct, new scalar head) on
hh_harmless_train plus 75% of pandalm_pairs, early-stopping on a slice of that, then
evaluates on hh_harmless_test and on the other 25% of pandalm_pairs (split by a stable
hash of the prompt, so no prompt is on both sides). Per file it prints accuracy with its
Wilson 95% interval next to the "longer answer wins" baseline: a model that only learned
length scores well on one file and below chance on the other (../shared/data/README.md).
A report, never a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kaizen.core.settings import Settings, get_settings  # noqa: E402
from trainer.reward_data import Pair, collate_pairs, encode_pairs, read_pairs_file, split_pairs  # noqa: E402
from trainer.reward_eval import evaluate, format_metrics  # noqa: E402
from trainer.reward_model import (  # noqa: E402
    RewardConfig, autocast, bradley_terry_loss, freeze_lower_layers, load_reward_model, sequence_rewards,
)
from trainer.reward_train import train_reward_model  # noqa: E402


def hardware() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "trainer", "bench"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def longer_wins(pairs: list[Pair]) -> float:
    return sum(len(p.chosen) > len(p.rejected) for p in pairs) / len(pairs)


def speed(settings: Settings, model_dir: Path, pairs: list[Pair], max_length: int, steps: int) -> None:
    """Seconds per micro-batch of 8 real pairs for each choice; the first batch is a warm-up."""
    rng = random.Random(0)
    sample = rng.sample(pairs, 8 * (steps + 1))
    print(f"{'threads':>7} {'dtype':>9} {'layers':>6}  s/batch  pairs/s  (max_length {max_length})")
    for threads, dtype, layers in [(2, "bfloat16", 8), (1, "bfloat16", 8), (2, "float32", 8),
                                   (2, "bfloat16", 0), (2, "bfloat16", 4), (2, "bfloat16", 16)]:
        torch.set_num_threads(threads)
        config = RewardConfig.from_settings(settings, max_length=max_length, dtype=dtype, train_layers=layers,
                                            threads=threads)
        model, tok = load_reward_model(model_dir)
        freeze_lower_layers(model, layers)
        enc = encode_pairs(tok, sample, max_length)
        times = []
        for b in range(steps + 1):
            ids, mask = collate_pairs(enc[8 * b: 8 * b + 8], tok.pad_token_id)
            start = time.perf_counter()
            with autocast(config):
                r = sequence_rewards(model, ids, mask)
            bradley_terry_loss(*r.chunk(2)).backward()
            times.append(time.perf_counter() - start)
        per = sum(times[1:]) / steps
        print(f"{threads:>7} {dtype:>9} {layers:>6}  {per:7.2f}  {8 / per:7.2f}", flush=True)


def trunk_speed(model_dir: Path, pairs: list[Pair], config: RewardConfig, n: int) -> None:
    """The same training (n real pairs, `config`: the shipped epochs, layers and dtype) with the frozen
    trunk computed at every pass and from the cache (trainer/trunk.py), back to back, cache second."""
    rng = random.Random(0)
    sample = rng.sample(pairs, n)
    seconds, losses = {}, {}
    for cache_mb in (0, config.trunk_cache_mb or Settings.model_fields["reward_trunk_cache_mb"].default):
        run = RewardConfig(**{**asdict(config), "trunk_cache_mb": cache_mb, "max_minutes": None})
        model, tok = load_reward_model(model_dir, seed=run.seed)
        result = train_reward_model(model, tok, sample, [], run, progress=sys.stderr.isatty())
        seconds[cache_mb], losses[cache_mb] = result.seconds, result.losses
        print(f"trunk cache {cache_mb} MB: {result.steps} steps in {result.seconds:.1f} s, "
              f"{result.pairs_per_s:.2f} pairs/s, last loss {result.losses[-1]:.4f}", flush=True)
    plain, cached = seconds.values()
    gap = max(abs(a - b) for a, b in zip(*losses.values(), strict=True))
    print(f"trunk cache: {plain / cached:.2f}x the training speed ({n} pairs, {config.epochs} epochs, "
          f"top {config.train_layers} layers, {config.dtype}, {config.threads} threads); largest step-loss "
          f"difference {gap:.4f}; {hardware()}; commit {commit()}", flush=True)


def arguments(settings: Settings) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--model", type=Path, default=settings.model_dir)
    ap.add_argument("--max-minutes", type=float, default=20.0,
                    help="training budget (evaluation comes after)")
    ap.add_argument("--pandalm-test", type=float, default=0.25, help="share of pandalm prompts held out")
    ap.add_argument("--limit", type=int, default=None, help="evaluate on at most this many pairs per file")
    ap.add_argument("--out", type=Path, default=None, help="JSON report [bench/results/reward-<time>.json]")
    ap.add_argument("--speed", action="store_true", help="time configurations instead of training")
    ap.add_argument("--speed-steps", type=int, default=3)
    ap.add_argument("--trunk-speed", type=int, default=None, metavar="PAIRS",
                    help="time training PAIRS pairs with and without the frozen-trunk cache instead")
    for name in ("lr", "epochs", "batch_size", "grad_accum", "max_length", "train_layers", "eval_every",
                 "patience", "threads", "seed"):
        kind = float if name == "lr" else int
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    ap.add_argument("--eval-fraction", type=float, default=None)
    return ap.parse_args()


def main() -> None:
    settings = get_settings()
    args = arguments(settings)

    hh_train = read_pairs_file(args.data_dir / "hh_harmless_train.jsonl")
    hh_test = read_pairs_file(args.data_dir / "hh_harmless_test.jsonl")
    pandalm_train, pandalm_test = split_pairs(read_pairs_file(args.data_dir / "pandalm_pairs.jsonl"),
                                              args.pandalm_test, salt="bench:")
    config = RewardConfig.from_settings(settings, **{k: getattr(args, k) for k in (
        "lr", "epochs", "batch_size", "grad_accum", "max_length", "train_layers", "eval_every", "patience",
        "threads", "seed", "dtype", "eval_fraction")}, max_minutes=args.max_minutes)
    if args.speed:
        speed(settings, args.model, hh_train + pandalm_train, config.max_length, args.speed_steps)
        return
    if args.trunk_speed:
        config.apply_threads()
        trunk_speed(args.model, hh_train + pandalm_train, config, args.trunk_speed)
        return
    config.apply_threads()
    train, stop = split_pairs(hh_train + pandalm_train, config.eval_fraction)
    tests = {"hh_harmless_test": hh_test[: args.limit], "pandalm held-out": pandalm_test[: args.limit]}
    print(f"train {len(train)} pairs (hh {len(hh_train)} + pandalm {len(pandalm_train)}, minus {len(stop)} "
          f"for early stopping); test: " + ", ".join(f"{k} {len(v)}" for k, v in tests.items()), flush=True)
    print(f"config: {config}", flush=True)

    model, tok = load_reward_model(args.model, seed=config.seed)
    result = train_reward_model(model, tok, train, stop, config, progress=sys.stderr.isatty())
    print(f"training: {result.stopped} after {result.steps} steps, {result.seconds:.0f} s, "
          f"{result.pairs_per_s:.2f} pairs/s; best held-out step {result.best_step}; "
          f"history {result.history}", flush=True)
    report: dict[str, Any] = {
        "command": " ".join(sys.argv), "commit": commit(), "hardware": hardware(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "config": asdict(config),
        "train_pairs": len(train), "early_stop_pairs": len(stop), "train_seconds": result.seconds,
        "pairs_per_s": result.pairs_per_s, "steps": result.steps, "stopped": result.stopped,
        "history": result.history, "files": {}}
    evaluate_files(model, tok, tests, config, report)
    print(f"training {result.seconds / 60:.1f} min, {result.pairs_per_s:.2f} pairs/s; {report['hardware']}; "
          f"commit {report['commit']}")
    out = args.out or ROOT / "bench" / "results" / f"reward-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def evaluate_files(model: Any, tok: Any, tests: dict[str, list[Pair]], config: RewardConfig,
                   report: dict[str, Any]) -> None:
    """Metrics of each test file into report["files"], printed, then the Markdown table of bench/README.md."""
    for name, pairs in tests.items():
        started = time.monotonic()
        m = evaluate(model, encode_pairs(tok, pairs, config.max_length), config, tok.pad_token_id)
        m["eval_seconds"] = time.monotonic() - started
        m["longer_wins"] = longer_wins(pairs)
        report["files"][name] = m
        print(format_metrics(name, m), flush=True)
    print("\n| file | pairs | accuracy | 95% CI | longer-wins baseline |\n|---|---|---|---|---|")
    for name, m in report["files"].items():
        lo, hi = m["accuracy_ci95"]
        print(f"| {name} | {m['pairs']} | {m['accuracy']:.3f} | {lo:.3f}-{hi:.3f} | {m['longer_wins']:.3f} |")


if __name__ == "__main__":
    main()
