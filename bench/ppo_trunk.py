"""PPO iteration time with the frozen lower layers shared, side by side with running them every pass.

    python bench/ppo_trunk.py                   # SmolLM2-135M-Instruct, 16 prompts x 64 tokens, 3 rounds
    python bench/ppo_trunk.py --model /tmp/tiny --rounds 1 --batch 4 --response-length 8   # smoke run

With `ppo_train_layers` < all, the lower layers (and the embeddings under them) never change
during PPO and are the same in the reference: trainer/ppo.py runs them once per batch and feeds
their output to the policy, the reference and every minibatch pass. Three arms, each its own
PPOTrainer on the same prompts, taking turns iteration by iteration (the machine's noise hits
them alike), all sampling on one vLLM engine:

* shared  — the defaults: top layers + norm + value head trained, lower layers run once;
* whole   — the same trained parameters, but every pass runs the whole model (trunk sharing off);
* before  — what ran before: the LM head trained too, which (tied to the embeddings in SmolLM2)
            puts every layer under the gradient and rules out sharing.

The reward here is a constant (zero): the reward model's time is the same in every arm and not
what is measured. Prints median seconds per phase and the ratios; a report, never a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


KEYS = ("rollout", "scoring", "training", "sync", "total")


def parse_args(settings: Any) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=settings.model_dir)
    ap.add_argument("--rounds", type=int, default=3, help="iterations per arm")
    ap.add_argument("--batch", type=int, default=settings.ppo_batch_size)
    ap.add_argument("--response-length", type=int, default=settings.ppo_response_length)
    ap.add_argument("--train-layers", type=int, default=settings.ppo_train_layers)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args()


def make_arms(args: argparse.Namespace, config: Any, engine: Any, sync_dir: Path) -> dict[str, Any]:
    """The three arms (module docstring), each its own PPOTrainer on fresh copies of the model."""
    import torch

    from trainer.policy import load_policy
    from trainer.ppo import PPOTrainer

    def zero_scorer(prompts: Any, answers: Any) -> torch.Tensor:
        return torch.zeros(len(answers))

    arms: dict[str, PPOTrainer] = {}
    for name in ("shared", "whole", "before"):
        policy, tokenizer, _ = load_policy(args.model)
        reference, _, _ = load_policy(args.model)
        trainer = PPOTrainer(config, policy, reference, tokenizer, engine,
                             zero_scorer, sync_dir / name)  # type: ignore[arg-type]
        if name == "whole":
            trainer.trunk_depth = 0
        elif name == "before":
            for p in policy.lm.lm_head.parameters():
                p.requires_grad_(True)
            trainer.optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                                  lr=config.lr, eps=1e-5, weight_decay=0.0)
            trainer.trunk_depth = 0
        arms[name] = trainer
    return arms


def report(args: argparse.Namespace, times: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Median seconds per phase and arm, the ratios, and where and on what it ran."""

    def med(name: str, key: str) -> float:
        return statistics.median(t[key] for t in times[name])

    result: dict[str, Any] = {n: {k: round(med(n, k), 2) for k in KEYS} for n in times}
    work = {n: med(n, "scoring") + med(n, "training") for n in times}
    result["ratios"] = {"scoring+training, whole / shared": round(work["whole"] / work["shared"], 2),
                        "scoring+training, before / shared": round(work["before"] / work["shared"], 2),
                        "iteration, before / shared":
                            round(med("before", "total") / med("shared", "total"), 2)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {"at": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit, "model": str(args.model),
            "batch": args.batch, "response_length": args.response_length, "train_layers": args.train_layers,
            "rounds": args.rounds, "threads": args.threads,
            "machine": platform.processor() or platform.machine(), "seconds_median": result}


def main() -> None:
    from rich.console import Console
    from rich.progress import track

    from kaizen.core.settings import get_settings
    from trainer.ppo_config import PPOConfig
    from trainer.rollout_engine import RolloutEngine, sync_folder
    from simulation.simulate import DEFAULT_PROMPTS, read_prompts

    settings = get_settings()
    args = parse_args(settings)
    console = Console()
    config = PPOConfig.from_settings(settings, batch_size=args.batch, response_length=args.response_length,
                                     train_layers=args.train_layers, threads=args.threads)
    prompts = [[{"role": "user", "content": p}] for p in read_prompts(DEFAULT_PROMPTS)]
    engine = RolloutEngine(settings, args.model, max_model_len=1024, seed=0)
    with sync_folder(config.sync_dir) as sync_dir:
        arms = make_arms(args, config, engine, sync_dir)
        times: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
        console.print({n: {"trunk_depth": t.trunk_depth,
                           "trained_params": sum(p.numel() for p in t.policy.parameters() if p.requires_grad)}
                       for n, t in arms.items()})
        for r in track(range(args.rounds), description="rounds (one iteration per arm)"):
            batch = prompts[r * args.batch % len(prompts):][: args.batch] or prompts[: args.batch]
            for name, trainer in arms.items():
                engine.load_weights(args.model)  # every arm samples from the same weights
                times[name].append(trainer.step(batch).seconds)
    engine.shutdown()
    out_report = report(args, times)
    console.print_json(json.dumps(out_report))
    out = args.out or ROOT / "bench" / "results" / f"ppo-trunk-{datetime.now(UTC):%Y%m%dT%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(out_report, indent=2) + "\n")
    console.print(f"report: {out}")


if __name__ == "__main__":
    main()
