"""The reward model's learning rate under a time budget: two trainings of the same pairs in the
same time, differing in one or more RewardConfig fields (`--arm`, twice). By default the decay
planned to end with the budget (reward_budget_decay, trainer/reward_train.LrPlan) against the
epochs' plan cut by the clock.

    python bench/reward_budget.py --train RUN/data/preferences.sqlite --test OTHER/data/preferences.sqlite \\
        --minutes 5
    python bench/reward_budget.py --train RUN/data/preferences.sqlite --test OTHER/data/preferences.sqlite \\
        --minutes 5 --arm lr=1e-4 --arm lr=5e-5
    python bench/reward_budget.py --train ../shared/data/hh_harmless_train.jsonl \\
        --test ../shared/data/hh_harmless_test.jsonl --minutes 4

Both trainings start from the same weights (`--model`, default the policy: a round's first reward
model), read the same pairs in the same order with the same seed and the same budget, one after
the other in one process; only the arms' fields differ. Each is then read on the test
pairs (decided ones; a vote store's or a pairs file's), split by whether the training saw their
prompt: accuracy with its Wilson 95% interval, the Bradley–Terry loss, and the paired difference
of both (first arm − second) with a bootstrap 95% interval over the test pairs. A report, never a
pass/fail test; the times are only indicative (a noisy machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import save_report  # noqa: E402
from kaizen.core.settings import get_settings  # noqa: E402
from trainer.reward_data import Pair, encode_pairs, pairs_from_events, read_pairs_file  # noqa: E402
from trainer.reward_eval import score_pairs, wilson_interval  # noqa: E402
from trainer.reward_model import RewardConfig, load_reward_model  # noqa: E402
from trainer.reward_train import train_reward_model  # noqa: E402
from trainer.store import PreferenceStore, prompt_key  # noqa: E402
from simulation.evaluate import bootstrap_interval  # noqa: E402


def read_source(path: Path) -> list[Pair]:
    """The decided pairs of a pairs file (.jsonl) or of a preference store (a .sqlite of votes)."""
    if path.suffix == ".sqlite":
        store = PreferenceStore(path)
        try:
            events = [ev for _, ev in store.events_between(0)]
        finally:
            store.close()
        return pairs_from_events(events)[0]
    return [p for p in read_pairs_file(path) if p.decided]


def paired_difference(a: torch.Tensor, b: torch.Tensor, resamples: int = 2000,
                      seed: int = 0) -> dict[str, float]:
    """mean(a - b) over paired values (N,), (N,) with a percentile bootstrap 95% interval (the loop
    evaluation's `bootstrap_interval`, over the pairs' differences)."""
    diff = (a - b).double().tolist()
    low, high = bootstrap_interval(diff, resamples, seed)
    return {"mean": sum(diff) / len(diff) if diff else float("nan"), "low": low, "high": high}


def per_pair(model: Any, tok: Any, pairs: list[Pair], config: RewardConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(right (N,) 1/0, Bradley–Terry loss (N,)) of each test pair."""
    chosen, rejected = score_pairs(model, encode_pairs(tok, pairs, config.max_length), config, tok.pad_token_id)
    margin = chosen - rejected
    return (margin > 0).float(), F.softplus(-margin)


def parse_arm(text: str) -> dict[str, Any]:
    """`lr=1e-4,budget_decay=true` -> {"lr": 1e-4, "budget_decay": True}: RewardConfig fields, each
    value read as JSON (so true/false, numbers), else kept as a string."""
    fields = {f.name for f in dataclasses.fields(RewardConfig)}
    arm: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, raw = item.partition("=")
        if not sep or name not in fields:
            raise argparse.ArgumentTypeError(f"{item!r}: not FIELD=VALUE with a RewardConfig field "
                                             f"({', '.join(sorted(fields))})")
        try:
            arm[name] = json.loads(raw)
        except json.JSONDecodeError:
            arm[name] = raw
    return arm


