"""`kaizen bench loop`, short, on the tiny model: the plumbing of the whole loop.

Real broker, real chat API (vLLM), simulated users voting through the public
API with a judge loaded from a file, real training rounds (reward model, PPO,
gate, publish), canary by live votes, then the evaluation against v0 and the
plot. The champion is the tiny model taught to answer "Yes." or "No." at
random (tests/test_rounds.py); the judge prefers "Yes.", which a few PPO
iterations can learn, so a round can publish and a canary can win.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from kaizen.core.registry import Registry
from kaizen.core.settings import Settings
from simulation.evaluate import EVAL_SEED, NULL_SEED, NULL_VERSION, bootstrap_interval
from simulation.loop import LoopConfig, run_loop
from simulation.rejudge import rejudge
from tests.yes_no import WORDS
from trainer.store import PreferenceStore

JUDGE = '''
def prefers_yes(messages, a, b):
    ya, yb = a.strip().lower().startswith("yes"), b.strip().lower().startswith("yes")
    if ya == yb:
        return "tie"
    return 0 if ya else 1


def prefers_no(messages, a, b):
    return {0: 1, 1: 0}.get(prefers_yes(messages, a, b), "tie")
'''


def numbered_prompt_file(path: Path, n: int, seed: int) -> Path:
    """Questions with a number ("Is the apple river stone 17?"), off the yes/no model's training: on
    two-digit numbers "Yes"/"No" hold 0.2 of its first token's mass, the rest goes to other tokens, so
    "Yes." is rarer and ~3 pairs in 4 tie."""
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"prompt": f"Is the {' '.join(rng.choices(WORDS, k=3))} {i}?"}) + "\n"
                            for i in range(n)))
    return path


def prompt_file(path: Path, n: int, start: int) -> Path:
    """Questions in the yes/no model's own form ("Is the apple river stone?": "Yes"/"No" hold 0.96 of
    its first token's mass), distinct, and disjoint between files that take different slices (`start`)."""
    triples = list(itertools.product(WORDS, repeat=3))
    random.Random(0).shuffle(triples)
    lines = (json.dumps({"prompt": f"Is the {' '.join(t)}?"}) + "\n" for t in triples[start:start + n])
    path.write_text("".join(lines))
    return path




def test_record_puts_the_row_in_the_loop_table_not_under_its_prose() -> None:
    from kaizen.bench_cli import with_loop_row

    readme = ("# Benchmarks\n\n## Serving\n\n| date | x |\n| --- | --- |\n| 2026-01-01 | serve |\n\n"
              "## The loop (`kaizen bench loop`)\n\nIntro.\n\n| date | command |\n| --- | --- |\n"
              "| 2026-11-26 | old |\n\nProse about the old row.\n")
    out = with_loop_row(readme, "| 2026-11-28 | new |\n")
    assert "| 2026-11-26 | old |\n| 2026-11-28 | new |\n\nProse about the old row.\n" in out
    assert out.count("| 2026-11-28 | new |") == 1 and "| 2026-01-01 | serve |\n\n## The loop" in out
    # no table yet in the section: the row goes at the section's end; no section: the file's end
    bare = "## The loop (`kaizen bench loop`)\n\nIntro.\n\n## Next\n"
    assert with_loop_row(bare, "| r |\n") == "## The loop (`kaizen bench loop`)\n\nIntro.\n\n| r |\n## Next\n"
    assert with_loop_row("# B\n", "| r |\n") == "# B\n| r |\n"

def test_a_round_starts_only_if_one_as_long_as_the_longest_fits_the_budget() -> None:
    from simulation.loop import next_round_fits

    assert next_round_fits(0.0, [], 3000)          # the first round always starts
    assert next_round_fits(5000.0, [], 3000)        # even late: a run with no round shows nothing
    assert next_round_fits(1500.0, [700.0, 900.0], 3000)      # 1500 + 900 <= 3000
    assert not next_round_fits(2200.0, [700.0, 900.0], 3000)  # 2200 + 900 > 3000: it would overrun
    assert not next_round_fits(2101.0, [900.0], 3000)

