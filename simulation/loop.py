"""The loop benchmark: does the service get better from votes? (`kaizen bench loop`)

    kaizen bench loop --judge simulation.judges:rubric  # the recorded hour: 1 round x 500 votes, 16 users
    kaizen bench loop --rounds 3 --budget 10800         # the longer run

On a fresh data dir: start the embedded broker and the chat API (champion v0,
automatic rollout on), then repeat for each round:

1. **votes**: simulated users (simulation/simulate.py) chat through the public
   API with forced comparisons and vote with the judge;
2. **train**: the trainer drains the votes into its store and runs a training
   round (reward-model refresh, PPO, gate, publish: trainer/rounds.py);
3. **rollout**: the API puts the published candidate on canary and the
   simulated users keep voting, now champion vs canary, until the automatic
   rollout promotes or rolls it back (or the round's canary vote budget is
   spent: then the loop decides from the win rate so far, as an operator would).

Then the API is stopped and every published version is evaluated against v0
on the evaluation prompts (never used for training) with the evaluation
judge (and `second_judge`, when given): simulation/evaluate.py.
Writes `loop.json` and `loop.png` into the output folder.

Nothing here tells the trainer which judge votes: it sees votes only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from kaizen.core.parent_death import die_with_parent
from kaizen.core.registry import Registry
from kaizen.core.settings import Settings
from simulation.canary import Votes, round_minutes, rollout_version, wait_outbox_empty
from simulation.evaluate import evaluate_versions, plot, progress_bar
from simulation.judges import ready_judge
from simulation.simulate import (DEFAULT_EVAL_PROMPTS, DEFAULT_JUDGE, DEFAULT_PROMPTS, SimulateConfig,
                                 read_prompts, simulate)

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LoopConfig:
    out_dir: Path
    rounds: int = 6
    """At most; the budget decides how many run (next_round_fits)."""
    votes_per_round: int = 500
    canary_votes: int = 120
    """Most votes collected while a canary runs before the loop decides itself."""
    budget_s: float = 3000.0
    """Wall-clock budget of the start and the rounds; the evaluation after them fits the hour's rest.
    Each round's training gets what is left of it, less its canary (round_max_minutes,
    simulation/canary.py `round_minutes`), so a slow machine's one round ends within it too."""
    canary_time_factor: float = 3.0
    """Before the first canary has run, it is expected to take this many times its votes at the
    votes' rate (the swap to the canary's weights, the votes, the decision: the fifty-fifth loop row's
    canary took 265 s for 120 votes at 1.35 per second)."""
    min_round_minutes: float = 1.0
    """The least round_max_minutes a round gets, when the budget has no more left."""
    judge: str = DEFAULT_JUDGE
    eval_judge: str | None = None
    prompts: Path = DEFAULT_PROMPTS
    eval_prompts: Path = DEFAULT_EVAL_PROMPTS
    users: int = 16
    noise: float = 0.0
    seed: int = 0
    max_tokens: int = 64
    """The voters' answers (what users of a small CPU deployment get)."""
    eval_max_tokens: int = 256
    """The evaluation's answers: long enough that few are cut off, so a version is not judged
    better just for ending before the limit (its truncated share is reported too)."""
    eval_temperature: float = 0.7
    """The evaluation's sampling temperature (a chat client's usual), and what its KL to v0 reads the
    answers at."""
    second_judge: str | None = None
    """Another judge reading the same evaluation pairs (e.g. simulation.judges:reward_model, a
    Bradley-Terry model trained on human pairs, never on votes): every result read twice."""
    eval_samples: int = 1
    """Answers per evaluation prompt and version (same seeds for every version). One answer to each
    of 236 prompts, not four to each of 59: the same cost, a quarter less variance of the win rate
    (a verdict varies 5-9 times as much within a prompt as between prompts, measured on three
    runs' kept answers), and four times as many prompts to generalise from."""
    null_control: bool = True
    """Also draw v0's evaluation answers a second time (other seeds) and judge them against v0 like a
    version (simulation/evaluate.py `null_control`): 0.5 in expectation, and how far this draw lands
    from it is noise every version's figure carries. One more sampling of v0 and its judging (~3 min
    of the hour on 2 cores at 236 prompts x 256 tokens)."""
    bootstrap: int = 2000
    settings_overrides: dict[str, Any] = field(default_factory=dict)
    """Extra settings for the service (tests: the tiny model, a relaxed gate)."""


@dataclass
class Phases:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, started: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.monotonic() - started, 2)


def _free_port() -> int:
    """A free loopback port below the ephemeral range. A port the OS hands out (bind to 0) can be
    handed out again, to one of vLLM's own sockets, while the API still loads its engine and has
    not bound it yet: a loop once died on "address already in use"."""
    import socket

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 32_000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port between 20000 and 32000")


