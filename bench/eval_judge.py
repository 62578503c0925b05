"""The loop evaluation's slow half, before and after batching: the reward-model judge and KL to v0.

    KAIZEN_JUDGE_REWARD_MODEL=DIR python bench/eval_judge.py                  # the 40 pairs in tests/data
    KAIZEN_JUDGE_REWARD_MODEL=DIR python bench/eval_judge.py --data PAIRS.jsonl --pairs 120

`kaizen bench loop` evaluates every published version against v0 with a second judge, the reward
model of `KAIZEN_JUDGE_REWARD_MODEL`, and measures KL(version ‖ v0); with three versions that took
748 of the hour's seconds (bench/README.md, the eighteenth loop row). Side by side, on the same
real answers (the pairs of a preference file, `--data`), same process, same threads:

- judge, one pair at a time: what `judge_pairs` did until this script (two sequences per pass);
- judge, batched: `judge_many`, one length-sorted pass over every answer, each scored once;
- KL, in the callers' order: `kl_to_reference` on consecutive chunks of 16 answers, as it batched
  until this script (a chunk pads to its longest answer);
- KL, length-sorted: `kl_to_reference` on all answers at once (sorted, then put back in order).

The KL arms use the served model (`KAIZEN_MODEL`, else the default) against a copy with its last
layer perturbed. The
figures to compare are the ratios; verdicts and KLs must agree between the arms of each pair.
A report, not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, save_report  # noqa: E402

DEFAULT_DATA = ROOT / "tests" / "data" / "hh_harmless_sample.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="preference pairs (JSONL)")
    ap.add_argument("--pairs", type=int, default=120, help="pairs judged: the file's first N")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    import torch
    from rich.progress import Progress

    from kaizen.core.settings import get_settings
    from trainer.reward_data import read_pairs_file

    settings = get_settings()
    torch.set_num_threads(settings.reward_threads or torch.get_num_threads())
    source = read_pairs_file(args.data)
    items = [(p.prompt, p.chosen, p.rejected) if k % 2 == 0 else (p.prompt, p.rejected, p.chosen)
             for k, p in enumerate(source[:args.pairs])]  # each pair once, every other one swapped
    report: dict[str, Any] = {"pairs": len(items), "data": str(args.data)}
    with Progress() as bar:
        report |= time_judge(items, bar)
        report |= time_kl(items, settings, bar)
    save_report(args.out, "eval-judge", report)
    print(f"judge: {report['judge_per_pair_s']:.1f} s one pair at a time, {report['judge_batched_s']:.1f} s "
          f"batched = {report['judge_speedup']:.2f}x; verdicts agree {report['verdicts_agree']:.3f}")
    print(f"KL:    {report['kl_chunked_s']:.1f} s in order, {report['kl_sorted_s']:.1f} s length-sorted = "
          f"{report['kl_speedup']:.2f}x; largest difference {report['kl_max_abs_diff']:.2e} nats")


def time_judge(items: list[Any], bar: Any) -> dict[str, float]:
    """The reward-model judge a pair per call (a fresh judge each: nothing cached, as before), then
    `judge_many` on all pairs."""
    from simulation.judges import RewardModelJudge, judge_many

    RewardModelJudge()(*items[0])  # load the judge model before any clock starts
    task = bar.add_task("judge, one pair at a time", total=len(items))
    t = time.perf_counter()
    one: list[Any] = []
    for item in items:
        one.append(RewardModelJudge()(*item))
        bar.advance(task)
    per_pair = time.perf_counter() - t
    t = time.perf_counter()
    batched = judge_many(RewardModelJudge(), items)
    took = time.perf_counter() - t
    return {"judge_per_pair_s": per_pair, "judge_batched_s": took, "judge_speedup": per_pair / took,
            "verdicts_agree": sum(a == b for a, b in zip(one, batched, strict=True)) / len(items)}


def time_kl(items: list[Any], settings: Any, bar: Any) -> dict[str, float]:
    """KL of the first answers between the served model and a perturbed copy: chunks of 16 in
    order (each call sorts only its chunk: the old batching), then all at once, length-sorted."""
    import torch

    from trainer.policy import encode_prompt, kl_to_reference, load_policy

    policy, tokenizer, _ = load_policy(settings.model_dir)
    reference, _, _ = load_policy(settings.model_dir)
    torch.manual_seed(0)
    with torch.no_grad():  # a version a little away from v0, so the KLs are not all zero
        for w in policy.lm.model.layers[-1].parameters():
            w.add_(0.02 * torch.randn_like(w))
    prompts = [encode_prompt(tokenizer, m, settings.ppo_max_prompt_length) for m, _, _ in items]
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"][:settings.ppo_response_length * 4]
               for _, a, _ in items]
    task = bar.add_task("KL, in the callers' order", total=len(items))
    t = time.perf_counter()
    chunked: list[float] = []
    for i in range(0, len(items), 16):
        chunked += kl_to_reference(policy, reference, tokenizer, prompts[i:i + 16], answers[i:i + 16], 1.0)
        bar.advance(task, len(answers[i:i + 16]))
    in_order = time.perf_counter() - t
    t = time.perf_counter()
    whole = kl_to_reference(policy, reference, tokenizer, prompts, answers, 1.0)  # timing: not sampled
    took = time.perf_counter() - t
    return {"kl_chunked_s": in_order, "kl_sorted_s": took, "kl_speedup": in_order / took,
            "kl_max_abs_diff": max(abs(a - b) for a, b in zip(chunked, whole, strict=True))}


if __name__ == "__main__":
    main()
