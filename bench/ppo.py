"""PPO iteration speed: Kaizen (rollouts on vLLM, shared-trunk value head) vs TRL's PPO trainer.

    pip install -e '.[bench]'                  # TRL 1.12.0, the last release with a PPO trainer
    python bench/ppo.py                        # SmolLM2-135M-Instruct, 16 prompts x 64 tokens,
                                               # 2 iterations each
    python bench/ppo.py --model /tmp/tiny --iterations 1 --skip-trl   # a quick smoke run
    python bench/ppo.py --train-layers 8      # Kaizen as shipped (frozen trunk) against TRL

Same model, prompts (user turns of ../shared/data/hh_harmless_test.jsonl), batch, answer length,
epochs and hyperparameters on both sides; the reward model is the policy with a fresh scalar head
(its values do not matter for speed). Kaizen's config is the settings' (`PPOConfig.from_settings`)
with this benchmark's options over them. Both train every layer in float32 with the same number of
torch threads. Kaizen's time is split into rollout (vLLM), scoring (RM + log-probs of policy and
reference), training and weight sync (save to /dev/shm + reload_weights); TRL's into rollout
(its `batch_generation`, HF generate) and everything else. vLLM's engine start (~25 s, once per
round) is reported apart and included in a second ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.reward import commit, hardware  # noqa: E402
from kaizen.core.settings import get_settings  # noqa: E402


def load_prompts(path: Path, n: int) -> list[list[dict[str, str]]]:
    from trainer.reward_data import read_pairs_file

    seen, out = set(), []
    for p in read_pairs_file(path):
        key = json.dumps(p.prompt)
        if key not in seen:
            seen.add(key)
            out.append(p.prompt)
        if len(out) == n:
            break
    return out


def make_reward_model(model_dir: Path, out: Path) -> Path:
    from trainer.reward_model import load_reward_model, save_model

    rm, tok = load_reward_model(model_dir)
    return save_model(rm, tok, out, {"reward_norm": {"mean": 0.0, "std": 1.0}})


def run_kaizen(args: argparse.Namespace, prompts: list[Any], rm_dir: Path) -> dict[str, Any]:
    from trainer.policy import RewardScorer, load_policy
    from trainer.ppo import PPOTrainer
    from trainer.ppo_config import PPOConfig
    from trainer.rollout_engine import RolloutEngine, sync_folder

    settings = get_settings()
    t0 = time.monotonic()
    engine = RolloutEngine(settings, args.model, max_model_len=1024, seed=0)
    start_s = time.monotonic() - t0
    config = PPOConfig.from_settings(settings, iterations=args.iterations, batch_size=args.batch,
                                     response_length=args.response_length,
                                     max_prompt_length=args.max_prompt_length, epochs=args.epochs, lr=3e-6,
                                     train_layers=args.train_layers, threads=args.threads, adaptive_kl=False,
                                     dtype=args.ppo_dtype)
    policy, tok, _ = load_policy(args.model)
    reference, _, _ = load_policy(args.model)
    scorer = RewardScorer.load(rm_dir, 1024, args.reward_dtype)
    iterations = []
    try:
        with sync_folder(config.sync_dir) as folder:
            trainer = PPOTrainer(config, policy, reference, tok, engine, scorer, folder)
            for i in range(args.iterations):
                st = trainer.step(prompts[(i * args.batch) % len(prompts):][: args.batch])
                iterations.append(st.as_dict())
                print(f"kaizen iteration {i + 1}: {st.samples_per_s:.3f} samples/s, "
                      + ", ".join(f"{k} {v:.2f} s" for k, v in st.seconds.items()), flush=True)
    finally:
        engine.shutdown()
    total = sum(it["seconds"]["total"] for it in iterations)
    split = {k: sum(it["seconds"][k] for it in iterations) for k in iterations[0]["seconds"]}
    return {"samples_per_s": args.batch * len(iterations) / total, "seconds": split,
            "engine_start_s": start_s, "reward_dtype": scorer.dtype,
            "ppo_dtype": str(trainer.compute_dtype).removeprefix("torch."),
            "samples_per_s_with_start": args.batch * len(iterations) / (total + start_s),
            "answer_tokens": sum(it["answer_tokens"] for it in iterations) / len(iterations),
            "iterations": iterations}


def run_trl(args: argparse.Namespace, prompts: list[Any], rm_dir: Path) -> dict[str, Any]:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    from trainer.policy import encode_prompt

    tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    ids = [encode_prompt(tok, m, args.max_prompt_length) for m in prompts]
    episodes = args.batch * args.iterations
    data = Dataset.from_dict({"input_ids": [ids[i % len(ids)] for i in range(episodes)]})
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, dtype=torch.float32)
    for m in (policy, ref, value, reward):
        m.config.pad_token_id = tok.pad_token_id
    out = Path(tempfile.mkdtemp(prefix="trl-ppo-"))
    config = PPOConfig(output_dir=str(out), per_device_train_batch_size=args.batch,
                       gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=args.epochs,
                       response_length=args.response_length, local_rollout_forward_batch_size=args.batch,
                       total_episodes=episodes, learning_rate=3e-6,
                       kl_coef=0.05, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95,
                       temperature=1.0, stop_token="eos", missing_eos_penalty=1.0, num_sample_generations=0,
                       use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1,
                       dataloader_num_workers=0, seed=0)
    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=data, value_model=value)
    # instrumentation only: time TRL's own generation function where the trainer calls it
    spent = {"rollout": 0.0}
    original = trl_ppo.batch_generation

    def timed(*a: Any, **kw: Any) -> Any:
        t = time.monotonic()
        try:
            return original(*a, **kw)
        finally:
            spent["rollout"] += time.monotonic() - t

    trl_ppo.batch_generation = timed
    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    trainer.train()
    total = time.monotonic() - t0
    trl_ppo.batch_generation = original
    return {"version": trl.__version__, "samples_per_s": episodes / total,
            "seconds": {"rollout": spent["rollout"], "scoring + training": total - spent["rollout"],
                        "total": total}}


def main() -> None:
    settings = get_settings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=settings.model_dir)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hh_harmless_test.jsonl")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--response-length", type=int, default=64)
    ap.add_argument("--max-prompt-length", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-layers", type=int, default=0,
                    help="Kaizen's trained top layers (0: all, like TRL; the setting's default 8 runs the "
                         "frozen trunk once per batch); TRL always trains all")
    ap.add_argument("--reward-dtype", default=settings.reward_dtype,
                    help="Kaizen's scoring autocast: auto (as shipped: the reward model's dtype for this "
                         "hardware) | bfloat16 | float32; TRL scores in the model's float32")
    ap.add_argument("--ppo-dtype", default=settings.ppo_dtype,
                    help="Kaizen's policy and reference autocast: auto (as shipped) | bfloat16 | float32; "
                         "TRL trains in the model's float32")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompts = load_prompts(args.data, args.batch * args.iterations)
    rm_dir = make_reward_model(args.model, Path(tempfile.mkdtemp(prefix="bench-rm-")) / "rm")
    report: dict[str, Any] = {"command": " ".join(sys.argv), "commit": commit(), "hardware": hardware(),
                              "date": datetime.now(UTC).isoformat(timespec="seconds"), "args": {
                                  k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    report["kaizen"] = k = run_kaizen(args, prompts, rm_dir)
    print(f"kaizen (scoring in {k['reward_dtype']}, policy in {k['ppo_dtype']}): "
          f"{k['samples_per_s']:.3f} samples/s "
          f"({k['samples_per_s_with_start']:.3f} with the "
          f"{k['engine_start_s']:.0f} s engine start); split " +
          ", ".join(f"{n} {v:.1f} s" for n, v in k["seconds"].items()), flush=True)
    if not args.skip_trl:
        report["trl"] = t = run_trl(args, prompts, rm_dir)
        print(f"trl {t['version']}: {t['samples_per_s']:.3f} samples/s; split " +
              ", ".join(f"{n} {v:.1f} s" for n, v in t["seconds"].items()), flush=True)
        report["ratio"] = k["samples_per_s"] / t["samples_per_s"]
        report["ratio_with_engine_start"] = k["samples_per_s_with_start"] / t["samples_per_s"]
        print(f"kaizen / trl: {report['ratio']:.2f}x ({report['ratio_with_engine_start']:.2f}x counting "
              f"vLLM's start-up); {report['hardware']}; commit {report['commit']}", flush=True)
    out = args.out or ROOT / "bench" / "results" / f"ppo-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
