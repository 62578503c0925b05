"""Weights along the line from v0 to a trained version, judged as the loop's evaluation judges.

    KAIZEN_JUDGE_REWARD_MODEL=/tmp/rm/A python bench/interpolate.py --run RUN_DIR \\
        --alpha 0.5 --alpha 1 --alpha 1.5 --alpha 2

RUN_DIR is a `kaizen bench loop --out` folder whose data folder still holds the versions' weights
(`data/registry/versions/vN`). For each alpha the policy θ(α) = θ0 + α (θN − θ0) answers the loop's
evaluation prompts with the loop's own sampling (its seed + EVAL_SEED, max tokens, temperature) and
is judged against v0's answers kept in RUN_DIR/answers.jsonl, pair for pair, by the loop's judge and
its second judge: win rate with its interval over prompts, length-controlled win rate, mean tokens,
and the KL to v0 on its own answers. α = 1 is the version itself sampled again: it must read what
the loop read (the check that the comparison is the loop's); α < 1 is interpolation towards v0
(WARP's "LITI", Ramé et al. 2024), α > 1 extrapolation (ExPO, Zheng et al. 2024, which found
under-trained aligned models gain from it). A one-hour round on two cores is under-trained by any
measure, so whether a step along the same direction reads better, on both judges and at equal
length, is a question the loop's own rows cannot answer. A report, not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, judged_cells, provenance  # noqa: E402

WEIGHTS = "model.safetensors"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a `kaizen bench loop --out` folder")
    ap.add_argument("--version", default="v1", help="the trained version that sets the direction")
    ap.add_argument("--alpha", type=float, action="append", default=[],
                    help="a point on the line (repeatable)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    if not args.alpha:
        ap.error("give at least one --alpha")
    for name in ("v0", args.version):
        if not (args.run / "data" / "registry" / "versions" / name / WEIGHTS).is_file():
            ap.error(f"{args.run} keeps no weights of {name} (data/registry/versions/{name}/{WEIGHTS})")
    if not (args.run / "answers.jsonl").is_file() or not (args.run / "loop.json").is_file():
        ap.error(f"{args.run} has no answers.jsonl and loop.json (a loop run of 2d3336b or later)")
    return args


def blend(v0: Path, vn: Path, alpha: float, out: Path) -> int:
    """θ0 + α (θN − θ0), in float32, into `out` (vN's other files copied); the tensors that differ."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(vn, out, dirs_exist_ok=True)
    base, tuned = load_file(v0 / WEIGHTS), load_file(vn / WEIGHTS)
    if base.keys() != tuned.keys():
        raise SystemExit(f"{v0} and {vn} hold different tensors: not one architecture")
    blended, moved = {}, 0
    for name, t in tuned.items():
        a, b = base[name].float(), t.float()
        moved += int(not bool((a == b).all()))
        blended[name] = (a + alpha * (b - a)).contiguous()
    save_file(blended, str(out / WEIGHTS), metadata={"format": "pt"})
    return moved


def main() -> None:
    args = parse_args()
    from kaizen.core.settings import get_settings
    from simulation.evaluate import read_answers, user_messages
    from simulation.judges import ready_judge
    from trainer.policy import encode_prompt

    loop = json.loads((args.run / "loop.json").read_text())
    config = loop["config"]
    versions = args.run / "data" / "registry" / "versions"
    prompts, kept = read_answers(args.run / "answers.jsonl")
    messages = user_messages(prompts)
    judges = {"judge": ready_judge(config.get("eval_judge") or config["judge"])}
    if config.get("second_judge"):
        judges["second_judge"] = ready_judge(config["second_judge"])
    settings = get_settings()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(versions / "v0")
    ids = [encode_prompt(tokenizer, m, settings.ppo_max_prompt_length) for m in messages]
    folder = args.out / f"interpolate-{datetime.now(UTC).strftime('%Y%m%dT%H%M')}"
    folder.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"run": str(args.run), "version": args.version, "loop_config": config,
                              "provenance": provenance(),
                              "date": datetime.now(UTC).isoformat(timespec="seconds"),
                              "loop_reading": loop["evaluation"]["versions"].get(args.version), "rows": []}
    with tempfile.TemporaryDirectory(prefix="kaizen-interp-") as tmp:
        answers = sample_line(args, config, settings, ids, Path(tmp))
        for alpha in args.alpha:
            row = judged_row(alpha, Path(tmp) / f"a{alpha}", answers[alpha], kept, args.version, judges,
                             messages, ids, config, versions / "v0")
            report["rows"].append(row)
            print(row_line(row), flush=True)
    path = folder / "interpolate.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {path}")


def sample_line(args: argparse.Namespace, config: dict[str, Any], settings: Any, ids: list[list[int]],
                tmp: Path) -> dict[float, list[Any]]:
    """Each alpha's weights written under `tmp` and sampled as the loop's evaluation samples (one
    engine, its weights reloaded in place)."""
    from simulation.evaluate import EVAL_SEED
    from trainer.rollout_engine import RolloutEngine

    versions = args.run / "data" / "registry" / "versions"
    engine = RolloutEngine(settings, versions / "v0", max_model_len=settings.engine_max_model_len,
                           seed=int(config["seed"]))
    answers: dict[float, list[Any]] = {}
    try:
        for alpha in args.alpha:
            t0 = time.monotonic()
            target = tmp / f"a{alpha}"
            moved = blend(versions / "v0", versions / args.version, alpha, target)
            engine.load_weights(target)
            answers[alpha] = engine.generate(ids, max_tokens=int(config["eval_max_tokens"]),
                                             temperature=float(config["eval_temperature"]),
                                             n=int(config["eval_samples"]),
                                             seed=int(config["seed"]) + EVAL_SEED)
            print(f"alpha {alpha}: {moved} tensors moved, sampled in {time.monotonic() - t0:.0f} s",
                  flush=True)
    finally:
        engine.shutdown()
    return answers


def judged_row(alpha: float, target: Path, mine: list[Any], kept: dict[str, list[Any]], version: str,
               judges: dict[str, Any], messages: list[Any], ids: list[list[int]], config: dict[str, Any],
               v0: Path) -> dict[str, Any]:
    """One alpha's answers against v0's kept ones by each judge (the loop's seeds and flips), with
    their length, KL to v0, and how many are word for word the version's kept answers."""
    from simulation.evaluate import answer_figures, by_prompt, judge_pairs, kl_to_base

    seed = int(config["seed"])
    row: dict[str, Any] = {"alpha": alpha, **answer_figures(mine),
                           "kl_to_v0": kl_to_base(target, v0, ids, mine, float(config["eval_temperature"]))}
    kept_n, mine_n = by_prompt(kept.get(version, [])), by_prompt(mine)
    row["same_answers_as_kept"] = sum(a.text == b.text for i, ans in mine_n.items()
                                      for a, b in zip(ans, kept_n.get(i, []), strict=False))
    base = by_prompt(kept["v0"])
    for key, judge in judges.items():
        row[key] = judge_pairs(judge, messages, mine_n, base, int(config["bootstrap"]), seed,
                               flip_seed=seed + (1 if key == "second_judge" else 0))
    return row


def row_line(row: dict[str, Any]) -> str:
    head = (f"alpha {row['alpha']:>4}: {row['mean_answer_tokens']} tok, KL {row['kl_to_v0']:.2f}, "
            f"same as kept {row['same_answers_as_kept']}")
    return " | ".join([head, *judged_cells(row, lc_interval=True)])


if __name__ == "__main__":
    main()
