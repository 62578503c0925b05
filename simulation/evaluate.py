"""The loop benchmark's evaluation: every published version against v0 on the evaluation prompts.

With the evaluation judge (and a second one, when given): the win rate (ties and "both bad" count
half) with a 95% bootstrap interval over prompts, the length-controlled win rate (the judge's
verdicts regressed on the length difference, read at equal length, as AlpacaEval 2.0 does), tie and
both-bad shares, mean answer length, the share of answers cut off at `eval_max_tokens`, KL to v0
(Monte Carlo: mean over the version's own answers of log p_v − log p_v0), and the sanity prompts'
share of matching answers (trainer/sanity.py); and the plot of it (`loop.png`). With
`null_control` (on by default), v0 is drawn a second time with other seeds and judged against v0
as a version is: what "no change" reads here, so a reader sees how far one draw of answers moves a
figure beyond its interval over prompts. The rounds that publish the versions are simulation/loop.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaizen.core.atomic_files import write_atomic
from kaizen.core.registry import Registry
from kaizen.core.registry_schema import VERSION_RE
from kaizen.core.settings import Settings
from simulation.judges import judge_many, load_judge
from simulation.simulate import read_prompts
from trainer.reward_eval import length_controlled_win_rate
from trainer.rollout_engine import Sample

#: The evaluation's answers in the loop's output folder (`write_answers`).
ANSWERS_FILE = "answers.jsonl"
#: Sampling seeds of the evaluation (added to the loop's seed): every version draws with EVAL_SEED, so
#: two versions differ by their weights only; the null control redraws v0 with NULL_SEED.
EVAL_SEED, NULL_SEED = 17, 18
#: The null control's answers in answers.jsonl and its report: v0 drawn a second time.
NULL_VERSION = "v0-redraw"

if TYPE_CHECKING:
    from simulation.loop import LoopConfig


def progress_bar() -> Any:
    """A progress bar with a count and an ETA (rich)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn())



