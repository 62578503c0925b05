"""`kaizen simulate`: simulated users voting on the running service with a judge (simulation/simulate.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kaizen.core.settings import get_settings

console = Console(highlight=False, soft_wrap=True)


def simulate_cmd(
    votes: Annotated[int | None, typer.Option(help="stop after this many votes")] = 100,
    duration: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    users: Annotated[int, typer.Option(min=1, help="concurrent simulated users")] = 4,
    rate: Annotated[float, typer.Option(min=0.0, help="requests/s across all users (0: unpaced)")] = 2.0,
    noise: Annotated[float, typer.Option(min=0.0, max=1.0, help="probability of a random vote")] = 0.0,
    judge: Annotated[str, typer.Option(
        help="`module:function` or `file.py:function`")] = "simulation.judges:rubric",
    prompts: Annotated[Path | None, typer.Option(help="JSONL, one {\"prompt\": ...} per line")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    max_tokens: Annotated[int, typer.Option(min=1)] = 96,
    url: Annotated[str | None, typer.Option("--url", help="chat API base URL (default: from settings)")] = None,
    api_key: Annotated[list[str] | None, typer.Option("--api-key", help="one per user (repeat); default: "
                                                      "KAIZEN_API_KEYS")] = None,
    log: Annotated[Path | None, typer.Option(help="write every vote as JSONL here")] = None,
) -> None:
    """Simulated users chat through the public API and vote on paired answers with a judge."""
    from simulation.judges import load_judge
    from simulation.simulate import DEFAULT_PROMPTS, SimulateConfig, read_prompts, simulate

    settings = get_settings()
    try:
        judge_fn = load_judge(judge)
        prompt_list = read_prompts(prompts or DEFAULT_PROMPTS)
    except ValueError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}")
        raise typer.Exit(2) from None
    keys = api_key or [k.get_secret_value() for k in settings.api_keys]
    config = SimulateConfig(base_url=(url or settings.public_url).rstrip("/"), api_keys=keys, users=users,
                            rate=rate, noise=noise, votes=votes, duration_s=duration, seed=seed,
                            max_tokens=max_tokens)
    with Progress(TextColumn("simulated votes"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as progress:
        task = progress.add_task("votes", total=votes)
        stats = asyncio.run(simulate(config, judge_fn, prompt_list, lambda: progress.advance(task)))
    if log is not None:
        log.write_text("".join(json.dumps(row) + "\n" for row in stats.log))
    console.print_json(json.dumps(stats.as_dict()))
    if stats.votes == 0:
        raise typer.Exit(1)
