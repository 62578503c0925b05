"""Probes that see the engine, restarts of a dead engine, bounded swaps (#19 items 10, 11, 12).

One `kaizen serve` of its own on the tiny model (never the session's shared server: these
tests stop, kill and hang its engine). The faults are real: the EngineCore child process is
found with psutil and stopped (SIGSTOP: a wedged engine) or killed (SIGKILL: a crash, an
OOM kill); a weight reload hangs for real on a named pipe that vLLM opens as a
`.safetensors` file and that nobody ever writes (open() blocks, as on a dead network disk).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from kaizen.core.registry import Registry
from kaizen.core.settings import Settings
from tests.conftest import ADMIN_TOKEN, ROOT, USER_KEY, make_settings, stop_group, wait_http

USER = {"Authorization": f"Bearer {USER_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PROMPT = [{"role": "user", "content": "Name three colours."}]
ATTEMPTS = 5  # swaps the straddle test tries before it concludes no answer was ever in flight at one
RETRY_AFTER = 7  # engine_retry_after_s of this server: a value no other path answers with


CONTEXT = 32768
"""This module's tiny model's context: the tests need answers that are still being written
seconds after they began, and the session's tiny model (2,048 positions) writes a whole
answer in well under a second on an idle machine."""
LONG = 30000  # max_tokens of a long answer


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.models import build_tiny

    return build_tiny(Settings(engine_max_model_len=CONTEXT), tmp_path_factory.mktemp("models") / "tiny-long")


@pytest.fixture(scope="module")
def server(long_model: Path, broker: Settings, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[tuple[str, Settings, subprocess.Popen[bytes]]]:
    settings = make_settings(
        tmp_path_factory.mktemp("engine-health"), model=long_model, broker_port=broker.broker_port,
        api_keys=USER_KEY, admin_token=ADMIN_TOKEN, rate_limit_rps=1000, rate_limit_burst=1000,
        auto_rollout=False, registry_poll_interval_s=0.5, engine_max_model_len=CONTEXT,
        max_tokens_limit=LONG,
        engine_watchdog_interval_s=0.5, engine_heartbeat_timeout_s=2, engine_stall_timeout_s=8,
        engine_admit_timeout_s=3, engine_max_waiting=2, engine_retry_after_s=RETRY_AFTER,
        swap_reload_timeout_s=5, swap_drain_timeout_s=0)
    log_path = settings.data_dir / "serve.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "kaizen", "serve"], env=settings.child_env(), cwd=ROOT,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{settings.port}"
    try:
        wait_http(f"{base}/readyz", 360, proc)
    except Exception:
        stop_group(proc)
        print(log_path.read_text()[-5000:])
        raise
    yield base, settings, proc
    stop_group(proc)


def engine_core(proc: subprocess.Popen[bytes]) -> psutil.Process:
    """The champion's EngineCore: the API process's one `VLLM::EngineCore` child."""
    cores = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "EngineCore" in p.name() and p.status() != psutil.STATUS_ZOMBIE]
    assert len(cores) == 1, cores
    return cores[0]


def poll(what: str, check: Callable[[], Any], timeout_s: float = 300) -> Any:
    """Call `check` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def probe(base: str, path: str) -> httpx.Response:
    return httpx.get(f"{base}{path}", timeout=10)


def until(base: str, path: str, status: int, timeout_s: float = 300) -> httpx.Response:
    """Poll a probe until it answers `status`; that answer."""
    def answer() -> httpx.Response | None:
        r = probe(base, path)
        return r if r.status_code == status else None
    return poll(f"{path} {status}", answer, timeout_s)


