"""How long `/healthz` waits while one long answer is written, against the same probe idle.

    python bench/probe_stall.py --tokens 8000 --n 2
    python bench/probe_stall.py --model .kaizen/models/SmolLM2-135M-Instruct --context 4096 --tokens 1500

Starts a real embedded broker and `kaizen serve` (by default on a tiny random model with a
32,768-token context, which writes hundreds of tokens a second on two cores), then probes
`/healthz` every 0.1 s from a second thread: for `--idle-s` seconds with nothing running, then
during one whole (non-streamed) answer of `--tokens` x `--n`, then during the same answer
streamed. Each phase prints the probes' p50 and max; the ratios to the idle phase, measured in
the same run, are what to read. Found while #18's straddle test failed: a promote sent
mid-answer was handled only as the answer ended. A report, not a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import free_port, percentile, provenance, start, stop, wait_ready  # noqa: E402
from kaizen.core.broker import ensure_topics, start_embedded_broker  # noqa: E402
from kaizen.core.settings import Settings  # noqa: E402
from services.models import build_tiny  # noqa: E402

KEY = "bench-probe-stall-key-0123456789abcdef"
CONTEXT = 32768


class Prober:
    """Probes `/healthz` back to back (0.1 s apart) until stopped; the latencies."""

    def __init__(self, base: str) -> None:
        self.base, self.done = base, threading.Event()
        self.latencies: list[float] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.done.is_set():
            t0 = time.perf_counter()
            httpx.get(f"{self.base}/healthz", timeout=300)
            self.latencies.append(time.perf_counter() - t0)
            time.sleep(0.1)

    def __enter__(self) -> Prober:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.thread.join()


def answer(base: str, body: dict[str, object], stream: bool) -> str:
    """One long answer; what it was (tokens or stream lines)."""
    headers = {"Authorization": f"Bearer {KEY}"}
    if not stream:
        r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=600)
        return f"{r.json()['usage']['completion_tokens']} tokens"
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True},
                      headers=headers, timeout=600) as r:
        return f"{sum(1 for _ in r.iter_lines())} stream lines"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a prepared model folder (default: a tiny random model)")
    ap.add_argument("--context", type=int, default=CONTEXT, help="the engine's context (max_model_len)")
    ap.add_argument("--tokens", type=int, default=8000, help="max_tokens of the long answer")
    ap.add_argument("--n", type=int, default=2, help="choices of the long answer")
    ap.add_argument("--idle-s", type=float, default=5.0)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kaizen-bench-probe-stall-"))
    model = args.model or build_tiny(Settings(engine_max_model_len=args.context), tmp / "tiny-long")
    settings = Settings(data_dir=tmp / "data", model=model, port=free_port(), trainer_port=free_port(),
                        broker_port=free_port(), api_keys=KEY, engine_max_model_len=args.context,  # type: ignore[arg-type]
                        max_tokens_limit=args.context - 512, auto_rollout=False)
    broker = start_embedded_broker(settings)
    ensure_topics(settings)
    api = start([sys.executable, "-m", "kaizen", "serve"], settings.child_env(), tmp / "api.log")
    base = f"http://127.0.0.1:{settings.port}"
    body = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": args.tokens,
            "temperature": 1.0, "n": args.n}
    rows: list[tuple[str, list[float], float, str]] = []
    try:
        wait_ready(f"{base}/readyz", api)
        with Prober(base) as idle:
            time.sleep(args.idle_s)
        rows.append(("idle", idle.latencies, args.idle_s, ""))
        for stream in (False, True):
            with Prober(base) as during:
                t0 = time.perf_counter()
                what = answer(base, body, stream)
                wall = time.perf_counter() - t0
            rows.append(("during a streamed answer" if stream else "during a whole answer", during.latencies,
                         wall, what))
    finally:
        stop(api)
        broker.kill()
        broker.wait()
    print(f"\nprobe stall benchmark ({provenance()}; model {model})")
    idle_p50, idle_max = percentile(rows[0][1], 50), max(rows[0][1])
    for name, lat, wall, what in rows:
        print(f"  {name:26} {len(lat):4d} probes in {wall:6.1f} s {what:>18}: p50 {percentile(lat, 50) * 1000:8.1f} ms "
              f"({percentile(lat, 50) / idle_p50:7.1f}x idle), max {max(lat) * 1000:8.1f} ms "
              f"({max(lat) / idle_max:7.1f}x idle)")


if __name__ == "__main__":
    main()
