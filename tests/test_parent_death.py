"""A parent killed outright takes its broker and chat API (engine included) with it.

`kaizen bench loop` once died by SIGKILL (the out-of-memory killer) and left `kaizen serve`, its
vLLM EngineCore and worker, and the Tansu broker running, holding ports and gigabytes. Here a
real parent process starts the real broker and the real chat API on the tiny model the way the
loop does (kaizen/core/broker.py, simulation/loop.py `start_api`), waits until the API is ready,
starts the loop's own sampling engine (trainer/rollout_engine.py) and is SIGKILLed; every process
it started must be gone soon after, and the ports free.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from kaizen.core.broker import port_in_use
from tests.conftest import ROOT, make_settings

PARENT = """
import json, sys, time
from kaizen.core.broker import start_embedded_broker
from kaizen.core.settings import Settings
from simulation.loop import start_api, wait_ready
from trainer.rollout_engine import RolloutEngine

settings = Settings()
broker = start_embedded_broker(settings)
server = start_api(settings)
wait_ready(settings, server)
engine = RolloutEngine(settings, settings.model, max_model_len=settings.engine_max_model_len)
print("PIDS " + json.dumps({"broker": broker.pid, "server": server.pid}), flush=True)
time.sleep(600)
"""


def gone(pids: list[int], timeout_s: float) -> list[int]:
    """The pids still alive (zombies count as gone) after waiting up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


@pytest.mark.slow
def test_sigkilled_parent_leaves_no_broker_api_or_engine(tiny_model: Path, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", model=tiny_model)
    settings.data_dir.mkdir(parents=True)
    parent = subprocess.Popen([sys.executable, "-c", PARENT], env=settings.child_env(), cwd=ROOT,
                              stdout=subprocess.PIPE, start_new_session=True)
    started: list[int] = []
    try:
        assert parent.stdout is not None
        line = b""
        while not line.startswith(b"PIDS "):  # vLLM logs to stdout too; blocks until all is up
            line = parent.stdout.readline()
            assert line, f"the parent exited ({parent.wait()}); see {settings.data_dir / 'serve.log'}"
        pids = json.loads(line[5:])
        server = psutil.Process(pids["server"])
        started = [c.pid for c in psutil.Process(parent.pid).children(recursive=True)]
        assert pids["broker"] in started and server.pid in started
        assert server.children(recursive=True), "the chat API runs its engine in a child process"
        assert len(started) > 2 + len(server.children(recursive=True)), "the loop's own engine too"
        assert port_in_use(settings.host, settings.port) and port_in_use(settings.broker_host, settings.broker_port)

        parent.send_signal(signal.SIGKILL)
        parent.wait(10)

        assert gone(started, 60) == [], "processes outlived their SIGKILLed parent"
        assert not port_in_use(settings.host, settings.port)
        assert not port_in_use(settings.broker_host, settings.broker_port)
    finally:  # what is left after a failure
        if parent.poll() is None:
            started += [c.pid for c in psutil.Process(parent.pid).children(recursive=True)]
            parent.kill()
        for pid in started:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
