"""The loop benchmark: does the service get better from votes? (`kaizen bench loop`)

    kaizen bench loop --judge trainer.judges:rubric     # the recorded hour: 1 round x 500 votes, 16 users
    kaizen bench loop --rounds 3 --budget 10800         # the longer run

On a fresh data dir: start the embedded broker and the chat API (champion v0,
automatic rollout on), then repeat for each round:

1. **votes**: simulated users (trainer/simulate.py) chat through the public
   API with forced comparisons and vote with the judge;
2. **train**: the trainer drains the votes into its store and runs a training
   round (reward-model refresh, PPO, gate, publish: trainer/rounds.py);
3. **rollout**: the API puts the published candidate on canary and the
   simulated users keep voting, now champion vs canary, until the automatic
   rollout promotes or rolls it back (or the round's canary vote budget is
   spent: then the loop decides from the win rate so far, as an operator would).

Then the API is stopped and every published version is evaluated against v0
on the evaluation prompts (never used for training) with the evaluation
judge (and `second_judge`, when given): win rate (ties and "both bad" count
half) with a 95% bootstrap interval over prompts, the length-controlled win
rate (the judge's verdicts regressed on the length difference, read at equal
length, as AlpacaEval 2.0 does), tie and both-bad shares, mean answer length,
the share of answers cut off at `eval_max_tokens`, KL to v0 (Monte Carlo: mean
over the version's own answers of log p_v − log p_v0), and the sanity prompts.
Writes `loop.json` and `loop.png` into the output folder.

Nothing here tells the trainer which judge votes: it sees votes only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from services.registry import Registry
from services.settings import Settings
from trainer.judges import load_judge
from trainer.simulate import DEFAULT_EVAL_PROMPTS, DEFAULT_JUDGE, DEFAULT_PROMPTS, SimulateConfig, read_prompts, simulate

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LoopConfig:
    out_dir: Path
    rounds: int = 1
    votes_per_round: int = 500
    canary_votes: int = 120
    """Most votes collected while a canary runs before the loop decides itself."""
    budget_s: float = 3600.0
    """Wall-clock budget of the rounds (evaluation comes after)."""
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
    second_judge: str | None = None
    """Another judge reading the same evaluation pairs (e.g. trainer.judges:reward_model, a
    Bradley-Terry model trained on human pairs, never on votes): every result read twice."""
    eval_samples: int = 4
    """Answers per evaluation prompt and version (same seeds for every version)."""
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
              "model": base.model_dir.resolve(), **config.settings_overrides}
    return Settings.model_validate(values)


def _status(base: str, admin: dict[str, str]) -> dict[str, Any]:
    r = httpx.get(f"{base}/admin/rollout", headers=admin, timeout=30)
    r.raise_for_status()
    return dict(r.json())


def run_loop(config: LoopConfig, base_settings: Settings, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the rounds, then the evaluation; returns the report (also written to loop.json)."""
    from services.broker import ensure_topics, start_embedded_broker
    from trainer import daemon
    from trainer.rounds import run_round

    config.out_dir.mkdir(parents=True, exist_ok=True)
    settings = loop_settings(base_settings, config)
    admin_token = secrets.token_hex(24)
    settings = settings.model_copy(update={"admin_token": __import__("pydantic").SecretStr(admin_token)})
    admin = {"Authorization": f"Bearer {admin_token}"}
    judge = load_judge(config.judge)
    prompts = read_prompts(config.prompts)
    phases = Phases()
    rounds: list[dict[str, Any]] = []
    base = f"http://127.0.0.1:{settings.port}"
    keys = [k.get_secret_value() for k in settings.api_keys]
    started_all = time.monotonic()

    def votes(n: int, seed: int, label: str = "votes") -> dict[str, Any]:
        cfg = SimulateConfig(base_url=base, api_keys=keys, users=config.users, rate=0, noise=config.noise,
                             votes=n, seed=seed, max_tokens=config.max_tokens)
        with _bar() as bar:
            task = bar.add_task(label, total=n)
            return asyncio.run(simulate(cfg, judge, prompts, lambda: bar.advance(task))).as_dict()

    t = time.monotonic()
    broker = start_embedded_broker(settings)
    ensure_topics(settings)
    engine: Any = None
    serve_log = settings.data_dir / "serve.log"
    with open(serve_log, "ab") as out:
        server = subprocess.Popen([sys.executable, "-m", "kaizen", "serve"], env=settings.child_env(), cwd=ROOT,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + settings.engine_ready_timeout_s
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the chat API exited ({server.returncode}); see {serve_log}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the chat API did not get ready; see {serve_log}")
            time.sleep(0.5)
        from trainer.rollout_engine import RolloutEngine

        registry = Registry(settings.registry_path)
        # one sampling engine for every round and the evaluation (each start costs ~25 s)
        engine = RolloutEngine(settings, registry.path("v0"), max_model_len=settings.engine_max_model_len,
                               seed=config.seed)
        phases.add("start", t)
        say(f"service up at {base} (data {settings.data_dir})")
        for r in range(config.rounds):
            if time.monotonic() - started_all > config.budget_s:
                say(f"time budget of {config.budget_s:.0f} s spent after {r} rounds")
                break
            rec: dict[str, Any] = {"round": r + 1}
            t = time.monotonic()
            rec["votes"] = votes(config.votes_per_round, config.seed * 1000 + r, f"round {r + 1}: votes")
            phases.add("votes", t)
            say(f"round {r + 1}: {rec['votes']['votes']} votes {rec['votes']['verdicts']}")
            t = time.monotonic()
            wait_outbox_empty(base)
            daemon.run(settings, once=True)
            result = run_round(settings, engine=engine, progress=True)
            phases.add("train", t)
            rec["training"] = {k: result.get(k) for k in ("outcome", "version", "reason", "error", "gate",
                                                          "reward_accuracy", "ppo", "seconds") if k in result}
            say(f"round {r + 1}: {result.get('outcome')} {result.get('version') or ''} {result.get('reason') or ''}")
            version = result.get("version")
            if result.get("outcome") == "published" and version:
                t = time.monotonic()
                rec["rollout"] = rollout_version(base, admin, version, votes, config, r)
                phases.add("rollout", t)
                say(f"round {r + 1}: {version} {rec['rollout']['result']} ({rec['rollout']['reason']})")
            rounds.append(rec)
    except BaseException:
        if engine is not None:
            engine.shutdown()
        raise
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        broker.terminate()
        broker.wait(10)
    t = time.monotonic()
    try:
        evaluation = evaluate_versions(settings, registry, config, engine)
    finally:
        engine.shutdown()
    phases.add("evaluate", t)
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
              "rounds": rounds, "evaluation": evaluation, "phases_s": phases.seconds,
              "champion": registry.state().champion,
              "wall_s": round(time.monotonic() - started_all, 1)}
    (config.out_dir / "loop.json").write_text(json.dumps(report, indent=2, default=str))
    plot(report, config.out_dir / "loop.png")
    return report


