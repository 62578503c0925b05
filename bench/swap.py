"""A champion swap under steady streaming load, on the default model.

    python bench/swap.py --clients 8 --swaps 3

Starts `kaizen serve` on the prepared SmolLM2-135M-Instruct (the engine dtype's setting resolved
for this machine, printed with the result; eager;
`auto_rollout` off), publishes copies of it as new versions (weights nudged
by tiny noise, so each is a real, distinct set of files), keeps `--clients`
streaming greedy requests running, and promotes each version *behind the
API's back* (registry change + `promoted` model event, as the trainer or
another replica would), so the measured path is event → verify → drain →
reload → resume. Reports:

* the longest gap between two tokens of any stream, during the swaps and in
  a quiet stretch before them (same run, same load: the ratio is what counts),
* the time from the registry change to the first answer labelled with the
  new version (goal ≤ 5 s),
* failed requests (goal 0), and the swap's own phases from the server log.

A report, not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import free_port, percentile, provenance, start, stop, wait_ready  # noqa: E402
from kaizen.core import model_events
from kaizen.core.engine_config import serving_dtype  # noqa: E402
from kaizen.core.registry import Registry  # noqa: E402
from kaizen.core.settings import Settings, get_settings  # noqa: E402

PROMPT = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper."}]


def nudged_copy(src: Path, out: Path, seed: int) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    for f in out.glob("*.safetensors"):
        weights = load_file(str(f))
        gen = torch.Generator().manual_seed(seed)
        for k, w in weights.items():
            if k.endswith("norm.weight"):
                weights[k] = (w.float() * (1 + 1e-3 * torch.randn(w.shape, generator=gen))).to(w.dtype)
        save_file(weights, str(f), metadata={"format": "pt"})
    return out


class Streams:
    """`clients` threads streaming greedy answers; records inter-token gaps with timestamps."""

    def __init__(self, base: str, clients: int, max_tokens: int) -> None:
        self.base, self.max_tokens = base, max_tokens
        self.gaps: list[tuple[float, float]] = []  # (time of the later token, gap s)
        self.first_by_version: dict[str, float] = {}
        self.ttfts: list[tuple[float, float]] = []  # (time of the first token, TTFT s)
        self.failures: list[str] = []
        self.answers = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        body = {"messages": PROMPT, "max_tokens": self.max_tokens, "temperature": 0, "stream": True}
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                try:
                    sent = time.monotonic()
                    with client.stream("POST", f"{self.base}/v1/chat/completions", json=body) as r:
                        if r.status_code != 200:
                            self.failures.append(f"{r.status_code}: {r.read()[:200]!r}")
                            continue
                        version = r.headers["x-kaizen-model-version"]
                        last = None
                        for line in r.iter_lines():
                            if not line.startswith("data: {"):
                                continue
                            chunk = json.loads(line[6:])
                            if not any(c["delta"].get("content") for c in chunk["choices"]):
                                continue
                            now = time.monotonic()
                            self.first_by_version.setdefault(version, now)
                            if last is not None:
                                self.gaps.append((now, now - last))
                            else:
                                self.ttfts.append((now, now - sent))
                            last = now
                        self.answers += 1
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    self.failures.append(repr(exc))

    def max_gap(self, since: float, until: float) -> float:
        return max((g for t, g in self.gaps if since <= t <= until), default=float("nan"))

    def max_ttft(self, since: float, until: float) -> float:
        return max((g for t, g in self.ttfts if since <= t <= until), default=float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--swaps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--quiet-s", type=float, default=20.0, help="baseline stretch before the swaps")
    ap.add_argument("--between-s", type=float, default=15.0, help="time between swaps")
    args = ap.parse_args()

    base_settings = get_settings()
    model = base_settings.model_dir
    if not (model / "config.json").exists():
        sys.exit(f"no model at {model}: run `kaizen model prepare` first")
    with tempfile.TemporaryDirectory(prefix="kaizen-swap-") as tmp:
        tmpdir = Path(tmp)
        settings = Settings.model_validate({
            **base_settings.model_dump(), "data_dir": tmpdir / "data", "port": free_port(), "model": model,
            "auto_rollout": False, "registry_poll_interval_s": 5.0, "kafka_bootstrap": None,
            "broker_port": free_port(), "topic_model_events": "kaizen.model-events.bench"})
        settings.data_dir.mkdir(parents=True)
        from kaizen.core.broker import ensure_topics, start_embedded_broker

        broker = start_embedded_broker(settings)
        ensure_topics(settings)
        log = settings.data_dir / "serve.log"
        server = start([sys.executable, "-m", "kaizen", "serve"], settings.child_env(), log)
        base = f"http://127.0.0.1:{settings.port}"
        try:
            wait_ready(f"{base}/readyz", server)
            registry = Registry(settings.registry_path)
            versions = publish_versions(registry, model, tmpdir, args.swaps)
            streams = Streams(base, args.clients, args.max_tokens)
            for t in streams.threads:
                t.start()
            time.sleep(args.quiet_s)
            quiet = streams.max_gap(time.monotonic() - args.quiet_s / 2, time.monotonic())
            quiet_ttft = streams.max_ttft(time.monotonic() - args.quiet_s / 2, time.monotonic())
            to_first, swap_gaps, swap_ttfts = swap_through(settings, registry, streams, versions,
                                                           args.between_s)
            streams.stop.set()
            for t in streams.threads:
                t.join(timeout=120)
        finally:
            stop(server)
            broker.terminate()
            broker.wait(10)
        swaps = [line for line in log.read_text().splitlines() if "now serving" in line]

    report(args, streams, quiet, quiet_ttft, to_first, swap_gaps, swap_ttfts, swaps, serving_dtype(settings))


def publish_versions(registry: Registry, model: Path, tmpdir: Path, n: int) -> list[str]:
    """v1..vn: nudged copies of the model, each published on the previous one."""
    with Progress(transient=True) as progress:
        task = progress.add_task("preparing versions", total=n)
        versions = []
        for i in range(n):
            folder = nudged_copy(model, tmpdir / f"v{i + 1}", seed=i + 1)
            versions.append(registry.publish(folder, parent=f"v{i}", who="bench").version)
            progress.advance(task)
    return versions


def swap_through(settings: Settings, registry: Registry, streams: Streams, versions: list[str],
                 between_s: float) -> tuple[list[float], list[float], list[float]]:
    """Promote each version in turn under the streams' load: per swap, the seconds from the
    registry change to the first answer from the new version, the longest inter-token gap and the
    longest time to first token in the `between_s` after it."""
    to_first: list[float] = []
    swap_gaps: list[float] = []
    swap_ttfts: list[float] = []
    with Progress() as progress:
        task = progress.add_task("swaps", total=len(versions))
        for v in versions:
            t0 = time.monotonic()
            registry.promote(v, who="bench", why="swap benchmark")
            model_events.emit(settings, "promoted", v, who="bench")
            while v not in streams.first_by_version and time.monotonic() - t0 < 120:
                time.sleep(0.01)
            to_first.append(streams.first_by_version.get(v, float("nan")) - t0)
            time.sleep(between_s)
            swap_gaps.append(streams.max_gap(t0, time.monotonic()))
            swap_ttfts.append(streams.max_ttft(t0, time.monotonic()))
            progress.advance(task)
    return to_first, swap_gaps, swap_ttfts


def report(args: argparse.Namespace, streams: Streams, quiet: float, quiet_ttft: float, to_first: list[float],
           swap_gaps: list[float], swap_ttfts: list[float], swaps: list[str], dtype: str) -> None:
    """The result lines (what bench/README.md records)."""
    print(f"\nswap under load: {args.clients} streaming clients, {args.max_tokens} tokens, greedy, "
          f"SmolLM2-135M-Instruct {dtype} on vLLM CPU")
    print(f"answers {streams.answers}, failed requests {len(streams.failures)}")
    print(f"longest inter-token gap: quiet {quiet:.3f} s; during swaps max {max(swap_gaps):.3f} s "
          f"(each: {', '.join(f'{g:.3f}' for g in swap_gaps)}); ratio {max(swap_gaps) / quiet:.2f}")
    print(f"longest time to first token (requests held while the weights load): quiet {quiet_ttft:.3f} s; "
          f"during swaps max {max(swap_ttfts):.3f} s")
    print(f"registry change → first answer from the new version: p50 {percentile(to_first, 50):.2f} s, "
          f"max {max(to_first):.2f} s")
    for line in swaps:
        print("server:", line.split(": ", 1)[-1])
    for f in streams.failures[:5]:
        print("failure:", f)
    print(provenance())


if __name__ == "__main__":
    main()