def train_and_read(args: argparse.Namespace, arm: dict[str, Any], train: list[Pair],
                   tests: dict[str, list[Pair]]) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    settings = get_settings()
    config = RewardConfig.from_settings(settings, **{"max_minutes": args.minutes, "threads": args.threads,
                                                     "epochs": args.epochs, **arm})
    model, tok = load_reward_model(args.model, seed=config.seed)
    result = train_reward_model(model, tok, train, [], config, progress=not args.quiet)
    row: dict[str, Any] = {"arm": arm, "budget_decay": config.budget_decay, "lr": config.lr,
                           "train": result.record() | {"losses": result.losses}}
    read = {}
    for name, pairs in tests.items():
        right, loss = read[name] = per_pair(model, tok, pairs, config)
        k = int(right.sum())
        row[name] = {"pairs": len(pairs), "accuracy": k / len(pairs) if pairs else None,
                     "accuracy_ci95": wilson_interval(k, len(pairs)), "bt_loss": float(loss.mean())}
    return row, read


def split_by_prompt(train: list[Pair], test: list[Pair], limit: int, seed: int) -> dict[str, list[Pair]]:
    """Test pairs whose prompt the training saw, and the others, `limit` each (drawn with `seed`)."""
    seen_prompts = {prompt_key(p.prompt) for p in train}
    shuffled = list(test)
    random.Random(seed).shuffle(shuffled)
    seen = [p for p in shuffled if prompt_key(p.prompt) in seen_prompts][:limit]
    unseen = [p for p in shuffled if prompt_key(p.prompt) not in seen_prompts][:limit]
    return {k: v for k, v in (("unseen", unseen), ("seen", seen)) if v}


def main() -> None:
    settings = get_settings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, action="append", required=True, help="pairs file or store (repeat)")
    ap.add_argument("--test", type=Path, action="append", required=True, help="pairs file or store (repeat)")
    ap.add_argument("--minutes", type=float, required=True, help="each training's time budget")
    ap.add_argument("--epochs", type=int, default=settings.reward_epochs, help="the planned epochs")
    ap.add_argument("--model", type=Path, default=settings.model_dir, help="the weights both start from")
    ap.add_argument("--test-pairs", type=int, default=80, help="test pairs per side (seen / unseen prompt)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arm", type=parse_arm, action="append",
                    help="RewardConfig fields of one training, FIELD=VALUE[,...] (twice; default: "
                         "budget_decay=true, then budget_decay=false)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    arms = args.arm or [{"budget_decay": True}, {"budget_decay": False}]
    if len(arms) != 2:
        ap.error("--arm: give it twice (the first minus the second is reported), or not at all")
    train = [p for path in args.train for p in read_source(path)]
    tests = split_by_prompt(train, [p for path in args.test for p in read_source(path)], args.test_pairs, args.seed)
    print(f"{len(train)} training pairs; test: " + ", ".join(f"{k} {len(v)}" for k, v in tests.items()), flush=True)
    rows, reads = [], []
    names = [",".join(f"{k}={v}" for k, v in arm.items()) for arm in arms]
    for name, arm in zip(names, arms):
        row, read = train_and_read(args, arm, train, tests)
        rows.append(row)
        reads.append(read)
        t = row["train"]
        print(f"{name}: {t['steps']} of {t['planned_steps']} steps in {t['seconds']:.0f} s, "
              f"last lr x{t['lr_end']:.2f}; " + "; ".join(
                  f"{k} accuracy {row[k]['accuracy']:.3f} [{row[k]['accuracy_ci95'][0]:.3f}, "
                  f"{row[k]['accuracy_ci95'][1]:.3f}] BT loss {row[k]['bt_loss']:.4f}" for k in tests), flush=True)
    differences = {k: {"accuracy": paired_difference(reads[0][k][0], reads[1][k][0]),
                       "bt_loss": paired_difference(reads[0][k][1], reads[1][k][1])} for k in tests}
    for k, d in differences.items():
        print(f"{k}, {names[0]} − {names[1]}: accuracy {d['accuracy']['mean']:+.3f} [{d['accuracy']['low']:+.3f}, "
              f"{d['accuracy']['high']:+.3f}], BT loss {d['bt_loss']['mean']:+.4f} "
              f"[{d['bt_loss']['low']:+.4f}, {d['bt_loss']['high']:+.4f}]")
    save_report(args.out, "reward-budget", {"command": sys.argv, "args": vars(args), "rows": rows,
                                            "first_minus_second": differences})


if __name__ == "__main__":
    main()
