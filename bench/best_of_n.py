"""How much better can v0 get at all, and does the reward model see it? Best-of-n from v0, judged.

    KAIZEN_JUDGE_REWARD_MODEL=/tmp/rm/A python bench/best_of_n.py \\
        --second-judge simulation.judges:reward_model --reward-model votes=DATA/reward/current

The loop's policy update is KL-regularised reward maximisation; its optimum at a given KL is close
to what best-of-n sampling from the reference reaches at KL log n − (n−1)/n (Gao et al. 2022,
"Scaling laws for reward model overoptimization"; Beirami et al. 2024). So picking, from n answers
v0 samples for each evaluation prompt, the one a *selector* scores highest, and judging it against
v0's own answers exactly as `kaizen bench loop`'s evaluation does (same prompts, same baseline
answers and seeds, same win rate, length-controlled win rate and interval), says:

- with the judge's own score as the selector (`rubric`: `simulation.judges.rubric_score`): the
  ceiling of the policy update at that KL, whatever the votes teach (an oracle);
- with a reward model the loop learned from votes (`--reward-model votes=DIR`): how much of that
  ceiling the reward model can reach before any policy optimisation (its over-optimisation shows
  as a win rate that falls while n grows);
- with the hh reward-model judge as the selector (`--reward-model hh=DIR`): the second judge's own
  ceiling, and what the first judge thinks of it.

A row per (selector, n); k = 1 is a fresh sample against the baseline and must read ~0.5. A
report, not a test; it samples (vLLM, both cores), then scores (torch) after the engine is shut.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, judged_cells, provenance  # noqa: E402

Selector = Callable[[list[list[dict[str, str]]], list[Any]], list[float]]


def parse_args() -> tuple[argparse.Namespace, dict[str, Selector]]:
    """The options, checked, and the selectors they name."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="v0's folder (default: the served model)")
    ap.add_argument("--eval-prompts", type=Path, default=ROOT / "trainer" / "data" / "eval_prompts.jsonl")
    ap.add_argument("--n", type=int, default=16, help="answers sampled per prompt to choose from")
    ap.add_argument("--samples", type=int, default=1, help="baseline answers per prompt (the loop's 1)")
    ap.add_argument("--max-tokens", type=int, default=256, help="the loop evaluation's 256")
    ap.add_argument("--temperature", type=float, default=0.7, help="the loop evaluation's 0.7")
    ap.add_argument("--seed", type=int, default=0, help="the loop's seed (baseline answers: seed + 17)")
    ap.add_argument("--judge", default="simulation.judges:rubric")
    ap.add_argument("--second-judge", default=None)
    ap.add_argument("--reward-model", action="append", default=[], metavar="NAME=DIR",
                    help="a reward model as a selector (repeatable)")
    ap.add_argument("--no-oracle", action="store_true", help="leave out the rubric score as a selector")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--answers", type=Path, default=None,
                    help="a run's answers.jsonl: judge those again instead of sampling")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    if args.n < 1 or args.samples < 1:
        ap.error("--n and --samples must be at least 1")
    return args, selector_specs(ap, args)


def main() -> None:
    args, selectors = parse_args()

    from kaizen.core.settings import get_settings
    from simulation.evaluate import user_messages
    from simulation.judges import ready_judge
    from simulation.simulate import read_prompts

    settings = get_settings()
    model = args.model or settings.model_dir
    judges = {"judge": ready_judge(args.judge)}
    if args.second_judge:
        judges["second_judge"] = ready_judge(args.second_judge)
    prompts = read_prompts(args.eval_prompts)
    messages = user_messages(prompts)
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M")
    folder = args.out / f"best-of-n-{stamp}"
    folder.mkdir(parents=True, exist_ok=True)
    if args.answers:
        base, pool = read_sets(args.answers, prompts)
    else:
        base, pool = sample(settings, model, messages, args)
        write_sets(folder / "answers.jsonl", prompts, base, pool)
    sampled_s = time.monotonic() - started
    report: dict[str, Any] = {
        "model": str(model), "prompts": len(prompts), "n": args.n, "samples": args.samples,
        "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed,
        "judges": {k: getattr(args, k) for k in judges}, "provenance": provenance(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "sampling_s": round(sampled_s, 1),
        "mean_tokens": {"baseline": mean_len(base), "pool": mean_len(pool)}, "rows": []}
    n = min(len(v) for v in by_prompt_of(pool).values())
    report["n"] = n
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task("score and judge", total=len(selectors) * len(ks(n)))
        for name, select in selectors.items():
            t0 = time.monotonic()
            scores = select(messages, pool)
            report.setdefault("scoring_s", {})[name] = round(time.monotonic() - t0, 1)
            for k in ks(n):
                chosen = best_of(pool, scores, k, args.samples, len(prompts))
                report["rows"].append(judged_row(name, k, chosen, base, judges, messages, args))
                bar.console.print(row_line(report["rows"][-1]), markup=False, soft_wrap=True)
                bar.advance(task)
    path = folder / "best-of-n.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {path}")


def selector_specs(ap: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Selector]:
    """The selectors by name: the rubric's own score (unless --no-oracle), then each reward model."""
    out: dict[str, Selector] = {}
    if not args.no_oracle:
        out["rubric"] = rubric_selector
    for spec in args.reward_model:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not Path(folder).is_dir():
            ap.error(f"--reward-model wants NAME=DIR with an existing folder, got {spec!r}")
        if name in out:
            ap.error(f"selector {name!r} named twice")
        out[name] = reward_model_selector(Path(folder))
    if not out:
        ap.error("no selector: give --reward-model or leave out --no-oracle")
    return out


