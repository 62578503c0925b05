"""RAFT's scoring step, side by side: the log-probs of two answers per prompt vs of all of them.

    python bench/raft_scoring.py                      # SmolLM2-135M-Instruct, 16 prompts x 8 answers, 3 rounds
    python bench/raft_scoring.py --model /tmp/tiny --rounds 1 --prompts 2   # smoke run

A RAFT iteration (trainer/raft.py) needs the reward model's score of every answer but trains on one
answer per prompt; its first version scored like PPO (`PPOTrainer.score`: the frozen trunk, the
policy's and the reference's log-probs of every answer), its own `RaftTrainer.score` runs those
passes on each prompt's best and first answer only. Both arms score the same fixed batch (answers
of random tokens, 40-64 long: the cost is in the shapes), with the reward model in both (the
served model with an untrained head: same cost as a trained one), taking turns round by round.
Prints the median seconds of each and the ratio; a report, never a pass/fail test.
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


def fixed_batch(tok: Any, prompts: int, k: int, seed: int) -> tuple[list[Any], list[list[int]], list[Any]]:
    """`prompts` one-line questions, k answers each of 40-64 random word tokens (half ended)."""
    from trainer.policy import encode_prompt
    from trainer.rollout_engine import Sample

    rng = random.Random(seed)
    vocab = list(range(1000, 20000))
    messages = [[{"role": "user", "content": f"Question {i}: tell me about topic {rng.randint(0, 999)}."}]
                for i in range(prompts)]
    prompt_ids = [encode_prompt(tok, m, 256) for m in messages]
    samples = [Sample(p, rng.choices(vocab, k=rng.randint(40, 64)), "an answer", rng.random() < 0.5)
               for p in range(prompts) for _ in range(k)]
    for s in samples:
        s.text = tok.decode(s.token_ids)
    return messages, prompt_ids, samples


def main() -> None:
    from kaizen.core.settings import get_settings

    settings = get_settings()
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=settings.model_dir)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=settings.raft_samples)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    import torch
    from rich.progress import Progress

    from trainer.policy import RewardScorer, load_policy
    from trainer.ppo import PPOTrainer
    from trainer.ppo_config import PPOConfig
    from trainer.raft import RaftTrainer
    from trainer.reward_model import load_reward_model

    torch.set_num_threads(args.threads)
    config = PPOConfig.from_settings(settings, algorithm="raft", raft_samples=args.samples,
                                     batch_size=args.prompts * args.samples, threads=args.threads)
    policy, tok, _ = load_policy(args.model)
    reference, _, _ = load_policy(args.model)
    rm, rm_tok = load_reward_model(args.model)
    scorer = RewardScorer(rm, rm_tok, max_length=settings.reward_max_length)
    raft = RaftTrainer(config, policy, reference, tok, None, scorer, None)
    batch = fixed_batch(tok, args.prompts, args.samples, seed=0)
    arms: dict[str, Callable[[], Any]] = {"all answers (PPOTrainer.score)": lambda: PPOTrainer.score(raft, *batch),
                                          "two per prompt (RaftTrainer.score)": lambda: raft.score(*batch)}
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    with Progress() as bar:
        task = bar.add_task("scoring", total=args.rounds * len(arms))
        for _ in range(args.rounds):
            for name, run in arms.items():
                started = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - started)
                bar.advance(task)
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    old, new = medians.values()
    report = {"model": str(args.model), "prompts": args.prompts, "samples": args.samples, "rounds": args.rounds,
              "threads": args.threads, "seconds": seconds, "median_s": medians, "speedup": old / new}
    for name, m in medians.items():
        print(f"{name:>36}: median {m:.2f} s")
    print(f"ratio: {old / new:.2f}x faster")
    save_report(args.out, "raft-scoring", report)


if __name__ == "__main__":
    main()