def _bar() -> Any:
    """A progress bar with a count and an ETA (rich)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn())


def wait_outbox_empty(base: str, timeout_s: float = 60.0) -> None:
    """Until the API's relay has handed every vote to Kafka (kaizen_outbox_pending 0)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx.get(f"{base}/metrics/", timeout=10).text
        m = re.search(r"^kaizen_outbox_pending (\S+)$", text, re.M)
        if m and float(m.group(1)) == 0:
            return
        time.sleep(0.25)
    log.warning("votes still waiting in the outbox after %.0f s", timeout_s)


def rollout_version(base: str, admin: dict[str, str], version: str, votes: Callable[[int, int], dict[str, Any]],
                    config: LoopConfig, r: int) -> dict[str, Any]:
    """Wait for the automatic canary of `version`, vote until it is decided (or decide at the budget)."""
    deadline = time.monotonic() + 120
    while _status(base, admin)["serving"]["canary"] != version:
        if time.monotonic() > deadline:
            return {"result": "not canaried", "reason": json.dumps(_status(base, admin)["refused"])}
        time.sleep(0.5)
    spent, batch = 0, max(5, config.canary_votes // 6)
    while spent < config.canary_votes:
        votes(batch, config.seed * 1000 + 500 + r * 37 + spent, f"canary {version}: votes")
        spent += batch
        time.sleep(1.5)  # the reconcile loop judges every poll interval
        status = _status(base, admin)
        if status["canary"] is None:
            audit = httpx.get(f"{base}/admin/audit?limit=20", headers=admin, timeout=30).json()["data"]
            last = next((e for e in audit if e["version"] == version and e["action"] in ("promote", "rollback")),
                        None)
            result = "promoted" if status["champion"] == version else "rolled back"
            return {"result": result, "reason": last["why"] if last else "", "votes": spent,
                    "head_to_head": status["head_to_head"]}
    status = _status(base, admin)
    h = status["head_to_head"]
    action = "promote" if (h["win_rate"] or 0) > 0.5 else "rollback"
    why = f"loop vote budget spent ({h['votes']} votes, win rate {h['win_rate']})"
    httpx.post(f"{base}/admin/{action}", headers=admin, json={"reason": why, "who": "bench-loop"}, timeout=180)
    return {"result": "promoted" if action == "promote" else "rolled back", "reason": why, "votes": spent,
            "head_to_head": h}


# -- evaluation --------------------------------------------------------------------------------


def bootstrap_interval(scores: list[float], n: int, seed: int) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of per-prompt scores."""
    if not scores:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(scores, k=len(scores))) / len(scores) for _ in range(n))
    return means[int(0.025 * (n - 1))], means[int(0.975 * (n - 1))]


def evaluate_versions(settings: Settings, registry: Registry, config: LoopConfig, engine: Any) -> dict[str, Any]:
    """Every published version (not rejected by its gate) against v0 on the evaluation prompts."""
    from transformers import AutoTokenizer

    from trainer.gate import sanity_set
    from trainer.policy import encode_prompt

    judge = load_judge(config.eval_judge or config.judge)
    second = load_judge(config.second_judge) if config.second_judge else None
    eval_prompts = read_prompts(config.eval_prompts)
    messages = [[{"role": "user", "content": p}] for p in eval_prompts]
    gate_rejected = {e.version for e in registry.audit() if e.action == "publish" and e.to_stage == "rejected"}
    versions = [v for v in registry.names() if v != "v0" and v not in gate_rejected]
    tokenizer = AutoTokenizer.from_pretrained(registry.path("v0"))
    ids = [encode_prompt(tokenizer, m, settings.ppo_max_prompt_length) for m in messages]
    sanity = sanity_set(settings)
    sanity_ids = [encode_prompt(tokenizer, [{"role": "user", "content": s["prompt"]}], settings.ppo_max_prompt_length)
                  for s in sanity]
    answers: dict[str, list[Any]] = {}
    sanity_ok: dict[str, float] = {}
    with _bar() as bar:
        task = bar.add_task("evaluation: sampling", total=1 + len(versions))
        for v in ["v0", *versions]:
            engine.load_weights(registry.path(v))
            answers[v] = engine.generate(ids, max_tokens=config.eval_max_tokens, temperature=0.7,
                                         n=config.eval_samples, seed=config.seed + 17)
            greedy = engine.generate(sanity_ids, max_tokens=32, temperature=0.0)
            passed = [re.search(s["expect"], g.text.strip()) is not None for s, g in zip(sanity, greedy, strict=True)]
            sanity_ok[v] = sum(passed) / max(1, len(passed))
            bar.advance(task)
        task = bar.add_task("evaluation: judge and KL", total=len(versions))
        out: dict[str, Any] = {"prompts": len(eval_prompts), "samples_per_prompt": config.eval_samples,
                               "max_tokens": config.eval_max_tokens, "judge": config.eval_judge or config.judge,
                               "second_judge": config.second_judge, "versions": {}}
        base = _by_prompt(answers["v0"])
        out["versions"]["v0"] = {"mean_answer_tokens": _mean_len(answers["v0"]), "sanity_pass": sanity_ok["v0"],
                                 "truncated_share": _truncated(answers["v0"])}
        for v in versions:
            mine = _by_prompt(answers[v])
            out["versions"][v] = {
                **judge_pairs(judge, messages, mine, base, config, seed=config.seed),
                "mean_answer_tokens": _mean_len(answers[v]), "truncated_share": _truncated(answers[v]),
                "kl_to_v0": kl_to_base(registry.path(v), registry.path("v0"), ids, answers[v]),
                "sanity_pass": sanity_ok[v], "stage": registry.info(v).stage}
            if second is not None:
                out["versions"][v]["second_judge"] = judge_pairs(second, messages, mine, base, config,
                                                                 seed=config.seed + 1)
            bar.advance(task)
    return out


def judge_pairs(judge: Any, messages: list[Any], mine: dict[int, list[Any]], base: dict[int, list[Any]],
                config: LoopConfig, seed: int) -> dict[str, Any]:
    """A version's answers against v0's, prompt by prompt (same seeds, paired in order), each pair
    shown to the judge in a random order: win rate with its bootstrap interval over prompts, the
    length-controlled win rate with its interval, tie and both-bad shares."""
    rng = random.Random(seed)
    per_prompt: list[float] = []
    verdicts: list[tuple[int, float, float]] = []  # (prompt, outcome, length difference in tokens)
    ties = both_bad = 0
    for i, m in enumerate(messages):
        scores = []
        for a, b in zip(mine.get(i, []), base.get(i, []), strict=False):
            flip = rng.random() < 0.5
            left, right = (b.text, a.text) if flip else (a.text, b.text)
            verdict = judge(m, left, right)
            if verdict in ("tie", "both_bad"):
                ties += verdict == "tie"
                both_bad += verdict == "both_bad"
                scores.append(0.5)
            else:
                scores.append(1.0 if (verdict == 1) == flip else 0.0)
            verdicts.append((i, scores[-1], float(len(a.token_ids) - len(b.token_ids))))
        if scores:
            per_prompt.append(sum(scores) / len(scores))
    n = len(verdicts)
    win = sum(per_prompt) / len(per_prompt) if per_prompt else float("nan")
    lo, hi = bootstrap_interval(per_prompt, config.bootstrap, config.seed)
    lc = length_controlled_win_rate([o for _, o, _ in verdicts], [d for _, _, d in verdicts])
    lc_lo, lc_hi = lc_bootstrap_interval(verdicts, config.bootstrap, config.seed)
    return {"win_rate_vs_v0": round(win, 4), "ci95": [round(lo, 4), round(hi, 4)],
            "lc_win_rate_vs_v0": round(lc, 4), "lc_ci95": [round(lc_lo, 4), round(lc_hi, 4)],
            "tie_share": round(ties / n, 4) if n else None,
            "both_bad_share": round(both_bad / n, 4) if n else None}


def length_controlled_win_rate(outcomes: list[float], length_diffs: list[float], l2: float = 1e-3) -> float:
    """The win rate at equal length: σ(θ₀) of the logistic regression outcome ~ θ₀ + θ₁·tanh(Δ/s).

    outcomes: 1 win, 0 loss, 0.5 tie (a fractional response: half a win, half a loss);
    length_diffs: the version's answer minus v0's, in tokens; s: their standard deviation.
    AlpacaEval 2.0's length-controlled win rate (Dubois et al. 2024) in its simplest form: the
    judge's preference for longer (or shorter) answers goes into θ₁, what is left at Δ = 0 is
    the preference for the version itself. Fitted by Newton's method (a tiny L2 keeps it finite
    when every verdict is the same).
    """
    import numpy as np

    y = np.asarray(outcomes, dtype=np.float64)
    if len(y) == 0:
        return float("nan")
    d = np.asarray(length_diffs, dtype=np.float64)
    scale = d.std() or 1.0
    X = np.stack([np.ones_like(d), np.tanh(d / scale)], axis=1)  # (n, 2)
    theta = np.zeros(2)
    for _ in range(50):
        p = 1 / (1 + np.exp(-(X @ theta)))
        grad = X.T @ (p - y) + l2 * theta
        hess = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-9:
            break
    return float(1 / (1 + np.exp(-theta[0])))


def lc_bootstrap_interval(verdicts: list[tuple[int, float, float]], n: int, seed: int) -> tuple[float, float]:
    """95% percentile bootstrap interval of the length-controlled win rate, resampling prompts."""
    by_prompt: dict[int, list[tuple[float, float]]] = {}
    for i, outcome, diff in verdicts:
        by_prompt.setdefault(i, []).append((outcome, diff))
    groups = list(by_prompt.values())
    if not groups:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    stats = []
    for _ in range(n):
        sample = [v for g in rng.choices(groups, k=len(groups)) for v in g]
        stats.append(length_controlled_win_rate([o for o, _ in sample], [d for _, d in sample]))
    stats.sort()
    return stats[int(0.025 * (n - 1))], stats[int(0.975 * (n - 1))]


def _truncated(samples: list[Any]) -> float:
    """Share of answers cut off at max_tokens (no end of turn)."""
    return round(sum(not s.finished for s in samples) / max(1, len(samples)), 4)


def _by_prompt(samples: list[Any]) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for s in samples:
        out.setdefault(s.prompt, []).append(s)
    return out


def _mean_len(samples: list[Any]) -> float:
    return round(sum(len(s.token_ids) for s in samples) / max(1, len(samples)), 2)


def kl_to_base(model_dir: Path, base_dir: Path, prompt_ids: list[list[int]], samples: list[Any]) -> float:
    """Monte-Carlo KL(version ‖ v0) per answer: mean of Σ_t log p_v(y_t) − log p_v0(y_t) over its own answers
    (batched forward passes of both models, trainer.policy.kl_to_reference)."""
    from trainer.policy import kl_to_reference, load_policy

    policy, tokenizer, _ = load_policy(model_dir)
    base, _, _ = load_policy(base_dir)
    kls = kl_to_reference(policy, base, tokenizer, [prompt_ids[s.prompt] for s in samples],
                          [list(s.token_ids) for s in samples])
    return round(sum(kls) / max(1, len(kls)), 4)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = [v for v in report["evaluation"]["versions"] if v != "v0"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if versions:
        win = [report["evaluation"]["versions"][v]["win_rate_vs_v0"] for v in versions]
        lo = [w - report["evaluation"]["versions"][v]["ci95"][0] for v, w in zip(versions, win, strict=True)]
        hi = [report["evaluation"]["versions"][v]["ci95"][1] - w for v, w in zip(versions, win, strict=True)]
        ax.errorbar(versions, win, yerr=[lo, hi], fmt="o-", capsize=4, label="win rate vs v0 (95% CI)")
        evals = report["evaluation"]["versions"]
        if all("lc_win_rate_vs_v0" in evals[v] for v in versions):
            lc = [evals[v]["lc_win_rate_vs_v0"] for v in versions]
            ax.plot(versions, lc, "^:", color="tab:green", label="length-controlled win rate")
        if all("second_judge" in evals[v] for v in versions):
            ax.plot(versions, [evals[v]["second_judge"]["win_rate_vs_v0"] for v in versions], "d:",
                    color="tab:purple", label="second judge's win rate")
        ax2 = ax.twinx()
        kl = [report["evaluation"]["versions"][v]["kl_to_v0"] for v in versions]
        ax2.plot(versions, kl, "s--", color="tab:orange", label="KL to v0 (nats/answer)")
        ax2.set_ylabel("KL to v0")
        ax2.legend(loc="lower right")
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate over v0")
    ax.set_xlabel("version")
    ax.set_title("Kaizen loop: published versions against v0")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
