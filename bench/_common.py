"""Shared helpers of the benchmarks: start real processes, percentiles, the record line, the report file."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def provenance() -> str:
    """Where a report was made: commit, CPU, cores, python, date; for a bench that loaded torch, also
    the machine's float32 matmul speed (two 2-core EPYCs of one name differed 2-3x in it)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    speed = ""
    if "torch" in sys.modules:  # an HTTP bench does not load torch for this
        from kaizen.core.hardware import matmul_gflops

        speed = f", matmul {matmul_gflops() or 0:.0f} GFLOPS"
    return (f"commit {commit}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores{speed}, "
            f"python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}")


def save_report(folder: Path, name: str, report: dict[str, Any]) -> Path:
    """Write `report`, stamped with its provenance and time, to folder/name-<UTC time>.json; print the path."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    path = folder / f"{name}-{now:%Y%m%dT%H%M%S}.json"
    stamped = report | {"provenance": provenance(), "date": now.isoformat(timespec="seconds")}
    path.write_text(json.dumps(stamped, indent=2, default=str) + "\n")
    print(f"report: {path}")
    return path


def judged_cells(row: dict[str, Any], lc_interval: bool = False) -> list[str]:
    """A judged row's "judge: win [lo, hi] LC x" cells, one per judge it holds (the loop's evaluation
    shape: simulation/evaluate.py judge_pairs)."""
    cells = []
    for key in ("judge", "second_judge"):
        if key in row:
            r = row[key]
            lc = f"LC {r['lc_win_rate_vs_v0']:.3f}"
            if lc_interval:
                lc += f" [{r['lc_ci95'][0]:.3f}, {r['lc_ci95'][1]:.3f}]"
            cells.append(f"{key}: {r['win_rate_vs_v0']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] {lc}")
    return cells
