"""`kaizen bench loop`: the end-to-end proof that votes make the service better (simulation/loop.py)."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from kaizen.core.settings import Settings, get_settings

bench_app = typer.Typer(help="Benchmarks that need the whole service.", no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)
README = Path(__file__).resolve().parent.parent / "bench" / "README.md"

#: What the loop sets for its own service unless `--set` says otherwise. Training may use every core:
#: the simulated users wait while the trainer works, so the chat engine is idle. A round of a few
#: hundred votes holds out 15% of them (the service's 10% would leave the first reward model fewer
#: than 20 decided pairs to be judged on, and the round would be skipped).
LOOP_SETTINGS = {"ppo_threads": str(os.cpu_count() or 1), "reward_threads": str(os.cpu_count() or 1),
                 "reward_holdout_fraction": "0.15", "reward_min_holdout": "15", "ppo_iterations": "20"}
#: The defaults below are the hour-long run bench/README.md records ("The loop"): rounds of 500 votes
#: from 16 users and 20 PPO iterations, as many as fit 50 minutes, then the evaluation;
#: `kaizen bench loop --judge J --eval-prompts P` reruns it.


@bench_app.command("loop")
def loop(
    rounds: Annotated[int, typer.Option(min=1, help="most training rounds (the budget decides)")] = 6,
    votes: Annotated[int, typer.Option(min=1, help="simulated votes before each round")] = 500,
    canary_votes: Annotated[int, typer.Option(min=1, help="most votes per canary before the loop decides")] = 120,
    budget: Annotated[float, typer.Option(min=1, help="seconds for the start and the rounds (a round starts "
                                                    "only if it fits; the evaluation comes after)")] = 3000,
    judge: Annotated[str, typer.Option(help="voters' judge: module:function or file.py:function")] =
        "simulation.judges:rubric",
    eval_judge: Annotated[str | None, typer.Option(help="evaluation judge (default: --judge)")] = None,
    prompts: Annotated[Path | None, typer.Option(help="voters' prompts, JSONL {\"prompt\": ...}")] = None,
    eval_prompts: Annotated[Path | None, typer.Option(help="evaluation prompts, never trained on")] = None,
    users: Annotated[int, typer.Option(min=1)] = 16,
    noise: Annotated[float, typer.Option(min=0, max=1, help="probability of a random vote")] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    max_tokens: Annotated[int, typer.Option(min=1)] = 64,
    eval_samples: Annotated[int, typer.Option(min=1, help="answers per evaluation prompt and version")] = 1,
    eval_max_tokens: Annotated[int, typer.Option(min=1, help="tokens per evaluation answer (few cut off)")] = 256,
    eval_temperature: Annotated[float, typer.Option(min=0.01, help="the evaluation's sampling temperature "
                                                              "(its KL to v0 reads the answers at it)")] = 0.7,
    second_judge: Annotated[str | None, typer.Option(
        help="a second evaluation judge, e.g. simulation.judges:reward_model "
             "(KAIZEN_JUDGE_REWARD_MODEL=DIR)")] = None,
    null_control: Annotated[bool, typer.Option(help="also redraw v0's answers and judge them against v0: "
                                                    "what no change reads, the noise of one draw")] = True,
    set_: Annotated[list[str] | None, typer.Option("--set", help="a service setting for this run, NAME=VALUE "
                                                   "(as KAIZEN_NAME; repeatable), e.g. --set ppo_lr=1e-5")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default: a new temporary one)")] = None,
    record: Annotated[bool, typer.Option(help="append the result line to bench/README.md")] = False,
) -> None:
    """Rounds of (simulated votes → training round → canary by live votes), then every version vs v0."""
    from simulation.loop import LoopConfig, run_loop
    from simulation.simulate import DEFAULT_EVAL_PROMPTS, DEFAULT_PROMPTS

    overrides: dict[str, str] = {}
    for item in set_ or []:
        name, sep, value = item.partition("=")
        name = name.strip().lower().removeprefix("kaizen_")
        if not sep or name not in Settings.model_fields:
            raise typer.BadParameter(f"{item!r}: expected NAME=VALUE with NAME a setting (kaizen config)",
                                     param_hint="--set")
        overrides[name] = value
    out_dir = out or Path(tempfile.mkdtemp(prefix="kaizen-loop-"))
    # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C, so the loop stops the API and the broker it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    config = LoopConfig(out_dir=out_dir, rounds=rounds, votes_per_round=votes, canary_votes=canary_votes,
                        budget_s=budget, judge=judge, eval_judge=eval_judge, prompts=prompts or DEFAULT_PROMPTS,
                        eval_prompts=eval_prompts or DEFAULT_EVAL_PROMPTS, users=users, noise=noise, seed=seed,
                        max_tokens=max_tokens, eval_samples=eval_samples, eval_max_tokens=eval_max_tokens,
                        eval_temperature=eval_temperature, second_judge=second_judge,
                        null_control=null_control,
                        settings_overrides={**LOOP_SETTINGS, **overrides})
    report = run_loop(config, get_settings(), say=lambda m: console.print(f"[bold]loop[/bold] {m}"))
    console.print_json(json.dumps(report["evaluation"]))
    console.print(f"phases (s): {report['phases_s']}; report {out_dir / 'loop.json'}, plot {out_dir / 'loop.png'}")
    if record:
        row = result_line(report, rounds=rounds, votes=votes, judge=judge, seed=seed, overrides=overrides)
        README.write_text(with_loop_row(README.read_text(), row))
        console.print(f"recorded in {README}")


@bench_app.command("judge")
def judge_answers(
    source: Annotated[Path, typer.Argument(help="output folder of `kaizen bench loop --out DIR`, or its "
                                                "answers.jsonl")],
    judge: Annotated[str, typer.Option(help="module:function or file.py:function")] = "simulation.judges:rubric",
    seed: Annotated[int | None, typer.Option(help="bootstrap and answer-order seed (default: the loop's)")] = None,
    bootstrap: Annotated[int | None, typer.Option(min=1, help="resamples (default: the loop's)")] = None,
    out: Annotated[Path | None, typer.Option(help="also write the report here as JSON")] = None,
) -> None:
    """Judge a finished loop benchmark's saved evaluation answers again, with any judge (nothing is
    sampled): every version against v0, as the loop's report reads it."""
    from rich.table import Table

    from kaizen.core.atomic_files import write_atomic
    from simulation.rejudge import rejudge

    try:
        report = rejudge(source, judge, bootstrap=bootstrap, seed=seed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    table = Table(title=f"{report['answers']}: judged by {judge} ({report['prompts']} prompts)")
    for column in ("version", "win rate vs v0 [95%]", "length-controlled [95%]", "ties", "tokens", "cut off"):
        table.add_column(column)
    redrawn = {"v0 redrawn": report["null_control"]} if "null_control" in report else {}
    rows = {**report["versions"], **redrawn}
    for v, r in rows.items():
        if v == "v0":
            table.add_row(v, "", "", "", f"{r['mean_answer_tokens']}", f"{r['truncated_share']}")
            continue
        table.add_row(v, f"{r['win_rate_vs_v0']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]",
                      f"{r['lc_win_rate_vs_v0']:.3f} [{r['lc_ci95'][0]:.3f}, {r['lc_ci95'][1]:.3f}]",
                      f"{r['tie_share']}", f"{r['mean_answer_tokens']}", f"{r['truncated_share']}")
    console.print(table)
    if out is not None:
        write_atomic(out, json.dumps(report, indent=2) + "\n")
        console.print(f"report {out}")


LOOP_SECTION = "## The loop (`kaizen bench loop`)"


def with_loop_row(readme: str, row: str) -> str:
    """bench/README.md with `row` added as the last row of the loop section's table (appending to
    the file put it under the prose that follows the table, outside it); at the end if there is none."""
    lines = readme.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(LOOP_SECTION)), None)
    if start is None:
        return readme + ("" if readme.endswith("\n") else "\n") + row
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    rows = [i for i in range(start, end) if lines[i].startswith("| 20")]
    at = rows[-1] + 1 if rows else end
    return "".join(lines[:at] + [row] + lines[at:])


