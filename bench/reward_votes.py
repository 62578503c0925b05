"""Can the reward model learn a judge from a few hundred votes? Settings side by side.

    python bench/reward_votes.py --train 150 --train 300 --config '{}' --config '{"epochs": 3, "lr": 5e-5}'

What a training round sees, without the service: the default model answers the voters'
prompts (trainer/data/prompts.jsonl) four times each at temperature 1.0, 64 tokens (what
`kaizen bench loop` asks for), a judge (default the rubric) decides every pair of answers to
one prompt; the evaluation prompts (never trained on) give the test pairs the same way, decided
ones only. Then, for every (train size, config) combination, a reward model is trained from
the policy's weights with `reward_*` settings overridden by the config, and its accuracy on
the test pairs is printed with its Wilson 95% interval. A train size draws that many votes,
ties included, once for all configs; a config trains on their ties (pairs labelled 0.5) only
when its `tie_weight` is above 0, as a refresh does. All combinations run in one process on
the same pairs, so the accuracies compare; times are only indicative (a noisy machine).
With the rubric judge, `--by-rubric-part` also splits the test accuracy by the quality that decided
each pair (`simulation.judges.deciding_part`): which of the judge's preferences the votes taught.
A report, never a pass/fail test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kaizen.core.settings import get_settings  # noqa: E402
from simulation.judges import deciding_part, load_judge  # noqa: E402
from trainer.reward_data import Pair, encode_pairs  # noqa: E402
from trainer.reward_eval import pairwise_metrics, score_pairs, wilson_interval  # noqa: E402
from trainer.reward_model import RewardConfig, load_reward_model  # noqa: E402
from trainer.reward_train import train_reward_model  # noqa: E402
from simulation.simulate import DEFAULT_EVAL_PROMPTS, DEFAULT_JUDGE, DEFAULT_PROMPTS, read_prompts  # noqa: E402


def judged_pairs(engine: object, tokenizer: object, prompts: list[str], judge: object, samples: int,
                 max_tokens: int, seed: int, tag: str) -> tuple[list[Pair], int]:
    from trainer.policy import encode_prompt

    ids = [encode_prompt(tokenizer, [{"role": "user", "content": p}], 256) for p in prompts]
    out = engine.generate(ids, max_tokens=max_tokens, temperature=1.0, n=samples, seed=seed)  # type: ignore[attr-defined]
    by_prompt: dict[int, list[str]] = {}
    for s in out:
        by_prompt.setdefault(s.prompt, []).append(s.text)
    pairs, undecided = [], 0
    for i, texts in sorted(by_prompt.items()):
        messages = [{"role": "user", "content": prompts[i]}]
        for a, b in itertools.combinations(texts, 2):
            verdict = judge(messages, a, b)  # type: ignore[operator]
            if verdict in (0, 1):
                chosen, rejected = (a, b) if verdict == 0 else (b, a)
                pairs.append(Pair(messages, chosen, rejected, key=f"{tag}{i}"))
            elif verdict == "tie":
                pairs.append(Pair(messages, a, b, key=f"{tag}{i}", label=0.5))
            else:
                undecided += 1
    return pairs, undecided


def by_part(pairs: list[Pair], right: list[bool]) -> dict[str, dict[str, float]]:
    """Accuracy over the pairs grouped by the rubric quality that decided them."""
    groups: dict[str, list[bool]] = {}
    for p, ok in zip(pairs, right, strict=True):
        groups.setdefault(deciding_part(p.prompt[-1]["content"], p.chosen, p.rejected), []).append(ok)
    return {k: {"accuracy": sum(v) / len(v), "pairs": len(v)} for k, v in sorted(groups.items())}


def train_and_test(args: argparse.Namespace, settings: Any, train: list[Pair], test: list[Pair],
                   overrides: dict[str, Any]) -> dict[str, Any]:
    """One table row: a reward model trained on `train` with the overrides, scored on `test`."""
    config = RewardConfig.from_settings(settings, threads=args.threads, eval_fraction=0.0, **overrides)
    train = [p for p in train if p.decided or config.tie_weight > 0]
    model, tok = load_reward_model(args.model, seed=0)
    result = train_reward_model(model, tok, train, [], config, progress=sys.stderr.isatty())
    chosen, rejected = score_pairs(model, encode_pairs(tok, test, config.max_length), config, tok.pad_token_id)
    m = pairwise_metrics(chosen, rejected)
    lo, hi = wilson_interval(round(m["accuracy"] * m["pairs"]), m["pairs"])
    row = {"train_pairs": len(train), "config": overrides, "accuracy": m["accuracy"], "ci95": [lo, hi],
           "test_pairs": m["pairs"], "train_s": result.seconds, "steps": result.steps}
    print(f"| {len(train)} | `{json.dumps(overrides)}` | {m['accuracy']:.3f} | {lo:.3f}-{hi:.3f} | "
          f"{result.seconds:.0f} |", flush=True)
    if args.by_rubric_part:
        parts = row["by_rubric_part"] = by_part(test, (chosen > rejected).tolist())
        print("  by deciding part:", ", ".join(f"{k} {v['accuracy']:.2f} (n={v['pairs']})"
                                               for k, v in parts.items()), flush=True)
    return row


def main() -> None:
    settings = get_settings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=settings.model_dir)
    ap.add_argument("--judge", default=DEFAULT_JUDGE)
    ap.add_argument("--train", type=int, action="append", help="training pairs (repeat); default 150")
    ap.add_argument("--config", action="append", help="JSON of RewardConfig overrides (repeat); default {}")
    ap.add_argument("--samples", type=int, default=4, help="answers per prompt")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--by-rubric-part", action="store_true",
                    help="split the test accuracy by the rubric quality that decided each pair")
    args = ap.parse_args()
    sizes = args.train or [150]
    configs = [json.loads(c) for c in (args.config or ["{}"])]

    from transformers import AutoTokenizer

    from trainer.rollout_engine import RolloutEngine

    judge = load_judge(args.judge)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    engine = RolloutEngine(settings, args.model, max_model_len=settings.engine_max_model_len, seed=args.seed)
    try:
        t = time.monotonic()
        train_all, train_undecided = judged_pairs(engine, tokenizer, read_prompts(DEFAULT_PROMPTS), judge,
                                                  args.samples, args.max_tokens, args.seed, "train")
        test, test_undecided = judged_pairs(engine, tokenizer, read_prompts(DEFAULT_EVAL_PROMPTS), judge,
                                            args.samples, args.max_tokens, args.seed + 1, "test")
        test_undecided += sum(not p.decided for p in test)
        test = [p for p in test if p.decided]
        sampling_s = time.monotonic() - t
    finally:
        engine.shutdown()
    ties = sum(not p.decided for p in train_all)
    print(f"pairs: {len(train_all)} to train from ({ties} of them ties; {train_undecided} both bad), "
          f"{len(test)} to test "
          f"({test_undecided} undecided); sampling {sampling_s:.0f} s", flush=True)

    rows = []
    rng = random.Random(args.seed)
    print("\n| train pairs | config | test accuracy | 95% CI | train s |\n| --- | --- | --- | --- | --- |", flush=True)
    drawn = {n: rng.sample(train_all, min(n, len(train_all))) for n in sizes}  # the same for every config
    for n, overrides in itertools.product(sizes, configs):
        rows.append(train_and_test(args, settings, drawn[n], test, overrides))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    report = {"commit": commit, "date": datetime.now(UTC).isoformat(), "hardware": platform.processor() or
              platform.machine(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
              "pairs": {"train": len(train_all), "test": len(test)}}
    out = args.out or ROOT / "bench" / "results" / f"reward-votes-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
