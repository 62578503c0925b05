"""Reward-model training on one process or several: pairs/s, side by side in one run.

    python bench/distributed.py                                  # default model, 64 human pairs
    python bench/distributed.py --model /tmp/tiny --pairs 256     # any Hugging Face folder

Arms (same pairs, same global batch of batch_size x grad_accum pairs, same seed, same steps):
  A. 1 process x T threads      (what `kaizen reward train` does without torchrun)
  B. N processes x T/N threads  (torchrun --standalone, gloo, DistributedDataParallel)
The arms run one after the other, each in fresh processes; model loading and process start
are reported apart from training. The config is the settings' (`RewardConfig.from_settings`) with
the arm's options over them. Prints pairs/s per arm and the ratio B / A; appends one JSON line to
bench/results/distributed.jsonl. A report, never a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import provenance  # noqa: E402
from kaizen.core.hardware import cpu_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "hh_harmless_train.jsonl"


def worker(args: argparse.Namespace) -> None:
    """One arm's training job (a torchrun worker, or the one process)."""
    import torch

    from kaizen.core.settings import Settings
    from trainer import distributed
    from trainer.reward_data import read_pairs_file
    from trainer.reward_model import RewardConfig, load_reward_model
    from trainer.reward_train import train_reward_model

    started = time.monotonic()
    settings = Settings()
    dist = distributed.init(settings)
    try:
        torch.set_num_threads(args.threads)
        pairs = read_pairs_file(Path(args.data))[: args.pairs]
        model, tok = load_reward_model(Path(args.model), seed=0)
        loaded = time.monotonic() - started
        config = RewardConfig.from_settings(settings, max_length=args.max_length, batch_size=args.batch_size,
                                            grad_accum=args.grad_accum, epochs=1,
                                            train_layers=args.train_layers, dtype=args.dtype,
                                            threads=args.threads, eval_every=10_000, seed=0, lr=5e-5)
        result = train_reward_model(model, tok, pairs, [], config, progress=False, dist=dist)
        if dist.is_main:
            Path(args.out).write_text(json.dumps({
                "pairs_per_s": result.pairs_per_s, "seconds": result.seconds, "steps": result.steps,
                "pairs": result.pairs_seen, "load_s": loaded, "final_loss": result.losses[-1],
                "capability": torch.backends.cpu.get_cpu_capability()}))
    finally:
        distributed.shutdown()


def arm(args: argparse.Namespace, processes: int, out: Path) -> dict[str, object]:
    threads = max(1, args.threads // processes)
    job = [str(Path(__file__).resolve()), "--worker", "--out", str(out), "--threads", str(threads),
           "--model", str(args.model), "--data", str(args.data), "--pairs", str(args.pairs),
           "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
           "--max-length", str(args.max_length), "--train-layers", str(args.train_layers),
           "--dtype", args.dtype]
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
        "--max-restarts=0"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    proc = subprocess.run([*launcher, *job], env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"arm with {processes} process(es) failed:\n{proc.stderr[-4000:]}")
    record: dict[str, object] = json.loads(out.read_text())
    record.update(processes=processes, threads_each=threads, wall_s=time.monotonic() - started)
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, default=None, help="model folder [the prepared default model]")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads in all, per arm")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--train-layers", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.model is None:
        from kaizen.core.settings import get_settings

        args.model = get_settings().model_dir
    if args.grad_accum % args.processes:
        raise SystemExit("--grad-accum must be a multiple of --processes "
                         "(each rank takes whole micro-batches)")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    one = arm(args, 1, results / f".distributed-{stamp}-1.json")
    many = arm(args, args.processes, results / f".distributed-{stamp}-{args.processes}.json")
    ratio = float(many["pairs_per_s"]) / float(one["pairs_per_s"])  # type: ignore[arg-type]
    for r in (one, many):
        print(f"{r['processes']} process(es) x {r['threads_each']} thread(s): {r['pairs_per_s']:.3f} pairs/s "
              f"({r['pairs']} pairs, {r['steps']} steps in {r['seconds']:.1f} s; load {r['load_s']:.1f} s, "
              f"wall {r['wall_s']:.1f} s, final loss {r['final_loss']:.4f})")
    print(f"ratio {args.processes} processes / 1 process: {ratio:.2f}x")
    print(f"{cpu_model()}, torch capability {one['capability']}, {provenance()}")
    with (results / "distributed.jsonl").open("a") as f:
        f.write(json.dumps({"when": stamp, "model": str(args.model), "pairs": args.pairs, "dtype": args.dtype,
                            "max_length": args.max_length, "train_layers": args.train_layers,
                            "global_batch": args.batch_size * args.grad_accum, "one": one, "many": many,
                            "ratio": ratio, "cpu": cpu_model(), "provenance": provenance()}) + "\n")
    for r in (one, many):
        Path(results / f".distributed-{stamp}-{r['processes']}.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