def metric(base: str, name: str, **labels: str) -> float:
    """One sample from /metrics (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(f"{base}/metrics/", timeout=10).text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) == want:
            return float(m.group(3))
    return 0.0


def chat(base: str, timeout_s: float = 120, **body: Any) -> httpx.Response:
    payload = {"messages": PROMPT, "max_tokens": 8, "temperature": 0, **body}
    return httpx.post(f"{base}/v1/chat/completions", json=payload, headers=USER, timeout=timeout_s)


def other_weights(base: Path, out: Path, spread: float = 1.0) -> Path:
    """A copy of `base` with every weight scaled by 1 + U[0, spread): half of it loaded would change
    the answers."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out)
    weights = load_file(str(out / "model.safetensors"))
    gen = torch.Generator().manual_seed(19)
    scaled = {k: (w.float() * (1 + spread * torch.rand(w.shape, generator=gen))).to(w.dtype)
              for k, w in weights.items()}
    save_file(scaled, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def assert_unavailable(r: httpx.Response, code: str) -> None:
    """An OpenAI-shaped 503 with Retry-After."""
    assert r.status_code == 503, (r.status_code, r.text)
    error = r.json()["error"]
    assert error["code"] == code and error["type"] == "service_unavailable" and error["message"], error
    assert r.headers["retry-after"] == str(RETRY_AFTER), r.headers


def test_probes_name_no_version_and_follow_the_engine(
        server: tuple[str, Settings, subprocess.Popen[bytes]]) -> None:
    """#19 item 10 (and item 2's probe part): unauthenticated probes say ready/ok and nothing more:
    no champion or canary version (the admin routes have them)."""
    base, _, _ = server
    ready = until(base, "/readyz", 200)
    assert ready.json() == {"status": "ready"}
    assert "v0" not in ready.text
    assert probe(base, "/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base}/admin/rollout", headers=ADMIN).json()["serving"]["champion"] == "v0"


def engine_config(base: str) -> dict[str, dict[str, str]]:
    """kaizen_engine_config_info's labels by model_version."""
    found = {}
    for line in httpx.get(f"{base}/metrics/", timeout=10).text.splitlines():
        if line.startswith("kaizen_engine_config_info{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            found[labels.pop("model_version")] = labels
    return found


def test_the_engine_reports_the_configuration_it_runs(
        server: tuple[str, Settings, subprocess.Popen[bytes]]) -> None:
    """#18: the engine configuration Kaizen chose is what the running vLLM engine holds, read back
    from the engine (its vllm_config), not from the settings: the resolved dtype (never vLLM's
    own `auto`), the context and batch limits, no chunked prefill on the CPU backend
    (tests/test_engine_seeds.py says why)."""
    from kaizen.core.engine_config import reserved_cpus, serving_dtype

    base, settings, proc = server
    until(base, "/readyz", 200)
    running = engine_config(base)
    reserved = reserved_cpus(settings)
    assert set(running) == {"v0"}, running
    assert running["v0"] == {
        "dtype": serving_dtype(settings), "max_model_len": str(settings.engine_max_model_len),
        "max_num_seqs": str(settings.engine_max_num_seqs),
        "max_num_batched_tokens": str(max(settings.engine_max_model_len, settings.engine_max_num_batched_tokens)),
        "chunked_prefill": "false", "seed": str(settings.engine_seed),
        "reserved_cpus": "vllm default" if reserved is None else str(reserved),
        "omp_spincount": str(settings.engine_omp_spincount),
    }, running
    # and the engine's own processes (EngineCore, its worker) started with them
    engine_env = [p.environ() for p in psutil.Process(proc.pid).children(recursive=True)
                  if "VLLM_CPU_KVCACHE_SPACE" in p.environ()]
    assert engine_env, "no vLLM process under the server"
    for env in engine_env:
        assert env.get("GOMP_SPINCOUNT") == str(settings.engine_omp_spincount)
        assert env.get("VLLM_CPU_NUM_OF_RESERVED_CPU") == (None if reserved is None else str(reserved))


def test_a_wedged_engine_fails_readiness_then_liveness_and_recovers(
        server: tuple[str, Settings, subprocess.Popen[bytes]]) -> None:
    """#19 item 10: an EngineCore that stops answering (SIGSTOP: alive, wedged) makes /readyz 503
    after engine_heartbeat_timeout_s and /healthz 503 after engine_stall_timeout_s, so the
    orchestrator restarts the process; once it answers again (SIGCONT) both are 200."""
    base, _, proc = server
    until(base, "/readyz", 200)
    core = engine_core(proc)
    core.send_signal(signal.SIGSTOP)
    try:
        unready = until(base, "/readyz", 503, 60)
        assert unready.json()["error"]["code"] == "engine_unresponsive", unready.text
        dead = until(base, "/healthz", 503, 60)
        assert dead.json()["error"]["code"] == "engine_stalled", dead.text
        assert "v0" not in unready.text + dead.text
    finally:
        core.send_signal(signal.SIGCONT)
    until(base, "/healthz", 200, 60)
    until(base, "/readyz", 200, 60)
    assert chat(base).status_code == 200


def test_a_killed_engine_is_restarted_on_the_same_version(
        server: tuple[str, Settings, subprocess.Popen[bytes]]) -> None:
    """#19 items 10 and 12: SIGKILL the real EngineCore mid-answer. /readyz turns 503 (it no
    longer only checks that a champion object exists); the answers in flight end with a clear
    503 (`engine_dead`; a stream with an error event); new requests wait, bounded, and get 503
    `engine_busy` with Retry-After while the engine restarts; then it is back on the same
    version, answers again, and kaizen_engine_restarts_total counts the restart."""
    base, _, proc = server
    until(base, "/readyz", 200)
    restarts = metric(base, "kaizen_engine_restarts_total", cause="died", result="ok")
    core = engine_core(proc)
    long = {"max_tokens": 8000, "temperature": 1.0}
    # The stream asks for 4 choices: the random tiny model samples its end-of-text token (1 of 49,152)
    # now and then, and one choice could end on it before the kill (CI saw a stream end normally);
    # all four ending within the moment before the freeze is out of reach.
    streamed_choices = 4

    first_chunk = threading.Event()
    stream_lines: list[str] = []

    def stream() -> int:
        with httpx.stream("POST", f"{base}/v1/chat/completions", headers=USER, timeout=300,
                          json={"messages": PROMPT, "stream": True, "n": streamed_choices, **long}) as r:
            for line in r.iter_lines():
                stream_lines.append(line)
                if '"content":"' in line.replace(" ", "") and '"content":""' not in line.replace(" ", ""):
                    first_chunk.set()
            return r.status_code

    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(stream)
        assert first_chunk.wait(120), stream_lines[-5:]
        # Freeze the EngineCore before the second request: on a quiet machine the tiny model writes
        # 8,000 tokens in seconds, and both answers could end before the kill. A frozen core still
        # lets the API admit the request and register it with vLLM (kaizen_engine_requests_in_flight).
        core.send_signal(signal.SIGSTOP)
        try:
            assert not streamed.done(), stream_lines[-3:]
            whole = pool.submit(chat, base, 300, n=8, **long)
            # admitted and handed to vLLM in the API process within milliseconds; not polled through
            # kaizen_engine_requests_in_flight, which read 0 for whole answers in some runs
            time.sleep(2)
            assert not whole.done(), whole.result().text
        finally:
            core.kill()  # a stopped process dies on SIGKILL as a running one does
        assert streamed.result(300) == 200  # the stream had begun: its 503 is an error event
        assert_unavailable(whole.result(300), "engine_dead")
    events = [json.loads(line[6:]) for line in stream_lines if line.startswith("data: {")]
    assert "error" in events[-1] and events[-1]["error"]["code"] == "engine_dead", events[-3:]
    finished = {c["index"] for e in events for c in e.get("choices", []) if c.get("finish_reason")}
    assert len(finished) < streamed_choices, finished  # the error ended choices still being written
    assert stream_lines[-1] == "data: [DONE]" or stream_lines[-2] == "data: [DONE]", stream_lines[-3:]

    # (a 503 `engine_unresponsive` may come first: the core was frozen for a moment before the kill)
    unready = poll("/readyz engine_restarting", lambda: (r := probe(base, "/readyz")).status_code == 503
                   and r.json()["error"]["code"] == "engine_restarting" and r, 30)
    assert unready.json()["error"]["code"] == "engine_restarting", unready.text
    during = chat(base, timeout_s=60)
    if probe(base, "/readyz").status_code == 503:  # still restarting after the wait: refused, bounded
        assert_unavailable(during, "engine_busy")
    else:  # the restart ended while it waited: it was answered
        assert during.status_code == 200, during.text

    until(base, "/readyz", 200, 300)
    after = chat(base)
    assert after.status_code == 200, after.text
    assert after.headers["x-kaizen-model-version"] == "v0"
    assert engine_core(proc).pid != core.pid
    assert metric(base, "kaizen_engine_restarts_total", cause="died", result="ok") == restarts + 1


def test_a_hung_reload_fails_the_swap_and_the_old_weights_keep_serving(
        server: tuple[str, Settings, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    """#19 item 11: a promotion whose `reload_weights` never returns (v1's folder holds a named
    pipe ending in .safetensors) fails after swap_reload_timeout_s: v1 is refused, the engine is
    restarted on v0 (the reload had loaded part of v1: no half state is kept) and answers exactly
    as before. Requests held meanwhile wait at most engine_admit_timeout_s (503 `engine_busy`,
    Retry-After), and beyond engine_max_waiting of them the rest are refused at once."""
    base, settings, _ = server
    until(base, "/readyz", 200)
    before = chat(base)
    assert before.status_code == 200, before.text
    restarts = metric(base, "kaizen_engine_restarts_total", cause="swap_failed", result="ok")

    folder = other_weights(settings.model_dir, tmp_path / "v1")
    registry = Registry(settings.registry_path)
    v1 = registry.publish(folder, parent="v0", who="test", why="hung reload").version
    os.mkfifo(registry.path(v1) / "zz-hangs.safetensors")  # not in the manifest: verify passes

    with ThreadPoolExecutor(8) as pool:
        promoted = pool.submit(httpx.post, f"{base}/admin/promote", json={"version": v1}, headers=ADMIN,
                               timeout=600)
        # (a request admitted just before the swap closed the gate is answered `engine_dead` when the
        # hung reload is abandoned and the engine restarted: the poll goes on to one that was held)
        held = poll("a request held by the swap", lambda: (r := chat(base, 60)).status_code == 503
                    and r.json()["error"]["code"] != "engine_dead" and r, 120)
        assert_unavailable(held, "engine_busy")
        burst = [pool.submit(chat, base, 60) for _ in range(settings.engine_max_waiting + 2)]
        codes = sorted(r.json()["error"]["code"] if r.status_code == 503 else str(r.status_code)
                       for r in (f.result(120) for f in burst))
        assert codes.count("engine_queue_full") >= 2, codes
        assert promoted.result(600).status_code == 200
    status = httpx.get(f"{base}/admin/rollout", headers=ADMIN).json()
    assert status["serving"]["champion"] == "v0", status["serving"]
    assert "timed out" in status["refused"][v1], status["refused"]
    until(base, "/readyz", 200, 300)
    after = chat(base)
    assert after.status_code == 200, after.text
    assert after.headers["x-kaizen-model-version"] == "v0"
    answer = after.json()["choices"][0]["message"]["content"]
    assert answer == before.json()["choices"][0]["message"]["content"]  # v0's weights, whole
    assert metric(base, "kaizen_engine_restarts_total", cause="swap_failed", result="ok") == restarts + 1


def test_probes_are_answered_while_a_long_answer_is_written(
        server: tuple[str, Settings, subprocess.Popen[bytes]]) -> None:
    """While the engine writes a long answer, `/healthz` is still answered within the chart's
    liveness timeout (5 s). vLLM's processes wait for each other by spinning on sched_yield; on a
    kernel that schedules by autogroup that spin starved every other process on the machine, and
    this probe went unanswered for 22 s on two cores. kaizen/core/vllm_plugin.py makes them sleep
    between polls (`engine_spin_sleep_us`). On a kernel without autogroup the spin did not starve
    anyone and this test passes either way."""
    base, settings, _ = server
    assert settings.engine_spin_sleep_us > 0
    until(base, "/readyz", 200)
    waits: list[float] = []
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(chat, base, 300, max_tokens=3000, temperature=1.0, n=2)
        while not answer.done():
            t0 = time.monotonic()
            r = httpx.get(f"{base}/healthz", timeout=60)
            assert r.status_code == 200, r.text
            if not answer.done():
                waits.append(time.monotonic() - t0)
            time.sleep(0.1)
        r = answer.result()
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] > 1500, r.json()["usage"]  # seconds of writing
    assert len(waits) >= 10, waits  # probes answered while it was written, not only after
    assert max(waits) < 5.0, f"/healthz waited {max(waits):.1f} s during the answer: {sorted(waits)[-5:]}"


def test_an_answer_resumed_on_new_weights_names_both_versions(
        server: tuple[str, Settings, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    """#18 item 2: with swap_drain_timeout_s=0 an answer still generating when a swap pauses the
    engine is frozen, resumed on the new weights, and labelled `old+new` (header and body): the
    label never claims one version for text two versions wrote. An answer that happened to end
    before the pause is labelled with its one version; the test then tries again with the next
    version (at most ATTEMPTS times)."""
    base, settings, _ = server
    until(base, "/readyz", 200)
    registry = Registry(settings.registry_path)
    long = {"max_tokens": 8000, "temperature": 1.0, "n": 2}  # seconds of writing, even when idle
    labels: list[str] = []
    for attempt in range(ATTEMPTS):
        old = httpx.get(f"{base}/admin/rollout", headers=ADMIN, timeout=30).json()["serving"]["champion"]
        # close to v0 (weights within 5%): a version that answers as long as v0 does, where
        # strongly scaled weights can make the next attempt's old version end its answers early
        folder = other_weights(settings.model_dir, tmp_path / f"straddle-{attempt}", spread=0.05)
        new = registry.publish(folder, parent=old, who="test", why="straddle").version
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(chat, base, 300, **long)
            time.sleep(0.5)  # admitted (milliseconds); 16,000 tokens take this model seconds to write
            t0 = time.monotonic()
            promoted = httpx.post(f"{base}/admin/promote", json={"version": new, "reason": "straddle"},
                                  headers=ADMIN, timeout=300)
            assert promoted.status_code == 200, promoted.text
            t1 = time.monotonic()
            r = answer.result(300)
        assert r.status_code == 200, r.text
        label = r.headers["x-kaizen-model-version"]
        assert r.json()["model_version"] == label
        tokens = (r.json()["usage"]["completion_tokens"], [c["finish_reason"] for c in r.json()["choices"]])
        labels.append(f"{label} (promote {t1 - t0:.2f} s, answer {time.monotonic() - t0:.2f} s after it, "
                      f"{tokens} tokens)")
        if "+" in label:
            assert label == f"{old}+{new}", labels
            assert r.json()["choices"][0]["message"]["content"], labels
            break
        assert label == old, labels  # ended before the pause: the old version wrote all of it
    else:
        raise AssertionError(f"no answer was in flight at any of {ATTEMPTS} swaps: {labels}")
    after = chat(base)
    assert after.status_code == 200 and after.headers["x-kaizen-model-version"] == new, after.text
    assert set(engine_config(base)) == {new}  # the swapped engine's configuration, under its new label