def loop_settings(base: Settings, config: LoopConfig) -> Settings:
    data_dir = config.out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    values = {**base.model_dump(), "data_dir": data_dir, "port": _free_port(), "broker_port": _free_port(),
              "trainer_port": _free_port(), "kafka_bootstrap": None, "auto_rollout": True,
              "api_keys": [f"loop-user-{i}" for i in range(config.users)], "rate_limit_rps": 1000.0,
              "rate_limit_burst": 1000, "comparison_ttl": "PT24H",
              # a few simulated users stand in for many people: no per-user vote limit
              "vote_limit_per_window": 10**9,
              # keep rolled-back versions: the evaluation reads every version the loop published
              "retention_keep_rejected": 10**6,
              "model": base.model_dir.resolve(), **config.settings_overrides}
    return Settings.model_validate(values)


def run_loop(config: LoopConfig, base_settings: Settings,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the rounds, then the evaluation; returns the report (also written to loop.json)."""
    from kaizen.core.broker import ensure_topics, start_embedded_broker
    from trainer.rollout_engine import RolloutEngine

    config.out_dir.mkdir(parents=True, exist_ok=True)
    settings, admin = with_admin_token(loop_settings(base_settings, config))
    machine = machine_record(settings)
    say("machine: " + machine_summary(machine))
    votes = voter(config, settings)  # the judge and the prompts load before anything starts
    for spec in filter(None, (config.eval_judge, config.second_judge)):
        ready_judge(spec)  # as do the evaluation's judges: a broken one fails now, not in an hour
    phases = Phases()
    started_all = t = time.monotonic()
    broker = start_embedded_broker(settings)
    ensure_topics(settings)
    registry = Registry(settings.registry_path)
    registry.init_base(settings.model_dir, who="bench-loop")  # v0, as the API would on its start
    engine: Any = None
    server = start_api(settings)
    try:
        # one sampling engine for every round and the evaluation (each start costs ~25 s), started
        # while the API starts its own
        engine = RolloutEngine(settings, registry.path("v0"), max_model_len=settings.engine_max_model_len,
                               seed=config.seed)
        wait_ready(settings, server)
        phases.add("start", t)
        say(f"service up at {base_url(settings)} (data {settings.data_dir})")
        rounds = run_rounds(config, settings, admin, engine, votes, phases, started_all, say)
    except BaseException:
        if engine is not None:
            engine.shutdown()
        raise
    finally:
        stop(server, broker)
    t = time.monotonic()
    try:
        evaluation = evaluate_versions(settings, registry, config, engine)
    finally:
        engine.shutdown()
    phases.add("evaluate", t)
    report = {"rounds": rounds, "evaluation": evaluation, "phases_s": phases.seconds,
              "champion": registry.state().champion, "machine": machine}
    return write_report(config, report, started_all)


def with_admin_token(settings: Settings) -> tuple[Settings, dict[str, str]]:
    """The settings with a fresh admin token, and the headers that carry it."""
    admin_token = secrets.token_hex(24)
    settings = settings.model_copy(update={"admin_token": SecretStr(admin_token)})
    return settings, {"Authorization": f"Bearer {admin_token}"}


def base_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.port}"


def voter(config: LoopConfig, settings: Settings) -> Votes:
    """The simulated users as a function: a batch of votes through the loop's API, with a progress bar."""
    judge = ready_judge(config.judge)
    prompts = read_prompts(config.prompts)
    keys = [k.get_secret_value() for k in settings.api_keys]

    def votes(n: int, seed: int, label: str = "votes") -> dict[str, Any]:
        cfg = SimulateConfig(base_url=base_url(settings), api_keys=keys, users=config.users, rate=0,
                             noise=config.noise, votes=n, seed=seed, max_tokens=config.max_tokens)
        with progress_bar() as bar:
            task = bar.add_task(label, total=n)
            return asyncio.run(simulate(cfg, judge, prompts, lambda: bar.advance(task))).as_dict()

    return votes


def start_api(settings: Settings) -> subprocess.Popen[bytes]:
    """`kaizen serve` in its own session, its output appended to serve.log in the data dir; it gets
    SIGTERM (and stops its engine) if this process dies, even by SIGKILL."""
    with open(settings.data_dir / "serve.log", "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "kaizen", "serve"], env=settings.child_env(), cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent)


def wait_ready(settings: Settings, server: subprocess.Popen[bytes]) -> None:
    """Until the API answers /readyz (it exited or took longer than engine_ready_timeout_s: an error)."""
    serve_log = settings.data_dir / "serve.log"
    deadline = time.monotonic() + settings.engine_ready_timeout_s
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the chat API exited ({server.returncode}); see {serve_log}")
        try:
            if httpx.get(f"{base_url(settings)}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the chat API did not get ready; see {serve_log}")
        time.sleep(0.5)


def stop(server: subprocess.Popen[bytes], broker: Any) -> None:
    """Stop the API (killed after 60 s) and the embedded broker."""
    server.terminate()
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
    broker.terminate()
    broker.wait(10)


def run_rounds(config: LoopConfig, settings: Settings, admin: dict[str, str], engine: Any, votes: Votes,
               phases: Phases, started_all: float, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """The rounds, until `rounds` are done or the next one would not fit the time budget: each
    round's record."""
    rounds: list[dict[str, Any]] = []
    took: list[float] = []
    canaries: list[float] = []
    for r in range(config.rounds):
        elapsed = time.monotonic() - started_all
        if not next_round_fits(elapsed, took, config.budget_s):
            say(f"{r} rounds in {elapsed:.0f} s: another (the longest took {max(took):.0f} s) would not "
                f"fit the budget of {config.budget_s:.0f} s")
            break
        t = time.monotonic()
        rounds.append(run_one_round(r, config, settings, admin, engine, votes, phases, say,
                                    clock=(started_all, canaries)))
        took.append(time.monotonic() - t)
    return rounds


def next_round_fits(elapsed: float, took: list[float], budget: float) -> bool:
    """Start another round only if one as long as the longest so far ends within the budget (the
    first round always starts): a round started just before the end would overrun it by a round."""
    return not took or elapsed + max(took) <= budget


def run_one_round(r: int, config: LoopConfig, settings: Settings, admin: dict[str, str], engine: Any,
                  votes: Votes, phases: Phases, say: Callable[[str], None], *,
                  clock: tuple[float, list[float]]) -> dict[str, Any]:
    """Votes, a training round on them, and the rollout of the version it published (if any).
    `clock`: when the loop started (monotonic) and the seconds of each canary so far (appended to)."""
    from trainer import daemon
    from trainer.rounds import run_round

    base = base_url(settings)
    rec: dict[str, Any] = {"round": r + 1}
    t = time.monotonic()
    rec["votes"] = votes(config.votes_per_round, config.seed * 1000 + r, f"round {r + 1}: votes")
    phases.add("votes", t)
    say(f"round {r + 1}: {rec['votes']['votes']} votes {rec['votes']['verdicts']}")
    t = time.monotonic()
    wait_outbox_empty(base)
    daemon.run(settings, once=True)
    started_all, canaries = clock
    minutes = round_minutes(config, time.monotonic() - started_all, rec["votes"], canaries)
    minutes = min(minutes, settings.round_max_minutes or minutes)
    rec["round_max_minutes"] = round(minutes, 2)
    say(f"round {r + 1}: training within {minutes:.1f} minutes (what the budget leaves, less the canary)")
    result = run_round(settings.model_copy(update={"round_max_minutes": minutes}), engine=engine, progress=True)
    phases.add("train", t)
    rec["training"] = {k: result.get(k) for k in ("outcome", "version", "reason", "error", "gate",
                                                  "reward_accuracy", "missing_eos", "ppo", "seconds")
                       if k in result}
    say(f"round {r + 1}: {result.get('outcome')} {result.get('version') or ''} {result.get('reason') or ''}")
    version = result.get("version")
    if result.get("outcome") == "published" and version:
        t = time.monotonic()
        rec["rollout"] = rollout_version(base, admin, version, votes, config, r)
        phases.add("rollout", t)
        canaries.append(time.monotonic() - t)
        say(f"round {r + 1}: {version} {rec['rollout']['result']} ({rec['rollout']['reason']})")
    return rec


def machine_record(settings: Settings) -> dict[str, Any]:
    """Where the run ran (kaizen.core.hardware.describe_machine), the dtype each `auto` chose there,
    and the commit of the code (None outside a git checkout)."""
    from kaizen.core.hardware import describe_machine, matmul_gflops

    here = Path(__file__).resolve().parent
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True).stdout.strip()
    commit = git.stdout.strip() + ("+changes" if dirty else "") if git.returncode == 0 else None
    return {**describe_machine(), "dtypes": {k: c.dtype for k, c in settings.effective_dtypes().items()},
            "commit": commit, "matmul_gflops": matmul_gflops()}


def machine_summary(machine: dict[str, Any]) -> str:
    """One line: 'AMD EPYC (avx2), 2 cores, matmul 64 GFLOPS, float32 engine/reward/ppo, torch 2.13.0+cpu,
    vllm 0.32.0'."""
    dtypes = machine.get("dtypes", {})
    by_dtype: dict[str, list[str]] = {}
    for name, dtype in dtypes.items():
        by_dtype.setdefault(dtype, []).append(name.removesuffix("_dtype"))
    isa = ", ".join(machine.get("isa") or ["no avx2"])
    parts = [f"{machine.get('cpu')} ({isa})", f"{machine.get('cores')} cores"]
    if machine.get("matmul_gflops"):
        parts.append(f"matmul {machine['matmul_gflops']:.0f} GFLOPS")
    parts += [f"{d} {'/'.join(names)}" for d, names in by_dtype.items()]
    if machine.get("gpu"):
        parts.append(str(machine["gpu"]))
    parts += [f"torch {machine.get('torch')}", f"vllm {machine.get('vllm')}"]
    return ", ".join(parts)


def write_report(config: LoopConfig, report: dict[str, Any], started_all: float) -> dict[str, Any]:
    """The report (rounds, evaluation, phases_s, champion, machine) with the config and the wall time:
    loop.json and loop.png in the output folder."""
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
              **report, "wall_s": round(time.monotonic() - started_all, 1)}
    (config.out_dir / "loop.json").write_text(json.dumps(report, indent=2, default=str))
    plot(report, config.out_dir / "loop.png")
    return report
