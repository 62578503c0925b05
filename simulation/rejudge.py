"""`kaizen bench judge`: another judge reads the answers a loop benchmark's evaluation wrote.

    from simulation.rejudge import rejudge
    report = rejudge(Path("runs/hour"), "my_judges.py:strict")   # the folder of `kaizen bench loop --out`
    report["versions"]["v3"]["win_rate_vs_v0"], report["versions"]["v3"]["lc_ci95"]

The loop's proof should not rest on the judge that drove its voters. Its evaluation writes every
answer to `answers.jsonl` (simulation/evaluate.py `write_answers`); this reads them back and judges
each version against v0 with any judge (`module:function` or `file.py:function`, the loop's own
form), on the same pairs shown in the same order (the same seeds), so the loop's own judge gives
back loop.json's figures exactly and any other judge gives its own: the win rate with its
bootstrap interval over prompts, the length-controlled win rate with its interval, tie and
both-bad shares; and, where the loop redrew v0 (its null control), that draw against v0 as
`null_control`. Nothing is sampled and no policy is loaded: the time is the judge's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kaizen.core.registry_schema import version_number
from simulation.evaluate import (ANSWERS_FILE, NULL_VERSION, answer_figures, by_prompt, judge_pairs,
                                 null_control, read_answers, user_messages)
from simulation.judges import ready_judge
from simulation.loop import LoopConfig


def answers_path(source: Path) -> Path:
    """The answers file: `source` itself, or `answers.jsonl` in the loop's output folder `source`."""
    path = source / ANSWERS_FILE if source.is_dir() else source
    if not path.is_file():
        if skipped := _loop_report(path).get("evaluation", {}).get("skipped"):  # (no version passed its gate)
            raise ValueError(f"the loop run in {path.parent} evaluated nothing, so there are no answers to "
                             f"judge: {skipped}")
        raise ValueError(f"{path} does not exist: give the output folder of `kaizen bench loop --out DIR` "
                         f"(its evaluation writes {ANSWERS_FILE}) or the file itself")
    return path


def _loop_report(path: Path) -> dict[str, Any]:
    """loop.json beside the answers file `path` ({} when there is none)."""
    report = path.parent / "loop.json"
    data = json.loads(report.read_text()) if report.is_file() else {}
    return data if isinstance(data, dict) else {}


def loop_config(path: Path) -> dict[str, Any]:
    """The run's settings from loop.json beside the answers ({} when there is none)."""
    config = _loop_report(path).get("config", {})
    return config if isinstance(config, dict) else {}


def rejudge(source: Path, judge_spec: str, *, bootstrap: int | None = None, seed: int | None = None,
            flip_seed: int | None = None) -> dict[str, Any]:
    """Every version's saved answers against v0's, read by `judge_spec`.

    `seed` and `bootstrap` default to the loop's own (from loop.json beside the answers); `flip_seed`
    (which answer the judge sees first) to `seed`, as for the loop's first judge (its second judge
    used seed + 1). ValueError with the cause for a missing or malformed file or a judge that fails."""
    path = answers_path(source)
    config = loop_config(path)
    loop_defaults = LoopConfig.__dataclass_fields__  # when no loop.json is beside the answers
    if bootstrap is None:
        bootstrap = int(config.get("bootstrap", loop_defaults["bootstrap"].default))
    if seed is None:
        seed = int(config.get("seed", loop_defaults["seed"].default))
    prompts, answers = read_answers(path)
    if "v0" not in answers:
        raise ValueError(f"{path} has no answers of v0, the version every other is judged against")
    judge = ready_judge(judge_spec)
    messages = user_messages(prompts)
    base = by_prompt(answers["v0"])
    versions: dict[str, Any] = {"v0": answer_figures(answers["v0"])}
    for v in sorted((v for v in answers if v not in ("v0", NULL_VERSION)), key=version_number):
        versions[v] = {**judge_pairs(judge, messages, by_prompt(answers[v]), base, bootstrap, seed,
                                     flip_seed=flip_seed), **answer_figures(answers[v])}
    report = {"answers": str(path), "judge": judge_spec, "prompts": len(prompts), "bootstrap": bootstrap,
              "seed": seed, "versions": versions}
    if NULL_VERSION in answers:  # v0 drawn again: what "no change" reads with this judge
        report["null_control"] = null_control(judge, None, messages, answers, bootstrap, seed,
                                              flip_seed=flip_seed)
    return report