def test_a_round_gets_the_budgets_rest_less_its_canary(tmp_path: Path) -> None:
    """Each round's training gets round_max_minutes = what the loop's budget has left less the canary
    after it: before any canary, canary_time_factor x its votes at the votes' rate; after, the longest
    canary so far; never less than min_round_minutes (the first round always runs)."""
    from simulation.canary import round_minutes
    from simulation.loop import LoopConfig

    config = LoopConfig(out_dir=tmp_path, budget_s=3000.0, canary_votes=120, canary_time_factor=3.0)
    assert round_minutes(config, 600.0, {"votes_per_s": 1.0}, []) == pytest.approx((3000 - 600 - 360) / 60)
    assert round_minutes(config, 600.0, {"votes_per_s": 2.0}, []) == pytest.approx((3000 - 600 - 180) / 60)
    assert round_minutes(config, 600.0, {"votes_per_s": 1.0}, [500.0, 200.0]) == pytest.approx((3000 - 600 - 500) / 60)
    assert round_minutes(config, 600.0, {"votes_per_s": None}, []) == pytest.approx(40.0)  # no votes: no rate
    assert round_minutes(config, 2990.0, {"votes_per_s": 1.0}, []) == config.min_round_minutes == 1.0


def test_bootstrap_interval_brackets_the_mean() -> None:
    scores = [1.0] * 70 + [0.0] * 30
    lo, hi = bootstrap_interval(scores, 1000, seed=0)
    assert lo < 0.7 < hi and 0.55 < lo and hi < 0.85
    assert bootstrap_interval([0.5] * 10, 100, 0) == (0.5, 0.5)


def test_length_controlled_win_rate_recovers_a_known_effect() -> None:
    """Synthetic verdicts from P(win) = σ(θ₀ + θ₁·tanh(Δ/s)) with longer answers (Δ > 0 mostly) and a
    judge that likes length (θ₁ = 1.5): the raw win rate is inflated, the length-controlled one
    recovers σ(θ₀), for an equal version (θ₀ = 0) and a better one (θ₀ = 0.8)."""
    import math

    from simulation.evaluate import length_controlled_win_rate

    rng = random.Random(0)
    for theta0, expected in ((0.0, 0.5), (0.8, 1 / (1 + math.exp(-0.8)))):
        diffs = [rng.gauss(25, 30) for _ in range(6000)]
        s = (sum(d * d for d in diffs) / len(diffs) - (sum(diffs) / len(diffs)) ** 2) ** 0.5
        outcomes = [1.0 if rng.random() < 1 / (1 + math.exp(-(theta0 + 1.5 * math.tanh(d / s)))) else 0.0
                    for d in diffs]
        raw = sum(outcomes) / len(outcomes)
        lc = length_controlled_win_rate(outcomes, diffs)
        assert raw > expected + 0.1  # the length effect inflates the plain win rate
        assert abs(lc - expected) < 0.03, (theta0, raw, lc)
    # no length effect at all: both agree; ties count half
    assert abs(length_controlled_win_rate([1.0, 0.0, 0.5, 0.5] * 50, [3.0, -3.0, 1.0, -1.0] * 50) - 0.5) < 1e-6


