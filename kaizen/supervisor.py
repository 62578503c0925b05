"""`kaizen up`: broker, chat API and trainer as supervised child processes.

    kaizen up          # Ctrl-C stops everything

Each child runs in its own process group (so a stop reaches the engine's
worker processes too) and is told by the kernel to die with its parent
(PR_SET_PDEATHSIG), so even a SIGKILLed supervisor leaves nothing behind.
Children are started in order and each must pass its readiness check before
the next starts; they are stopped in reverse order. A child that dies is
reported and restarted, up to `restart_limit` times per `restart_window_s`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

import httpx
from rich.console import Console
from rich.text import Text

from services.auth import admin_token, admin_url, local_admin_allowed
from kaizen.core.broker import broker_command, ensure_topics, port_in_use
from kaizen.core.parent_death import die_with_parent
from services.models import ModelError, require_model
from kaizen.core.settings import Settings

console = Console(highlight=False, soft_wrap=True)
COLORS = {"broker": "magenta", "api": "cyan", "trainer": "green", "up": "bold yellow"}
#: What a first start's engine load took on this project's 2-core CPU machines (SmolLM2-135M,
#: float32: 25-60 s; minutes on a busy machine). Said before the first start, when no earlier
#: start's time is known; later starts say what the last one took (`<data_dir>/logs/startup.json`).
FIRST_ENGINE_LOAD_HINT = "usually 30-60 s on 2 CPU cores, a few minutes on a busy machine"
#: A line every this many seconds while a child is still starting, so a slow start is not silent.
PROGRESS_EVERY_S = 15.0
#: The chat API logs this once its engine has loaded the model (services/app.py, lifespan).
ENGINE_LOADED_MARK = " services.app: serving "
#: Lines of a child's log shown when it dies while starting.
TAIL_LINES = 8


class UpError(RuntimeError):
    """`kaizen up` cannot start; the message says why and what to do."""


def say(name: str, text: str) -> None:
    console.print(Text.assemble((f"{name:>7} | ", COLORS.get(name, "white")), text))


@dataclass
class Child:
    name: str
    argv: list[str]
    ready: Callable[[], bool]
    ready_timeout_s: float
    after_ready: Callable[[], None] | None = None
    fix: str = ""
    """What to do when it does not become ready in time (said with the error)."""
    proc: subprocess.Popen[bytes] | None = None
    restarts: deque[float] = field(default_factory=deque)
    started_at: float = 0.0
    engine_loaded_at: float | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.env = settings.child_env()
        self.env["PYTHONUNBUFFERED"] = "1"
        self.children: list[Child] = []
        self.stopping = threading.Event()
        self.started = time.monotonic()
        settings.logs_dir.mkdir(parents=True, exist_ok=True)
        self.timings_file = settings.logs_dir / "startup.json"
        self.timings: dict[str, float] = {}

    # -- checks before anything starts -------------------------------------------
    def preflight(self) -> None:
        s = self.settings
        try:
            require_model(s.model_dir)
        except ModelError as exc:
            raise UpError(str(exc)) from None
        ports = [("chat API", s.host, s.port), ("trainer metrics", s.trainer_host, s.trainer_port)]
        if s.embedded_broker:
            ports.append(("embedded broker", s.broker_host, s.broker_port))
        for what, host, port in ports:
            probe_host = "127.0.0.1" if host in {"0.0.0.0", "::"} else host
            if port_in_use(probe_host, port):
                raise UpError(
                    f"port {port} ({what}) on {host} is already in use: is `kaizen up` already "
                    f"running? Stop it, or choose other ports (KAIZEN_PORT, KAIZEN_TRAINER_PORT, "
                    f"KAIZEN_BROKER_PORT)."
                )

    # -- readiness checks ------------------------------------------------------------
    def _http_ok(self, url: str, needle: str | None = None) -> bool:
        try:
            r = httpx.get(url, timeout=2.0)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and (needle is None or needle in r.text)

    def build_children(self) -> None:
        s = self.settings
        py = [sys.executable, "-m", "kaizen"]
        if s.embedded_broker:
            self.children.append(Child(
                "broker", broker_command(s),
                ready=lambda: port_in_use(s.broker_host, s.broker_port), ready_timeout_s=30,
                after_ready=lambda: say("up", "topics created: " + (", ".join(ensure_topics(s)) or "none missing")),
                fix=f"is port {s.broker_port} taken by another program (KAIZEN_BROKER_PORT)? "
                    f"read {s.logs_dir / 'broker.log'}",
            ))
        else:
            say("up", f"using the Kafka cluster at {s.bootstrap_servers}: no embedded broker")
            ensure_topics(s)
        api_host = "127.0.0.1" if s.host in {"0.0.0.0", "::"} else s.host
        self.children.append(Child(
            "api", [*py, "serve"],
            ready=lambda: self._http_ok(f"http://{api_host}:{s.port}/readyz"),
            ready_timeout_s=s.engine_ready_timeout_s,
            fix="the engine may still be loading on a busy machine: raise KAIZEN_ENGINE_READY_TIMEOUT_S, "
                "or read the log for an engine error",
        ))
        self.children.append(Child(
            "trainer", [*py, "train"],
            ready=lambda: self._http_ok(f"http://{s.trainer_host}:{s.trainer_port}/metrics",
                                        "kaizen_trainer_ready 1.0"),
            ready_timeout_s=120,
            fix=f"it joins the Kafka group at {s.bootstrap_servers}: is the broker reachable?",
        ))

    # -- process control -------------------------------------------------------------
    def _pump(self, child: Child, stream: IO[bytes]) -> None:
        with open(self.settings.logs_dir / f"{child.name}.log", "ab") as log_file:
            for raw in iter(stream.readline, b""):
                log_file.write(raw)
                log_file.flush()
                line = raw.decode("utf-8", errors="replace").rstrip()
                child.tail.append(line)
                if ENGINE_LOADED_MARK in line and child.engine_loaded_at is None:
                    child.engine_loaded_at = time.monotonic()
                say(child.name, line)

    def start(self, child: Child) -> None:
        child.started_at, child.engine_loaded_at = time.monotonic(), None
        child.tail.clear()
        child.proc = subprocess.Popen(
            child.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent,
        )
        assert child.proc.stdout is not None
        threading.Thread(target=self._pump, args=(child, child.proc.stdout), daemon=True).start()
        say("up", f"started {child.name} (pid {child.proc.pid})")

    def _log_of(self, child: Child) -> str:
        return str(self.settings.logs_dir / f"{child.name}.log")

    def _load_timings(self) -> dict[str, float]:
        try:
            data = json.loads(self.timings_file.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: float(v) for k, v in data.items() if isinstance(v, int | float)}

    def _announce_engine_load(self, child: Child) -> None:
        s = self.settings
        last = self._load_timings().get("engine_load_s")
        if last is None:
            say("up", f"loading the engine (vLLM, model {s.model_dir}): first start with this data dir, "
                f"{FIRST_ENGINE_LOAD_HINT}")
        else:
            say("up", f"loading the engine (vLLM, model {s.model_dir}): the last start took {last:.0f} s")

    def wait_ready(self, child: Child) -> None:
        deadline = child.started_at + child.ready_timeout_s
        next_note = time.monotonic() + PROGRESS_EVERY_S
        engine_said = False
        if child.name == "api":
            self._announce_engine_load(child)
        while not child.ready():
            if self.stopping.is_set():
                raise UpError("stopped while starting")
            if not child.alive:
                code = child.proc.returncode if child.proc else None
                time.sleep(0.2)  # let the pump catch the last lines
                tail = "\n".join(f"    {line}" for line in child.tail)
                raise UpError(f"{child.name} exited with code {code} while starting; its last lines:\n"
                              f"{tail}\n  full log: {self._log_of(child)}")
            now = time.monotonic()
            if child.engine_loaded_at is not None and not engine_said:
                engine_said = True
                self.timings["engine_load_s"] = child.engine_loaded_at - child.started_at
                say("up", f"engine loaded in {self.timings['engine_load_s']:.1f} s")
            if now > deadline:
                raise UpError(f"{child.name} not ready after {child.ready_timeout_s:.0f} s: {child.fix} "
                              f"(log: {self._log_of(child)})")
            if now >= next_note:
                next_note = now + PROGRESS_EVERY_S
                doing = "loading the engine" if child.name == "api" and not engine_said else "starting"
                say("up", f"{child.name}: still {doing} ({now - child.started_at:.0f} s)")
            time.sleep(0.25)
        took = time.monotonic() - child.started_at
        if child.name == "api" and child.engine_loaded_at is not None and not engine_said:
            self.timings["engine_load_s"] = child.engine_loaded_at - child.started_at
            say("up", f"engine loaded in {self.timings['engine_load_s']:.1f} s")
        if child.after_ready:
            child.after_ready()
        self.timings[f"{child.name}_ready_s"] = took
        say("up", f"{child.name} is ready in {took:.1f} s")

    def _save_timings(self) -> None:
        self.timings["total_s"] = time.monotonic() - self.started
        try:
            self.timings_file.write_text(json.dumps({k: round(v, 2) for k, v in self.timings.items()}))
        except OSError:
            pass  # only a hint for the next start

    def stop_child(self, child: Child) -> None:
        proc = child.proc
        if proc is None or proc.poll() is not None:
            return
        say("up", f"stopping {child.name}")
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=self.settings.stop_grace_s)
        except subprocess.TimeoutExpired:
            say("up", f"{child.name} did not stop in {self.settings.stop_grace_s:.0f} s: killing it")
        # the group may hold grandchildren (vLLM's engine core) even after the leader exited
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def stop_all(self) -> None:
        for child in reversed(self.children):
            self.stop_child(child)

    def _may_restart(self, child: Child) -> bool:
        now = time.monotonic()
        while child.restarts and now - child.restarts[0] > self.settings.restart_window_s:
            child.restarts.popleft()
        if len(child.restarts) >= self.settings.restart_limit:
            return False
        child.restarts.append(now)
        return True

    def supervise(self) -> int:
        while not self.stopping.wait(0.5):
            for child in self.children:
                if child.alive:
                    continue
                code = child.proc.returncode if child.proc else None
                say("up", f"{child.name} exited unexpectedly with code {code}")
                if not self._may_restart(child):
                    say("up", f"{child.name} failed {self.settings.restart_limit} times within "
                        f"{self.settings.restart_window_s:.0f} s: stopping everything. Read "
                        f"{self._log_of(child)} for why, fix it and run `kaizen up` again "
                        "(KAIZEN_RESTART_LIMIT / KAIZEN_RESTART_WINDOW_S set how patient this is)")
                    return 1
                self.stop_child(child)  # reap what is left of its group
                time.sleep(min(2 ** len(child.restarts), 30))
                self.start(child)
                try:
                    self.wait_ready(child)
                except UpError as exc:
                    say("up", str(exc))
        return 0

    def operator_line(self) -> str:
        """How to open the operator page: a signing-in address on a loopback development server."""
        s = self.settings
        if s.admin_token is not None:
            return f"operator page: {s.public_url}/admin  (sign in with KAIZEN_ADMIN_TOKEN)"
        token = admin_token(s)
        if token is None:
            why = ("production mode" if s.environment == "production"
                   else f"KAIZEN_HOST={s.host} is not loopback")
            return f"operator page: off ({why} needs KAIZEN_ADMIN_TOKEN)"
        return f"operator page: {admin_url(s, token)}"

    def banner(self) -> None:
        s = self.settings
        url = s.public_url
        lines = [
            "",
            f"Kaizen is up in {time.monotonic() - self.started:.0f} s: {url}/   "
            f"(model {s.served_model_name}, data in {s.data_dir})",
            f"  {self.operator_line()}",
            ("    (again later: `.venv/bin/kaizen config --show-admin-url`)"
             if local_admin_allowed(s) else None),
            f"  metrics: {url}/metrics   trainer: http://{s.trainer_host}:{s.trainer_port}/metrics",
            "  chat with curl:",
            f"    curl -s {url}/v1/chat/completions -H 'content-type: application/json' \\",
            f"      -d '{{\"model\": \"{s.served_model_name}\", \"messages\": [{{\"role\": \"user\", "
            "\"content\": \"What is the capital of France?\"}]}'",
            "  or with the openai client:",
            f"    OpenAI(base_url='{url}/v1', api_key='unused').chat.completions.create(",
            f"        model='{s.served_model_name}', messages=[{{'role': 'user', 'content': 'Hi'}}])",
            "  Ctrl-C stops everything.",
            "",
        ]
        for line in lines:
            if line is not None:
                say("up", line)

    def run(self) -> int:
        def _on_signal(signum: int, _frame: object) -> None:
            say("up", f"signal {signum}: stopping")
            self.stopping.set()

        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
        try:
            self.preflight()
            self.build_children()
            if self.settings.admin_token is None:
                admin_token(self.settings)  # created before the API starts, which reads it
            for child in self.children:
                self.start(child)
                self.wait_ready(child)
            self._save_timings()
            self.banner()
            return self.supervise()
        except UpError as exc:
            if not self.stopping.is_set():
                say("up", f"error: {exc}")
                return 1
            return 0
        finally:
            self.stop_all()
            say("up", "all stopped")


def run_up(settings: Settings) -> int:
    return Supervisor(settings).run()