def bootstrap_interval(scores: list[float], n: int, seed: int) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of per-prompt scores."""
    if not scores:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(scores, k=len(scores))) / len(scores) for _ in range(n))
    return means[int(0.025 * (n - 1))], means[int(0.975 * (n - 1))]


def evaluate_versions(settings: Settings, registry: Registry, config: LoopConfig,
                      engine: Any) -> dict[str, Any]:
    """Every published version (not rejected by its gate) against v0 on the evaluation prompts.
    With none, nothing is drawn or judged: the report says so (v0 against itself reads 0.5 by
    construction; on the slow EPYC its draws and the null control took ~25 minutes)."""
    from transformers import AutoTokenizer

    from trainer.policy import encode_prompt
    from trainer.sanity import SanityCheck

    versions = gate_passed(registry)
    eval_prompts = read_prompts(config.eval_prompts)
    if not versions:
        return {**_header(config, len(eval_prompts)), "skipped": "no version passed its gate: nothing to evaluate"}
    judge = load_judge(config.eval_judge or config.judge)
    second = load_judge(config.second_judge) if config.second_judge else None
    messages = user_messages(eval_prompts)
    tokenizer = AutoTokenizer.from_pretrained(registry.path("v0"))
    ids = [encode_prompt(tokenizer, m, settings.ppo_max_prompt_length) for m in messages]
    check = SanityCheck.from_settings(settings)
    answers: dict[str, list[Any]] = {}
    sanity_ok: dict[str, float] = {}
    with progress_bar() as bar:
        task = bar.add_task("evaluation: sampling", total=1 + len(versions) + config.null_control)
        for v in ["v0", *versions]:
            engine.load_weights(registry.path(v))
            answers[v] = engine.generate(ids, max_tokens=config.eval_max_tokens,
                                         temperature=config.eval_temperature, n=config.eval_samples,
                                         seed=config.seed + EVAL_SEED)
            if v == "v0" and config.null_control:  # v0 again, other seeds, while its weights are loaded
                answers[NULL_VERSION] = engine.generate(ids, max_tokens=config.eval_max_tokens,
                                                        temperature=config.eval_temperature,
                                                        n=config.eval_samples, seed=config.seed + NULL_SEED)
                bar.advance(task)
            shares = [a["share"] for a in check.answers(engine, tokenizer, full=True)]
            sanity_ok[v] = sum(shares) / max(1, len(shares))  # as the gate reads a champion
            bar.advance(task)
        write_answers(config.out_dir / ANSWERS_FILE, eval_prompts, answers)
        task = bar.add_task("evaluation: judge and KL", total=len(versions))
        out = _header(config, len(eval_prompts))
        base = by_prompt(answers["v0"])
        out["versions"]["v0"] = {**answer_figures(answers["v0"]), "sanity_share": sanity_ok["v0"]}
        for v in versions:
            mine = by_prompt(answers[v])
            out["versions"][v] = {
                **judge_pairs(judge, messages, mine, base, config.bootstrap, config.seed),
                **answer_figures(answers[v]),
                "kl_to_v0": kl_to_base(registry.path(v), registry.path("v0"), ids, answers[v],
                                       config.eval_temperature),
                "sanity_share": sanity_ok[v], "stage": registry.info(v).stage}
            if second is not None:
                out["versions"][v]["second_judge"] = judge_pairs(second, messages, mine, base,
                                                                 config.bootstrap, config.seed,
                                                                 flip_seed=config.seed + 1)
            bar.advance(task)
        if NULL_VERSION in answers:
            out["null_control"] = null_control(judge, second, messages, answers, config.bootstrap,
                                               config.seed)
    return out


def _header(config: LoopConfig, prompts: int) -> dict[str, Any]:
    """The evaluation's figures before any version's: what it reads, how, and with which judges."""
    return {"prompts": prompts, "samples_per_prompt": config.eval_samples, "max_tokens": config.eval_max_tokens,
            "temperature": config.eval_temperature, "judge": config.eval_judge or config.judge,
            "second_judge": config.second_judge, "versions": {}}


def gate_passed(registry: Registry) -> list[str]:
    """The versions after v0 that their gate published (rolled back or not), oldest first."""
    rejected = {e.version for e in registry.audit() if e.action == "publish" and e.to_stage == "rejected"}
    return [v for v in registry.names() if v != "v0" and v not in rejected]


def null_control(judge: Any, second: Any, messages: list[Any], answers: dict[str, list[Any]], bootstrap: int,
                 seed: int, flip_seed: int | None = None) -> dict[str, Any]:
    """v0's second draw (NULL_VERSION) judged against v0 as a version is, by each judge: what "no
    change" reads in this evaluation. 0.5 in expectation; how far one draw lands from it is the noise
    every version's figure carries on top of its interval over prompts (the interval resamples
    prompts, not the answers drawn for them). `flip_seed` as for `judge_pairs` (the first judge's)."""
    mine, base = by_prompt(answers[NULL_VERSION]), by_prompt(answers["v0"])
    out = {**judge_pairs(judge, messages, mine, base, bootstrap, seed, flip_seed=flip_seed),
           **answer_figures(answers[NULL_VERSION]), "seed_offset": NULL_SEED}
    if second is not None:
        out["second_judge"] = judge_pairs(second, messages, mine, base, bootstrap, seed, flip_seed=seed + 1)
    return out


def write_answers(path: Path, prompts: list[str], answers: dict[str, list[Any]]) -> None:
    """Every evaluation answer, one JSON line each (version, prompt, its text and tokens, whether it
    ended): what `kaizen bench judge` re-reads with another judge, without sampling again."""
    lines = [json.dumps({"version": v, "prompt_index": s.prompt, "prompt": prompts[s.prompt], "text": s.text,
                         "token_ids": list(s.token_ids), "finished": s.finished})
             for v, samples in answers.items() for s in samples]
    write_atomic(path, "".join(line + "\n" for line in lines))


def read_answers(path: Path) -> tuple[list[str], dict[str, list[Sample]]]:
    """The prompts and each version's answers, as `write_answers` wrote them (a clear error if the
    file is not one)."""
    prompts: dict[int, str] = {}
    answers: dict[str, list[Sample]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            i = int(row["prompt_index"])
            prompts[i] = str(row["prompt"])
            version = str(row["version"])
            if not VERSION_RE.match(version) and version != NULL_VERSION:
                raise ValueError(f"{version!r} is not a version name (v0, v1, ...)")
            answers.setdefault(version, []).append(
                Sample(i, [int(t) for t in row["token_ids"]], str(row["text"]), bool(row["finished"])))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not an evaluation answer ({e!r})") from e
    if sorted(prompts) != list(range(len(prompts))):
        raise ValueError(f"{path}: the prompts are not numbered 0..{len(prompts) - 1}")
    return [prompts[i] for i in range(len(prompts))], answers


def judge_pairs(judge: Any, messages: list[Any], mine: dict[int, list[Any]], base: dict[int, list[Any]],
                bootstrap: int, seed: int, flip_seed: int | None = None) -> dict[str, Any]:
    """A version's answers against v0's, prompt by prompt (same seeds, paired in order), each pair
    shown to the judge in a random order (drawn from `flip_seed`, default `seed`): win rate with its
    bootstrap interval over prompts (`bootstrap` resamples drawn from `seed`), the length-controlled
    win rate with its interval, tie and both-bad shares."""
    rng = random.Random(seed if flip_seed is None else flip_seed)
    pairs = [(i, a, b, rng.random() < 0.5) for i in range(len(messages))
             for a, b in zip(mine.get(i, []), base.get(i, []), strict=False)]
    said = judge_many(judge, [(messages[i], *((b.text, a.text) if flip else (a.text, b.text)))
                              for i, a, b, flip in pairs])
    verdicts: list[tuple[int, float, float]] = []  # (prompt, outcome, length difference in tokens)
    ties = both_bad = 0
    scores: dict[int, list[float]] = {}
    for (i, a, b, flip), verdict in zip(pairs, said, strict=True):
        ties += verdict == "tie"
        both_bad += verdict == "both_bad"
        outcome = 0.5 if verdict in ("tie", "both_bad") else 1.0 if (verdict == 1) == flip else 0.0
        scores.setdefault(i, []).append(outcome)
        verdicts.append((i, outcome, float(len(a.token_ids) - len(b.token_ids))))
    per_prompt = [sum(v) / len(v) for v in scores.values()]
    n = len(verdicts)
    win = sum(per_prompt) / len(per_prompt) if per_prompt else float("nan")
    lo, hi = bootstrap_interval(per_prompt, bootstrap, seed)
    lc = length_controlled_win_rate([o for _, o, _ in verdicts], [d for _, _, d in verdicts])
    lc_lo, lc_hi = lc_bootstrap_interval(verdicts, bootstrap, seed)
    return {"win_rate_vs_v0": round(win, 4), "ci95": [round(lo, 4), round(hi, 4)],
            "lc_win_rate_vs_v0": round(lc, 4), "lc_ci95": [round(lc_lo, 4), round(lc_hi, 4)],
            "tie_share": round(ties / n, 4) if n else None,
            "both_bad_share": round(both_bad / n, 4) if n else None}


def lc_bootstrap_interval(verdicts: list[tuple[int, float, float]], n: int, seed: int) -> tuple[float, float]:
    """95% percentile bootstrap interval of the length-controlled win rate, resampling prompts."""
    per_prompt: dict[int, list[tuple[float, float]]] = {}
    for i, outcome, diff in verdicts:
        per_prompt.setdefault(i, []).append((outcome, diff))
    groups = list(per_prompt.values())
    if not groups:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    stats = []
    for _ in range(n):
        sample = [v for g in rng.choices(groups, k=len(groups)) for v in g]
        stats.append(length_controlled_win_rate([o for o, _ in sample], [d for _, d in sample]))
    stats.sort()
    return stats[int(0.025 * (n - 1))], stats[int(0.975 * (n - 1))]


def user_messages(prompts: list[str]) -> list[list[dict[str, str]]]:
    """Each prompt as a one-turn conversation, as the evaluation asks it."""
    return [[{"role": "user", "content": p}] for p in prompts]


def answer_figures(samples: list[Any]) -> dict[str, float]:
    """A version's answers at a glance: mean length in tokens, share cut off at max_tokens."""
    return {"mean_answer_tokens": mean_tokens(samples), "truncated_share": truncated_share(samples)}


def truncated_share(samples: list[Any]) -> float:
    """Share of answers cut off at max_tokens (no end of turn)."""
    return round(sum(not s.finished for s in samples) / max(1, len(samples)), 4)


def by_prompt(samples: list[Any]) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for s in samples:
        out.setdefault(s.prompt, []).append(s)
    return out


def mean_tokens(samples: list[Any]) -> float:
    return round(sum(len(s.token_ids) for s in samples) / max(1, len(samples)), 2)


def kl_to_base(model_dir: Path, base_dir: Path, prompt_ids: list[list[int]], samples: list[Any],
               temperature: float) -> float:
    """Monte-Carlo KL(version ‖ v0) per answer: mean of Σ_t log p_v(y_t) − log p_v0(y_t) over its own
    answers, both read at the `temperature` the answers were sampled at (read at another one the
    mean estimates no KL and can go below zero: at 1.0 for answers sampled at 0.7 the forty-ninth loop
    row's v3 read −0.22 where its gate had read 1.05) (batched forward passes of both models,
    trainer.policy.kl_to_reference)."""
    from trainer.policy import kl_to_reference, load_policy

    policy, tokenizer, _ = load_policy(model_dir)
    base, _, _ = load_policy(base_dir)
    kls = kl_to_reference(policy, base, tokenizer, [prompt_ids[s.prompt] for s in samples],
                          [list(s.token_ids) for s in samples], temperature)
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
    null = report["evaluation"].get("null_control")
    if null:
        ax.axhline(null["win_rate_vs_v0"], color="grey", ls="--", lw=0.8,
                   label=f"v0 redrawn against v0 (no change): {null['win_rate_vs_v0']:.3f}")
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate over v0")
    ax.set_xlabel("version")
    ax.set_title("Kaizen loop: published versions against v0")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