def test_bench_loop_refuses_an_unknown_setting(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kaizen.cli import app

    out = CliRunner().invoke(app, ["bench", "loop", "--set", "ppo_lrr=1e-5", "--out", str(tmp_path / "o")])
    assert out.exit_code == 2 and "ppo_lrr=1e-5" in out.output, out.output
    assert not (tmp_path / "o").exists()  # refused before anything started


def test_bench_loop_defaults_are_the_loop_configs() -> None:
    """`kaizen bench loop`'s options repeat LoopConfig's defaults (typer needs them in the signature):
    a default changed on one side only would make the CLI's hour differ from the one recorded."""
    import inspect
    from dataclasses import MISSING, fields

    from kaizen.bench_cli import loop
    from simulation.loop import LoopConfig

    renamed = {"votes": "votes_per_round", "budget": "budget_s"}
    options = {renamed.get(n, n): p.default for n, p in inspect.signature(loop).parameters.items()}
    compared = 0
    for f in fields(LoopConfig):
        if f.name in options and f.default is not MISSING and options[f.name] is not None:
            assert options[f.name] == f.default, (f.name, options[f.name], f.default)
            compared += 1
    assert compared >= 10, compared  # rounds, votes, canary votes, budget, judge, users, noise, seed, ...


def test_result_line_reports_the_champion_not_the_best_version() -> None:
    from kaizen.bench_cli import result_line

    def version(win: float) -> dict[str, object]:
        return {"win_rate_vs_v0": win, "ci95": [win - 0.1, win + 0.1], "tie_share": 0.2, "kl_to_v0": 0.3,
                "mean_answer_tokens": 40.0}

    report = {"champion": "v2", "wall_s": 3000.0, "evaluation": {"versions": {
        "v0": {"mean_answer_tokens": 50.0}, "v1": version(0.7), "v2": version(0.6)}},
        "config": {"canary_votes": 120, "users": 8, "max_tokens": 64, "eval_samples": 1, "budget_s": 3000.0}}
    line = result_line(report, rounds=2, votes=100, judge="simulation.judges:rubric", seed=0,
                       overrides={"ppo_lr": "1e-5"})
    assert "v2: win rate 0.600 [0.500, 0.700]" in line and "0.700 [" not in line
    assert "--set ppo_lr=1e-5`" in line and line.endswith("| 3000 s |\n")
    # the options the run changed are in the command (so it reruns exactly); defaults are not
    assert "--votes 100 --users 8 --judge" in line and "--canary-votes" not in line
    assert " (at " not in line  # no machine recorded (reports before it was): none invented
    report["machine"] = {"cpu": "AMD EPYC", "isa": ["avx2"], "cores": 2, "gpu": None, "torch": "2.13.0+cpu",
                         "vllm": "0.32.0", "commit": "abc1234",
                         "dtypes": {"engine_dtype": "float32", "reward_dtype": "float32", "ppo_dtype": "bfloat16"}}
    line = result_line(report, rounds=2, votes=100, judge="j", seed=0, overrides={})
    assert ("--seed 0` (at abc1234; AMD EPYC (avx2), 2 cores, float32 engine/reward, bfloat16 ppo, "
            "torch 2.13.0+cpu, vllm 0.32.0) |") in line, line
    report["champion"] = "v0"
    assert "champion still v0 (published: v1, v2)" in result_line(report, rounds=2, votes=100, judge="j", seed=0,
                                                                  overrides={})


def test_with_no_version_past_its_gate_the_evaluation_draws_nothing(tiny_model: Path, tmp_path: Path) -> None:
    """A loop whose every candidate its gate rejected has nothing to evaluate: v0 against itself reads
    0.5 by construction, and drawing it (with its null control) took ~25 minutes on the slow EPYC. The
    report says why, draws nothing (no engine is given here: one used would fail), and its plot and
    bench/README row read it ("champion still v0")."""
    from kaizen.bench_cli import result_line
    from simulation.evaluate import evaluate_versions, plot

    registry = Registry(tmp_path / "registry")
    registry.init_base(tiny_model)
    registry.publish(tiny_model, parent="v0", who="trainer", rejected=True)
    config = LoopConfig(out_dir=tmp_path / "out")
    config.out_dir.mkdir()
    evaluation = evaluate_versions(Settings(data_dir=tmp_path), registry, config, engine=None)
    assert evaluation["versions"] == {} and "nothing to evaluate" in evaluation["skipped"], evaluation
    assert evaluation["prompts"] > 0 and list(config.out_dir.iterdir()) == []  # no answers file
    report = {"champion": "v0", "wall_s": 10.0, "evaluation": evaluation, "config": {}}
    plot(report, config.out_dir / "loop.png")
    assert (config.out_dir / "loop.png").stat().st_size > 0
    line = result_line(report, rounds=1, votes=10, judge="j", seed=0, overrides={})
    assert "champion still v0 (published: none)" in line, line


@pytest.mark.parametrize("algorithm", ["ppo", "dpo"])
def test_short_loop_on_the_tiny_model(yes_no_model: Path, tmp_path_factory: pytest.TempPathFactory,
                                      algorithm: str) -> None:
    """The whole loop with the default policy update, PPO, and the second, online DPO (with the users'
    votes); the rest of the round (reward model, gate, publish, canary) is shared. RLOO's round is
    tests/test_rounds.py's (a third loop cost two minutes of the suite)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("loop")
    champion = yes_no_model
    sanity = root / "sanity.jsonl"
    sanity.write_text(json.dumps({"prompt": "Is the sky blue?", "expect": r"^(Yes|No)"}) + "\n")
    judge = root / "judge.py"
    judge.write_text(JUDGE)
    overrides = dict(
        model=champion, engine_max_model_len=512, default_max_tokens=8, max_tokens_limit=64,
        reward_max_length=64, reward_batch_size=8, reward_grad_accum=1, reward_lr=1e-3, reward_epochs=2,
        reward_train_layers=0, reward_eval_every=8, reward_patience=50, reward_threads=1,
        reward_holdout_fraction=0.3, reward_min_holdout=4, reward_replay_fraction=0.0,
        ppo_iterations=3, ppo_batch_size=16, ppo_response_length=8, ppo_epochs=2, ppo_minibatches=1, ppo_lr=2e-4,
        ppo_train_layers=0, ppo_threads=1, gate_prompts=8, gate_samples=2, gate_min_win=0.55, gate_max_kl=3.0,
        gate_sanity_file=sanity, canary_min_votes=6, canary_fraction=0.5, registry_poll_interval_s=0.5,
        kafka_max_poll_interval_ms=10_000, policy_algorithm=algorithm, rloo_k=2)
    # PPO: numbered questions, where "Yes." starts rare, 40 votes a round; it passed CI run after run so.
    # DPO failed there once: 30 of 40 votes tied, too few held out to accept a reward model. So DPO asks
    # the model's own questions (~1 vote in 2 ties) and takes 64 votes (~13 held out); its reward model
    # trains 32 epochs (after 2, 4 steps, its loss was 0.693 and its held-out pairs, all "Yes." against
    # "No.", went one way by the sign of an untrained difference: 0.111 once, 0.92 another time; after 6,
    # one CI run's 13 decided pairs read 0.231 and no reward model was accepted, so the round never ran
    # DPO. Retrained on that run's votes with score-head seeds 0-10: 6 epochs read 0.231-0.846 on seeds
    # 0-2, 16 fell to 0.385 once, 32 read 0.923-1.0 on all eleven; lr 3e-3 read 0.0 on two). DPO
    # moves the tiny model further: KL 2.1-13 after a round here, so its gate's limit is 50 (test_rounds
    # tests the limit), at 4e-4 over 3 iterations (6 swung it past the reward model: win rate 0.125).
    # (The same questions for PPO were tried this session: its gate read 0.47-0.73 on them, too close to
    # 0.55 for a test that must pass.) DPO's gate reads 32 pairs, not 16: 12-16 of 16 tied (where the
    # weights barely moved, the same seeds draw the same answers), so 16 left a verdict to 4 pairs.
    votes = 40 if algorithm == "ppo" else 64
    if algorithm == "ppo":
        prompts, eval_prompts = numbered_prompt_file(root / "p.jsonl", 60, 1), numbered_prompt_file(
            root / "e.jsonl", 8, 2)
    else:
        prompts, eval_prompts = prompt_file(root / "p.jsonl", 60, 0), prompt_file(root / "e.jsonl", 8, 60)
    if algorithm == "dpo":
        overrides.update(gate_max_kl=50.0, reward_epochs=32, reward_holdout_fraction=0.4, reward_min_holdout=3,
                         ppo_lr=4e-4, ppo_sanity_every=1, gate_samples=4)
    # PPO's loop runs two rounds (the second trains the promoted v1 on all votes so far); DPO's one,
    # enough to show the second algorithm in the same round (a second round cost ~40 s of the suite)
    rounds = 2 if algorithm == "ppo" else 1
    config = LoopConfig(out_dir=root / "out", rounds=rounds, votes_per_round=votes, canary_votes=24, users=4,
                        judge=f"{judge}:prefers_yes", prompts=prompts, eval_prompts=eval_prompts, max_tokens=8,
                        eval_samples=2, eval_max_tokens=16, second_judge=f"{judge}:prefers_no",
                        bootstrap=200, settings_overrides=overrides)
    report = run_loop(config, Settings(model=champion))

    # votes flowed from the simulated users through the API and Kafka into the trainer's store
    assert [r["votes"]["votes"] for r in report["rounds"]] == [votes] * rounds, report["rounds"]
    store = PreferenceStore(config.out_dir / "data" / "preferences.sqlite")
    try:
        assert store.count() >= votes * rounds
    finally:
        store.close()
    # rounds ran to a verdict (the gate's, or the update guard's "skipped"), not to an error; PPO's
    # published a version; every published version went through a canary. DPO on the tiny model learns
    # too little in a round for a test to require a publish: rerun on one CI round's saved votes with
    # seeds 0-3, its gate read 0.47-0.63 against its 0.55 (and the guard stopped 2 of 4 at iteration 2).
    outcomes = [r["training"]["outcome"] for r in report["rounds"]]
    assert set(outcomes) <= {"published", "rejected", "skipped"}, report["rounds"]
    # each round trained within what the hour's budget left it (round_max_minutes), here far more
    # than the tiny model needs, so no update was cut short by it
    assert all(30 < r["round_max_minutes"] < 50 for r in report["rounds"]), report["rounds"]
    assert not any(r["training"].get("ppo", {}).get("time_budget", {}).get("stopped_the_update", True)
                   for r in report["rounds"] if "ppo" in r["training"]), report["rounds"]
    assert all(0.0 <= r["training"]["gate"]["win_rate"] <= 1.0 for r in report["rounds"]
               if r["training"]["outcome"] != "skipped"), report["rounds"]
    assert algorithm != "ppo" or "published" in outcomes, report["rounds"]
    rolled = [r["rollout"] for r in report["rounds"] if "rollout" in r]
    assert len(rolled) == outcomes.count("published"), report["rounds"]
    assert all(r["result"] in ("promoted", "rolled back") for r in rolled), rolled
    if algorithm == "dpo":  # DPO learned from the users' own votes as well, published or not
        assert all(r["training"]["ppo"]["vote_pairs"] > 0 for r in report["rounds"]), report["rounds"]
    registry = Registry(config.out_dir / "data" / "registry")
    published = [r["training"]["version"] for r in report["rounds"] if r["training"]["outcome"] == "published"]
    assert set(report["phases_s"]) >= {"start", "votes", "train", "evaluate"}
    machine = report["machine"]  # where it ran, and what each auto dtype chose there
    assert machine["cpu"] and machine["cores"] >= 1 and machine["torch"] == torch.__version__
    assert machine["dtypes"] == {k: c.dtype for k, c in Settings(model=champion).effective_dtypes().items()}
    assert machine["commit"], machine  # the tests run in a git checkout
    for v in published:  # the algorithm the round ran is recorded with the version
        assert registry.info(v).training["config"]["algorithm"] == algorithm
    assert json.loads((config.out_dir / "loop.json").read_text())["evaluation"] == report["evaluation"]
    assert (config.out_dir / "loop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn either way
    if not published:  # (DPO's one round, rejected by its gate: then nothing is drawn or judged)
        assert report["evaluation"]["versions"] == {} and "skipped" in report["evaluation"], report["evaluation"]
        assert not (config.out_dir / "answers.jsonl").exists()
        return
    _check_evaluation(config, report, registry, published)


def _check_evaluation(config: LoopConfig, report: dict[str, Any], registry: Registry, published: list[str]) -> None:
    """The short loop's evaluation: every published version judged against v0 by both judges, with
    intervals, KL and sanity, its answers saved, and `kaizen bench judge` reading them again."""
    # the evaluation judged every published version against v0, with an interval, KL and sanity
    versions = report["evaluation"]["versions"]
    assert set(published) <= set(versions) and "v0" in versions
    for v in published:
        e = versions[v]
        assert 0.0 <= e["ci95"][0] <= e["win_rate_vs_v0"] <= e["ci95"][1] <= 1.0
        assert e["kl_to_v0"] == e["kl_to_v0"] and 0.0 <= e["sanity_share"] <= 1.0
        assert e["stage"] == registry.info(v).stage
        assert 0.0 <= e["lc_ci95"][0] <= e["lc_ci95"][1] <= 1.0 and 0.0 <= e["lc_win_rate_vs_v0"] <= 1.0
        assert 0.0 <= e["truncated_share"] <= 1.0
        second = e["second_judge"]  # the same pairs read by another judge (here: one that prefers "No.")
        assert 0.0 <= second["ci95"][0] <= second["win_rate_vs_v0"] <= second["ci95"][1] <= 1.0
    png = (config.out_dir / "loop.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # every evaluation answer is saved (8 prompts x 2 per version, v0 included), and judging them again
    # (`kaizen bench judge`) gives the loop's own figures: the same pairs, in the same order
    # (and v0's second draw, the null control: other seeds, judged against v0 as a version is)
    saved = (config.out_dir / "answers.jsonl").read_text().splitlines()
    assert len(saved) == (len(versions) + 1) * 8 * 2
    assert sum(json.loads(line)["version"] == NULL_VERSION for line in saved) == 8 * 2
    null = report["evaluation"]["null_control"]  # (the tiny model's few answers may repeat v0's exactly)
    assert null["seed_offset"] == NULL_SEED != EVAL_SEED
    assert 0.0 <= null["ci95"][0] <= null["win_rate_vs_v0"] <= null["ci95"][1] <= 1.0
    assert 0.0 <= null["second_judge"]["win_rate_vs_v0"] <= 1.0
    first_report = rejudge(config.out_dir, config.judge)
    first = first_report["versions"]
    again_report = rejudge(config.out_dir, str(config.second_judge), flip_seed=config.seed + 1)
    again = again_report["versions"]
    for v in published:
        assert first[v] == {k: versions[v][k] for k in first[v]}
        assert again[v] == {k: versions[v]["second_judge"].get(k, versions[v].get(k)) for k in again[v]}
    assert first_report["null_control"] == {k: null[k] for k in first_report["null_control"]}
    assert again_report["null_control"] == {k: null["second_judge"].get(k, null.get(k))
                                            for k in again_report["null_control"]}
    print(json.dumps({"rounds": report["rounds"], "evaluation": versions, "phases": report["phases_s"]},
                     default=str)[:3000])


def test_the_loop_keeps_rolled_back_versions_for_its_evaluation_and_limits_no_votes(tmp_path: Path) -> None:
    """The evaluation reads every version the loop published. Under the service's defaults, retention
    deleted a version its canary rolled back before the evaluation could read it (seen in CI: RLOO's
    v1 was missing from the report). And its few simulated users stand in for many people, so the
    per-user vote limit must not cut a round's votes short."""
    from datetime import UTC, datetime

    from kaizen.core.registry_schema import RegistryState, VersionState
    from kaizen.core.retention import choose_versions
    from simulation.loop import loop_settings

    settings = loop_settings(Settings(), LoopConfig(out_dir=tmp_path))
    now = datetime.now(UTC)
    state = RegistryState(champion="v2", previous_champions=["v0"], versions={
        "v0": VersionState(stage="retired", changed=now),
        "v1": VersionState(stage="rejected", changed=now, reason="rolled back"),
        "v2": VersionState(stage="champion", changed=now)})
    deleted, _ = choose_versions(state, ["v0", "v1", "v2"], keep_champions=settings.retention_keep_champions,
                                 keep_rejected=settings.retention_keep_rejected)
    assert deleted == {}
    defaults = Settings()
    assert "v1" in choose_versions(  # what the loop avoids
        state, ["v0", "v1", "v2"], keep_champions=defaults.retention_keep_champions,
        keep_rejected=defaults.retention_keep_rejected)[0]
    config = LoopConfig(out_dir=tmp_path)
    assert settings.vote_limit_per_window >= config.rounds * (config.votes_per_round + config.canary_votes)


def test_a_judge_that_cannot_run_stops_the_loop_before_anything_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluation's judges used to load only after the rounds: a reward-model judge without its
    folder failed the loop at its evaluation, an hour in. Every judge now gives one verdict on a
    probe pair before the broker or the API start."""
    monkeypatch.delenv("KAIZEN_JUDGE_REWARD_MODEL", raising=False)
    judges = tmp_path / "judges.py"
    judges.write_text(JUDGE + "\n\ndef unsure(messages, a, b):\n    return 'maybe'\n")
    for field, spec, error in [
            ("second_judge", "simulation.judges:reward_model", "RuntimeError: set KAIZEN_JUDGE_REWARD_MODEL"),
            ("eval_judge", f"{judges}:unsure", "answered 'maybe'"),
            ("judge", f"{judges}:missing", "missing is not a function")]:
        out = tmp_path / field / "out"
        specs: dict[str, Any] = {"judge": f"{judges}:prefers_yes", field: spec}
        config = LoopConfig(out_dir=out, **specs)
        with pytest.raises(ValueError, match=error):
            run_loop(config, Settings())
        assert not (out / "data" / "serve.log").exists()  # no API was started
    # a judge that runs passes the check and is the one returned
    from simulation.judges import ready_judge
    assert ready_judge(f"{judges}:prefers_no")([{"role": "user", "content": "?"}], "Yes.", "No.") == 1
