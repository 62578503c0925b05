"""A kept loop run's first round replayed on the same votes and reward model, with other settings.

    KAIZEN_JUDGE_REWARD_MODEL=/tmp/rm/A python bench/replay_round.py --run RUN --name NAME \\
        --set policy_algorithm=raft --set raft_sampler=start --set ppo_batch_size=128

Two rows of "The loop" (bench/README.md) differ in their votes as well as in their settings: the
simulated users vote on a live engine's answers, so the same command gives another store, another
reward model and readings ~0.03 apart (the fifty-sixth and sixtieth rows). Here the votes stay:
RUN's folder (a `kaizen bench loop --out` folder that kept its weights) is copied to NAME beside it,
the copy's registry goes back to v0 (`Registry.rollback`, audited) and one round (`kaizen rounds
run`) trains from v0 on the very store and reward model RUN's round 1 had (no vote arrived since, so
the refresh is skipped), with RUN's settings plus the --set ones. The gate runs and its verdict is
kept, but with `gate_min_win` 0 (unless set): the candidate is published whatever it reads, since
the question is what the update learned. bench/interpolate.py then samples and judges the new
version (α = 1) exactly as the loop's evaluation does, against RUN's kept v0 answers, so its figures
compare with RUN's own v1 pair for pair. A report, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, provenance  # noqa: E402

WHO = "bench/replay_round"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a `kaizen bench loop --out` folder")
    ap.add_argument("--name", required=True, help="the copy's folder name, beside RUN")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting for the replayed round (repeatable), over RUN's own")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    for needed in ("loop.json", "answers.jsonl", "data/registry/versions/v0/model.safetensors"):
        if not (args.run / needed).is_file():
            ap.error(f"{args.run} has no {needed}: replay needs a loop run that kept its weights and answers")
    if any("=" not in s for s in args.sets):
        ap.error("--set takes NAME=VALUE")
    if (args.run.parent / args.name).exists():
        ap.error(f"{args.run.parent / args.name} exists: choose another --name")
    return args


def copy_run(run: Path, dest: Path) -> None:
    """RUN's folder without its rounds' scratch files, the copy's champion back to v0."""
    from kaizen.core.registry import Registry

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("work", "round.lock", "state.json.tmp*"))
    registry = Registry(dest / "data" / "registry")
    while registry.state().champion != "v0":
        registry.rollback(who=WHO, why=f"replay {run.name}'s first round from v0")


def round_env(config: dict[str, Any], sets: list[str], dest: Path) -> dict[str, str]:
    """The process environment of the replayed round: RUN's settings, then --set, as KAIZEN_* ."""
    from kaizen.core.settings import get_settings

    values = {**config.get("settings_overrides", {}), "gate_min_win": "0",  # over RUN's own, not over --set
              **dict(s.split("=", 1) for s in sets)}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KAIZEN_") or k == "KAIZEN_JUDGE_REWARD_MODEL"}
    env["KAIZEN_MODEL"] = str(get_settings().model_dir.resolve())  # unless RUN named its own, below
    env |= {f"KAIZEN_{k.upper()}": str(v) for k, v in values.items()}
    env |= {"KAIZEN_DATA_DIR": str(dest / "data"), "PYTHONPATH": str(ROOT)}
    return env


def last_round(dest: Path) -> dict[str, Any]:
    lines = (dest / "data" / "rounds" / "rounds.jsonl").read_text().splitlines()
    record: dict[str, Any] = json.loads(lines[-1])
    return record


def round_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What the report keeps of the round's record: outcome, gate figures, the update's summary."""
    gate = {k: v for k, v in record.get("gate", {}).items() if k not in ("sanity", "sanity_champion")}
    return {"outcome": record.get("outcome"), "version": record.get("version"), "gate": gate,
            "ppo": record.get("ppo"), "timings": record.get("timings")}


def main() -> None:
    args = parse_args()
    dest = args.run.parent / args.name
    config = json.loads((args.run / "loop.json").read_text())["config"]
    started = time.monotonic()
    copy_run(args.run, dest)
    subprocess.run([sys.executable, "-m", "kaizen", "rounds", "run"], env=round_env(config, args.sets, dest),
                   cwd=ROOT, check=True)
    record = last_round(dest)
    report: dict[str, Any] = {"run": str(args.run), "replay": str(dest), "sets": args.sets,
                              "date": datetime.now(UTC).isoformat(timespec="seconds"),
                              "provenance": provenance(), "round": round_summary(record),
                              "round_s": round(time.monotonic() - started, 1)}
    folder = args.out / f"replay-{args.name}-{datetime.now(UTC).strftime('%Y%m%dT%H%M')}"
    folder.mkdir(parents=True, exist_ok=True)
    if record.get("outcome") == "published":
        subprocess.run([sys.executable, str(ROOT / "bench" / "interpolate.py"), "--run", str(dest),
                        "--version", str(record["version"]), "--alpha", "1", "--out", str(folder)],
                       cwd=ROOT, check=True)
        judged = json.loads(next(folder.glob("interpolate-*/interpolate.json")).read_text())
        report["evaluation"] = judged["rows"][0]
    report["wall_s"] = round(time.monotonic() - started, 1)
    (folder / "replay.json").write_text(json.dumps(report, indent=2) + "\n")
    gate = report["round"]["gate"]
    print(f"round: {record.get('outcome')} {record.get('version') or ''}; gate win {gate.get('win_rate')}, "
          f"KL {gate.get('kl')}; report {folder / 'replay.json'}")


if __name__ == "__main__":
    main()