def result_line(report: dict[str, Any], *, rounds: int, votes: int, judge: str, seed: int,
                overrides: dict[str, str]) -> str:
    """bench/README.md's row: the final champion against v0 (not the best of several: no selection bias)."""
    evaluation = report["evaluation"]["versions"]
    champion = report.get("champion")
    from dataclasses import fields

    from simulation.loop import LoopConfig

    # every option the run changed from its default, so the row's command reruns it exactly
    used = report.get("config", {})
    flags = {"canary_votes": "--canary-votes", "users": "--users", "noise": "--noise", "max_tokens": "--max-tokens",
             "eval_samples": "--eval-samples", "budget_s": "--budget", "eval_judge": "--eval-judge",
             "eval_max_tokens": "--eval-max-tokens", "eval_temperature": "--eval-temperature",
             "second_judge": "--second-judge"}
    defaults = {f.name: f.default for f in fields(LoopConfig) if f.name in flags}
    options = "".join(f" {flag} {used[name]}" for name, flag in flags.items()
                      if name in used and used[name] != defaults[name])
    options += " --no-null-control" if used.get("null_control") is False else ""
    sets = "".join(f" --set {k}={v}" for k, v in overrides.items())
    command = f"`kaizen bench loop --rounds {rounds} --votes {votes}{options} --judge {judge} --seed {seed}{sets}`"
    if "machine" in report:  # where it ran: the same code reads differently on another CPU
        from simulation.loop import machine_summary

        machine = report["machine"]
        command += f" (at {machine.get('commit') or 'an unknown commit'}; {machine_summary(machine)})"
    if champion in evaluation and champion != "v0":
        v = evaluation[champion]
        result = (f"{champion}: win rate {v['win_rate_vs_v0']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}], "
                  f"ties {v['tie_share']}, KL {v['kl_to_v0']}, {v['mean_answer_tokens']} vs "
                  f"{evaluation['v0']['mean_answer_tokens']} tokens")
        if "lc_win_rate_vs_v0" in v:
            result += (f"; length-controlled {v['lc_win_rate_vs_v0']:.3f} [{v['lc_ci95'][0]:.3f}, "
                       f"{v['lc_ci95'][1]:.3f}], cut off {v['truncated_share']} vs "
                       f"{evaluation['v0']['truncated_share']}")
        if "second_judge" in v:
            w = v["second_judge"]
            result += f"; second judge {w['win_rate_vs_v0']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}]"
        if null := report["evaluation"].get("null_control"):
            result += f"; v0 redrawn against v0 {null['win_rate_vs_v0']:.3f}"
    else:
        published = [k for k in evaluation if k != "v0"]
        result = f"champion still v0 (published: {', '.join(published) or 'none'})"
    return f"| {time.strftime('%Y-%m-%d')} | {command} | {result} | {report['wall_s']:.0f} s |\n"
