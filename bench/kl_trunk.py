"""The KL reading (`kl_to_reference`) with the shared lower layers run once, side by side with running
both whole models, and the gate's KL on all answers vs one per prompt.

    python bench/kl_trunk.py                       # SmolLM2-135M-Instruct, the gate's shapes, 3 rounds
    python bench/kl_trunk.py --model /tmp/tiny --rounds 1 --prompts 2   # smoke run
    python bench/kl_trunk.py --arms "all at 256,first at 256" --prompts 8 --rounds 1   # two arms only

The gate, the PPO guard's checks and the loop's evaluation read a version's KL to its reference by
forward passes of both models over the version's answers (trainer/policy.py, `kl_to_reference`).
A round trains only the top `ppo_train_layers`, so the layers below are the same in both; they now
run once per batch for both models. The arms, taking turns round by round, on one fixed batch
(answers of random tokens: the cost is in the shapes):

* long, shared / long, whole  — the gate's and the guard's reading: one answer to each of
  `--prompts` held-out prompts at the service's 256 tokens (120-256 long), the candidate being
  the model with its top layers perturbed (as a round leaves them); "whole" makes the reference's
  first layer differ by one part in 10^7, so nothing can be shared and both models run whole;
* rollout KL, all / rollout KL, one per prompt — the gate's `kl_rollout_length` diagnostic on all
  gate_samples answers (40-64 tokens) of each prompt, as before, vs the first answer of each;
* all at 256 / first at 256 — the gate's and the guard's reading when the rollouts are as long as
  the service's answers (a RAFT round at 256 tokens): all gate_samples answers of each prompt (120-256
  tokens), as before, vs the first gate_kl_samples (1) of each.

Prints the median seconds of each arm, the ratios, and the KL each arm read (the shared and whole
readings must agree); a report, never a pass/fail test.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, save_report  # noqa: E402


def answers(prompts: int, k: int, low: int, high: int, seed: int) -> tuple[list[int], list[list[int]]]:
    """k answers of low..high random word tokens to each prompt: (prompt index, token ids) lists."""
    rng = random.Random(seed)
    vocab = list(range(1000, 20000))
    index = [p for p in range(prompts) for _ in range(k)]
    return index, [rng.choices(vocab, k=rng.randint(low, high)) for _ in index]


def parse_args(settings: Any) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=settings.model_dir)
    ap.add_argument("--prompts", type=int, default=32, help="held-out prompts (the gate's 32)")
    ap.add_argument("--samples", type=int, default=settings.gate_samples)
    ap.add_argument("--train-layers", type=int, default=settings.ppo_train_layers)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arms", default="", help="comma-separated arm names to run (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return ap.parse_args()


def make_arms(args: argparse.Namespace, settings: Any) -> tuple[dict[str, Callable[[], float]], dict[str, int]]:
    """The arms (module docstring) on fresh copies of the model, and the depth each can share."""
    import torch

    from trainer.policy import encode_prompt, kl_to_reference, load_policy, shared_trunk_depth

    torch.manual_seed(0)
    candidate, tok, _ = load_policy(args.model)
    reference, _, _ = load_policy(args.model)
    apart, _, _ = load_policy(args.model)  # the reference, its first layer one part in 10^7 off
    with torch.no_grad():
        for layer in candidate.lm.model.layers[-args.train_layers:]:
            for p in layer.parameters():
                p.add_(1e-3 * p.abs().mean() * torch.randn_like(p))
        next(apart.lm.model.layers[0].parameters()).mul_(1 + 1e-7)
    rng = random.Random(1)
    prompt_ids = [encode_prompt(tok, [{"role": "user", "content": f"Question {i}: tell me about topic "
                                                                  f"{rng.randint(0, 999)}."}], 256)
                  for i in range(args.prompts)]
    long_idx, long_answers = answers(args.prompts, 1, 120, settings.default_max_tokens, seed=2)
    short_idx, short_answers = answers(args.prompts, args.samples, 40, settings.ppo_response_length, seed=3)
    firsts = [j for j in range(len(short_idx)) if j % args.samples == 0]
    full_idx, full_answers = answers(args.prompts, args.samples, 120, settings.default_max_tokens, seed=4)

    def kl(ref: Any, index: list[int], ans: list[list[int]]) -> float:
        each = kl_to_reference(candidate, ref, tok, [prompt_ids[i] for i in index], ans, 1.0)
        return sum(each) / len(each)

    arms: dict[str, Callable[[], float]] = {
        "long, shared": lambda: kl(reference, long_idx, long_answers),
        "long, whole": lambda: kl(apart, long_idx, long_answers),
        "rollout KL, all": lambda: kl(reference, short_idx, short_answers),
        "rollout KL, one per prompt": lambda: kl(reference, [short_idx[j] for j in firsts],
                                                 [short_answers[j] for j in firsts]),
        "all at 256": lambda: kl(reference, full_idx, full_answers),
        "first at 256": lambda: kl(reference, [full_idx[j] for j in firsts],
                                   [full_answers[j] for j in firsts]),
    }
    if args.arms:
        arms = {name: arms[name] for name in args.arms.split(",")}
    depths = {"shared": shared_trunk_depth(candidate, reference, frozen=False),
              "whole": shared_trunk_depth(candidate, apart, frozen=False)}
    return arms, depths


def main() -> None:
    import torch
    from rich.progress import Progress

    from kaizen.core.settings import get_settings

    settings = get_settings()
    args = parse_args(settings)
    torch.set_num_threads(args.threads)
    arms, depths = make_arms(args, settings)
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    readings: dict[str, float] = {}
    with Progress() as bar:
        task = bar.add_task("KL readings", total=args.rounds * len(arms))
        for _ in range(args.rounds):
            for name, run in arms.items():
                started = time.perf_counter()
                readings[name] = run()
                seconds[name].append(time.perf_counter() - started)
                bar.advance(task)
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    pairs = {"long: whole / shared": ("long, whole", "long, shared"),
             "rollout KL: all / one per prompt": ("rollout KL, all", "rollout KL, one per prompt"),
             "at 256: all / first": ("all at 256", "first at 256")}
    ratios = {k: medians[a] / medians[b] for k, (a, b) in pairs.items() if a in medians and b in medians}
    report = {"model": str(args.model), "prompts": args.prompts, "samples": args.samples,
              "train_layers": args.train_layers, "shared_depth": depths, "rounds": args.rounds,
              "threads": args.threads, "seconds": seconds, "median_s": medians, "ratios": ratios,
              "kl": readings}
    for name, m in medians.items():
        print(f"{name:>28}: median {m:.2f} s, KL {readings[name]:.5f}")
    print(f"shared depth {depths}; " + "; ".join(f"{k}: {v:.2f}x" for k, v in ratios.items()))
    save_report(args.out, "kl-trunk", report)


if __name__ == "__main__":
    main()
