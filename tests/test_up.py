"""`kaizen up` end to end: real broker, real vLLM chat API, real trainer, as a user starts them."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from kafka import KafkaProducer

from kaizen.core.broker import port_in_use
from kaizen.core.settings import Settings
from tests.conftest import ROOT, make_settings, stop_group, wait_http
from tests.test_trainer_consumer import make_event


def wait_for(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def stored_ids(db: Path) -> set[str]:
    if not db.exists():
        return set()
    with sqlite3.connect(db) as conn:
        try:
            return {r[0] for r in conn.execute("SELECT event_id FROM preferences")}
        except sqlite3.OperationalError:
            return set()


def trainer_ready(settings: Settings) -> bool:
    try:
        text = httpx.get(f"http://127.0.0.1:{settings.trainer_port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return False
    return "kaizen_trainer_ready 1.0" in text


@pytest.mark.slow
def test_kaizen_up_end_to_end(tiny_model: Path, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", model=tiny_model, restart_window_s=60)
    env = settings.child_env()
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log_file:
        up = subprocess.Popen([sys.executable, "-m", "kaizen", "up"], env=env, cwd=ROOT,
                              stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{settings.port}"
    try:
        wait_http(f"{base}/readyz", 240, up)
        wait_for(lambda: "Kaizen is up" in log_path.read_text(), 120, "the banner")
        assert trainer_ready(settings)

        # chat once through HTTP
        r = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "model": settings.served_model_name, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 5})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]

        # a second `kaizen up` on the same ports fails with a clear message
        second = subprocess.run([sys.executable, "-m", "kaizen", "up"], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert "already in use" in second.stdout and "Traceback" not in second.stdout + second.stderr

        # one message through the preferences topic reaches the trainer's store
        event = make_event("tie")
        producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
        producer.send(settings.topic_preferences, key=event.comparison_id.encode(), value=event.to_bytes()).get(10)
        producer.close()
        wait_for(lambda: str(event.event_id) in stored_ids(settings.preferences_db), 60, "the trainer to store the event")
        wait_for(lambda: f"received preference event {event.event_id}" in log_path.read_text(), 10, "the trainer's log")

        # a child that dies is reported and restarted
        trainer = next(p for p in psutil.Process(up.pid).children()
                       if "train" in p.cmdline())
        trainer.kill()
        wait_for(lambda: "trainer exited unexpectedly" in log_path.read_text(), 20, "the death report")
        wait_for(lambda: log_path.read_text().count("trainer is ready") >= 2, 120, "the trainer restart")

        family = psutil.Process(up.pid).children(recursive=True)
        assert len(family) >= 4  # broker, api, its engine core, trainer
        up.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert up.wait(timeout=90) == 0
        gone, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
        for port in (settings.port, settings.trainer_port, settings.broker_port):
            assert not port_in_use("127.0.0.1", port)
        assert "all stopped" in log_path.read_text()
    finally:
        if up.poll() is None:
            stop_group(up)
        print(log_path.read_text()[-4000:])


def _taken(port: int) -> bool:
    """Whether another socket holds the port (bound, listening or not): a plain bind fails."""
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_serve_claims_its_port_before_loading_the_engine(tiny_model: Path, broker: Settings,
                                                         tmp_path: Path) -> None:
    """uvicorn binds its port only after the app's startup, and the engine loads in that startup
    while vLLM's own processes open sockets on ephemeral ports: once one of them took the API's
    port and `kaizen up` died after loading its engine (CI). `kaizen serve` binds first: while the
    engine loads, the port is already held (a bind fails) and connections are refused; then it
    answers."""
    settings = make_settings(tmp_path / "data", model=tiny_model, broker_port=broker.broker_port)
    log_path = tmp_path / "serve.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "kaizen", "serve"], env=settings.child_env(), cwd=ROOT,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    held_while_loading = False
    try:
        deadline = time.monotonic() + 240
        while (time.monotonic() < deadline and proc.poll() is None
               and not port_in_use("127.0.0.1", settings.port)):
            if _taken(settings.port):
                # bound and listening at once (uvicorn.run's order) is not early
                held_while_loading = not port_in_use("127.0.0.1", settings.port)
                break
            time.sleep(0.05)
        assert held_while_loading, log_path.read_text()[-3000:]
        wait_http(f"http://127.0.0.1:{settings.port}/readyz", 240, proc)
    finally:
        stop_group(proc)