def rubric_selector(messages: list[list[dict[str, str]]], pool: list[Any]) -> list[float]:
    from simulation.judges import rubric_score

    return [rubric_score(messages[s.prompt][-1]["content"], s.text) for s in pool]


def reward_model_selector(folder: Path) -> Selector:
    from simulation.judges import RewardModelJudge

    rm = RewardModelJudge(folder)

    def select(messages: list[list[dict[str, str]]], pool: list[Any]) -> list[float]:
        return rm.scores([(messages[s.prompt], s.text) for s in pool])

    return select


def sample(settings: Any, model: Path, messages: list[Any],
           args: argparse.Namespace) -> tuple[dict[int, list[Any]], list[Any]]:
    """v0's baseline answers (the loop evaluation's seed) and the pool of n answers per prompt to
    choose from (another seed); the engine is shut before anything is scored."""
    from simulation.evaluate import by_prompt
    from trainer.policy import encode_prompt
    from trainer.rollout_engine import RolloutEngine

    engine = RolloutEngine(settings, model, seed=args.seed)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        ids = [encode_prompt(tokenizer, m, settings.ppo_max_prompt_length) for m in messages]
        draw = {"max_tokens": args.max_tokens, "temperature": args.temperature}
        print(f"sampling {len(ids)} prompts x ({args.samples} baseline + {args.n} pool) answers", flush=True)
        base = by_prompt(engine.generate(ids, n=args.samples, seed=args.seed + 17, **draw))
        pool = engine.generate(ids, n=args.n, seed=args.seed + 100_003, **draw)
    finally:
        engine.shutdown()
    return base, pool


def ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n (and n itself)."""
    out = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return out if out[-1] == n else [*out, n]


def best_of(pool: list[Any], scores: list[float], k: int, samples: int, prompts: int) -> dict[int, list[Any]]:
    """For each prompt and each of its `samples` baseline answers, the highest-scored answer of a
    group of k pool answers; the pool's n // k disjoint groups are used in turn."""
    per_prompt: dict[int, list[tuple[float, Any]]] = {}
    for s, score in zip(pool, scores, strict=True):
        per_prompt.setdefault(s.prompt, []).append((score, s))
    out: dict[int, list[Any]] = {}
    for i in range(prompts):
        answers = per_prompt.get(i, [])
        groups = max(1, len(answers) // k)
        out[i] = [max(answers[(j % groups) * k:(j % groups + 1) * k], key=lambda t: t[0])[1]
                  for j in range(samples) if answers]
    return out


def judged_row(selector: str, k: int, chosen: dict[int, list[Any]], base: dict[int, list[Any]],
               judges: dict[str, Any], messages: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """One (selector, k) row: the KL bound of best-of-k, the chosen answers' length, and each
    judge's verdict on them against the baseline (the loop evaluation's `judge_pairs`)."""
    from simulation.evaluate import judge_pairs

    row: dict[str, Any] = {"selector": selector, "n": k, "kl_bound": round(math.log(k) - (k - 1) / k, 3),
                           "mean_tokens": mean_len(chosen)}
    for key, judge in judges.items():
        row[key] = judge_pairs(judge, messages, chosen, base, args.bootstrap, args.seed)
    return row


def write_sets(path: Path, prompts: list[str], base: dict[int, list[Any]], pool: list[Any]) -> None:
    """The baseline's and the pool's answers, a JSON line each, for `--answers`."""
    rows = [("baseline", s) for v in base.values() for s in v] + [("pool", s) for s in pool]
    path.write_text("".join(json.dumps({"set": name, "prompt_index": s.prompt, "prompt": prompts[s.prompt],
                                        "text": s.text, "token_ids": list(s.token_ids),
                                        "finished": s.finished}) + "\n" for name, s in rows))


def read_sets(path: Path, prompts: list[str]) -> tuple[dict[int, list[Any]], list[Any]]:
    """`write_sets`' file, checked against the evaluation prompts it was sampled on."""
    from trainer.rollout_engine import Sample

    base: list[Any] = []
    pool: list[Any] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        row = json.loads(line)
        i = int(row["prompt_index"])
        if i >= len(prompts) or prompts[i] != row["prompt"]:
            raise SystemExit(f"{path}:{n}: sampled on other prompts than --eval-prompts")
        sample = Sample(i, [int(t) for t in row["token_ids"]], str(row["text"]), bool(row["finished"]))
        (base if row["set"] == "baseline" else pool).append(sample)
    return by_prompt_of(base), pool


def by_prompt_of(samples: list[Any]) -> dict[int, list[Any]]:
    from simulation.evaluate import by_prompt

    return by_prompt(samples)


def mean_len(samples: Any) -> float:
    items = [s for v in samples.values() for s in v] if isinstance(samples, dict) else list(samples)
    return round(sum(len(s.token_ids) for s in items) / max(1, len(items)), 1)


def row_line(row: dict[str, Any]) -> str:
    head = (f"{row['selector']:>8} best of {row['n']:>2} "
            f"(KL <= {row['kl_bound']:.2f}, {row['mean_tokens']} tok)")
    return " | ".join([head, *judged_cells(row)])


if __name__ == "__main__":
    main()
