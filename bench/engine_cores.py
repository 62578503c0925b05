"""How the engine's CPU settings serve one engine alone and two engines sharing the machine.

    python bench/engine_cores.py                # the three arms below, 3 rounds each
    python bench/engine_cores.py --rounds 2 --answers 32 --max-tokens 64

vLLM's CPU backend keeps one core for its scheduler by default (VLLM_CPU_NUM_OF_RESERVED_CPU=1),
which on two cores leaves the model one. Kaizen's `engine_reserved_cpus=auto` gives it both on
small machines, and `engine_omp_spincount` shortens how long libgomp's threads spin at a barrier
(GOMP_SPINCOUNT). Whether that helps depends on who else runs: one engine with an idle one beside
it (a canary nobody asks, the trainer's rollout engine between rounds) or two generating at once
(a busy canary, rollouts while users chat). Each arm runs both scenarios with offline vLLM engines
(`vllm.LLM`, the default model, bf16 where `auto` says so, eager), in separate processes started
with the arm's environment; an engine's figure is the best of `--rounds` batches of `--answers`
sampled answers of exactly `--max-tokens` tokens. Arms:

- `vllm`: vLLM's defaults (1 reserved core, libgomp's spin);
- `reserve0`: no reserved core, libgomp's spin;
- `kaizen`: what Kaizen's settings resolve to (no reserved core on <= 4 cores, spincount 5,000).

A report, not a test: ratios against `vllm` within one run are the figures to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import provenance  # noqa: E402
from kaizen.core.engine_config import serving_dtype, vllm_env  # noqa: E402
from kaizen.core.settings import Settings  # noqa: E402

SCENARIOS = {"alone": (True, False), "shared": (True, True)}
"""scenario → (first engine generates, second engine generates); the other one idles, loaded."""


def arms(s: Settings) -> dict[str, dict[str, str]]:
    """arm → the environment vLLM's processes get (kaizen/core/engine_config.py `vllm_env`); every arm
    keeps Kaizen's sleep instead of vLLM's sched_yield spin (kaizen/core/vllm_plugin.py)."""
    plain = s.model_copy(update={"engine_reserved_cpus": None, "engine_omp_spincount": None})
    reserve0 = plain.model_copy(update={"engine_reserved_cpus": 0})
    return {"vllm": vllm_env(plain), "reserve0": vllm_env(reserve0), "kaizen": vllm_env(s)}


def worker(args: argparse.Namespace) -> None:
    """One engine: load, say ready, wait for `go` (or idle until `stop`), then generate and report."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, max_model_len=2048, max_num_seqs=32,
              seed=0)
    sync = Path(args.sync)
    (sync / f"ready-{args.name}").touch()
    while not (sync / "go").exists():
        time.sleep(0.05)
    if not args.generate:
        while not (sync / "stop").exists():
            time.sleep(0.2)
        return
    prompts: list[Any] = [[{"role": "user", "content": f"Tell me something about the number {i}."}]
               for i in range(args.answers)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.8, seed=1, ignore_eos=True)
    best = 0.0
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        outs = llm.chat(prompts, params, use_tqdm=False)
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        best = max(best, n / (time.perf_counter() - t0))
    france: list[Any] = [[{"role": "user", "content": "What is the capital of France?"}]]
    greedy = llm.chat(france,
                      SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
    (sync / f"result-{args.name}.json").write_text(json.dumps(
        {"tokens_per_s": best, "greedy": greedy[0].outputs[0].text}))


def run_scenario(args: argparse.Namespace, env: dict[str, str], generate: tuple[bool, bool],
                 log_dir: Path, label: str) -> list[dict[str, float | str]]:
    """Two engine processes with `env`; returns the results of those that generated."""
    sync = Path(tempfile.mkdtemp(prefix="engine-cores-"))
    procs = []
    for i, gen in enumerate(generate):
        argv = [sys.executable, __file__, "--worker", "--name", str(i), "--sync", str(sync),
                "--model", args.model, "--dtype", args.dtype, "--rounds", str(args.rounds),
                "--answers", str(args.answers), "--max-tokens", str(args.max_tokens)]
        argv += ["--generate"] if gen else []
        with open(log_dir / f"{label}-{i}.log", "wb") as log:
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        while not all((sync / f"ready-{i}").exists() for i in range(len(procs))):
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"an engine of {label} exited; see {log_dir}")
            time.sleep(0.2)
        (sync / "go").touch()
        for i, gen in enumerate(generate):
            if gen and procs[i].wait(timeout=1800) != 0:
                raise RuntimeError(f"engine {i} of {label} failed; see {log_dir}")
        (sync / "stop").touch()
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [json.loads((sync / f"result-{i}.json").read_text()) for i, gen in enumerate(generate) if gen]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--answers", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default=None, help="model folder (default: the prepared one)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--name", default="0", help=argparse.SUPPRESS)
    ap.add_argument("--sync", default="", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    s = Settings()
    args.model = str(Path(args.model or s.model_dir).resolve())
    args.dtype = serving_dtype(s)
    ours = set(vllm_env(s)) | {"VLLM_CPU_NUM_OF_RESERVED_CPU", "GOMP_SPINCOUNT"}
    base = {k: v for k, v in os.environ.items() if k not in ours}
    log_dir = Path(tempfile.mkdtemp(prefix="kaizen-bench-cores-"))
    results: dict[str, dict[str, list[dict[str, float | str]]]] = {}
    with Progress() as progress:
        task = progress.add_task("arms x scenarios", total=len(arms(s)) * len(SCENARIOS))
        for arm, extra in arms(s).items():
            for scenario, generate in SCENARIOS.items():
                results.setdefault(arm, {})[scenario] = run_scenario(
                    args, {**base, **extra}, generate, log_dir, f"{arm}-{scenario}")
                progress.advance(task)
    report(args, s, results)


def report(args: argparse.Namespace, s: Settings, results: dict[str, dict[str, list[dict[str, float | str]]]]
           ) -> None:
    print(f"\nengine cores: {Path(args.model).name} {args.dtype}, {args.answers} answers x {args.max_tokens} "
          f"tokens, best of {args.rounds} ({provenance()}); arms: {json.dumps(arms(s))}")
    total = {arm: {sc: sum(float(r["tokens_per_s"]) for r in rs) for sc, rs in by.items()}
             for arm, by in results.items()}
    for arm, by in total.items():
        cells = "   ".join(f"{sc} {tps:6.1f} tok/s ({tps / total['vllm'][sc]:.2f}x)"
                           for sc, tps in by.items())
        greedy = {str(r["greedy"]) for rs in results[arm].values() for r in rs}
        print(f"  {arm:9s} {cells}   greedy: {' | '.join(sorted(greedy))!r}")
    out = Path(__file__).parent / "results" / f"engine-cores-{time.strftime('%Y%m%dT%H%M')}.json"
    out.write_text(json.dumps({"provenance": provenance(), "args": vars(args), "arms": arms(s),
                               "results": results, "tokens_per_s": total}, indent=2))
    print(f"  report: {out}")


if __name__ == "__main__":
    main()
