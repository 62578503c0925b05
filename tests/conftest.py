"""Shared real parts for the test suite.

Session-scoped: a tiny random Llama (built once, reusing SmolLM2's tokenizer),
a real Tansu broker on a free port, and one chat API process holding a real
vLLM engine (engine start is ~20 s, so every API test shares it). Tests never
touch the user's data dir: KAIZEN_DATA_DIR points into pytest's temp dir
before any settings are built.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kaizen.core.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parent.parent
#: Keys of the shared API server: two users and an operator.
USER_KEY, OTHER_KEY, ADMIN_TOKEN = "key-alice-0123", "key-bob-4567", "admin-token-89ab"


#: mypy over the package, started in the background as collection ends (`pytest_collection_finish`)
#: when tests/test_typing.py is selected: a cold run is a minute or more of one core, and the suite
#: leaves most of a core idle while it waits on processes starting. Niced, so tests keep their CPU.
_MYPY: dict[str, tuple[subprocess.Popen[bytes], Any]] = {}


def _lower_priority() -> None:
    """In the child: the lowest CPU priority. With the kernel's autogroup scheduling (on here) `nice`
    ranks a process only within its session's group; its own session's group is niced as well."""
    os.nice(19)
    try:
        Path("/proc/self/autogroup").write_text("19")
    except OSError:
        pass  # no autogroup scheduling: plain nice is enough


def _start_mypy(background: bool) -> tuple[subprocess.Popen[bytes], Any]:
    out = tempfile.TemporaryFile()  # not a pipe: a long report must not block mypy until it is read
    proc = subprocess.Popen([sys.executable, "-m", "mypy"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=background, preexec_fn=_lower_priority if background else None)
    return proc, out


def pytest_collection_finish(session: pytest.Session) -> None:
    if hasattr(session.config, "workerinput"):
        return  # under pytest-xdist every worker collects every test, and both cores are busy anyway
    if any(item.nodeid.startswith("tests/test_typing.py") for item in session.items):
        _MYPY["run"] = _start_mypy(background=True)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if "run" in _MYPY:  # its test did not run (-x, a keyboard interrupt): no orphan mypy
        proc, out = _MYPY.pop("run")
        proc.kill()
        proc.wait()
        out.close()


#: Modules that start several engines or whole services (kaizen up, the loop, API replicas, torchrun
#: ranks, canaries). `make test` runs two pytest-xdist workers with `--dist loadfile`; under it each
#: group below is one unit of work, like one file (`pytest_xdist_make_scheduler`), so at most one module
#: of each group runs at a time and the two workers never hold more than two such modules' engines
#: (each ~1.5 GB of worker memory, its KV cache allocated up front). The two hungriest, three API
#: replicas (test_scale_out) and engines restarted under load (test_engine_health), share a group: side
#: by side they left 4.4 of 23 GiB free. The groups are balanced by serial time (~15 and ~13 minutes)
#: and scheduled first; the other files fill in around them.
ENGINE_HEAVY_GROUPS = {
    "engines-a": ("test_loop", "test_scale_out", "test_canary", "test_engine_health"),
    "engines-b": ("test_distributed", "test_rounds", "test_canary_integrity", "test_pipeline_faults",
                  "test_parent_death", "test_up"),
}


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to under `--dist loadfile`: its engine group, else its file."""
    path = nodeid.split("::", 1)[0]
    module = path.rsplit("/", 1)[-1].removesuffix(".py")
    return next((group for group, modules in ENGINE_HEAVY_GROUPS.items() if module in modules), path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile` with the engine groups merged into one unit each. (pytest-xdist's own
    `--dist loadgroup` cannot do it under pytest 9: xdist 3.8 tags a test's group onto `item._nodeid`,
    which pytest 9.2 no longer reads, so the marks are silently ignored.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class EngineGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return EngineGroupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):
        return  # a serial run keeps pytest's order
    heavy = list(ENGINE_HEAVY_GROUPS)  # the engine groups first (with --no-loadscope-reorder)
    items.sort(key=lambda item: heavy.index(u) if (u := work_unit(item.nodeid)) in heavy else len(heavy))


def mypy_result(timeout_s: float) -> tuple[int, str]:
    """(exit code, output) of the background mypy run; started now if collection did not start it."""
    started = _MYPY.pop("run", None)
    proc, out = started if started is not None else _start_mypy(background=False)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    finally:
        out.seek(0)
        text = out.read().decode(errors="replace")
        out.close()
    return proc.returncode, text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def isolated_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    data_dir = tmp_path_factory.mktemp("kaizen-data")
    old = os.environ.get("KAIZEN_DATA_DIR")
    os.environ["KAIZEN_DATA_DIR"] = str(data_dir)
    for key in [k for k in os.environ if k.startswith("KAIZEN_") and k != "KAIZEN_DATA_DIR"]:
        del os.environ[key]  # the developer's own settings must not leak in
    get_settings.cache_clear()
    yield data_dir
    if old is None:
        os.environ.pop("KAIZEN_DATA_DIR", None)
    else:
        os.environ["KAIZEN_DATA_DIR"] = old
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, isolated_data_dir: Path) -> Path:
    from services.models import build_tiny

    return build_tiny(Settings(), tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def yes_no_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model taught to answer "Yes." or "No." (tests/yes_no.py), trained once on one thread;
    read-only for the tests that start from it (the registry copies or links it as v0)."""
    import torch

    from tests.yes_no import sft_yes_no

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return sft_yes_no(tiny_model, tmp_path_factory.mktemp("models") / "yes-no")
    finally:
        torch.set_num_threads(threads)


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "port": free_port(),
        "trainer_port": free_port(),
        "broker_port": free_port(),
        "engine_max_model_len": 512,
        "default_max_tokens": 16,
        "max_tokens_limit": 448,
        "kafka_max_poll_interval_ms": 10_000,
    }
    values.update(overrides)
    return Settings.model_validate(values)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A real embedded broker with Kaizen's topics; yields settings that point at it."""
    from kaizen.core.broker import ensure_topics, start_embedded_broker

    settings = make_settings(tmp_path_factory.mktemp("broker-data"))
    proc = start_embedded_broker(settings)
    ensure_topics(settings)
    yield settings
    proc.terminate()
    proc.wait(timeout=10)


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s} s")


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 20) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="session")
def api_server(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, broker: Settings
) -> Iterator[tuple[str, Settings]]:
    """One `kaizen serve` process on the tiny model, its outbox relay delivering to the
    session broker; yields (base_url, settings)."""
    settings = make_settings(tmp_path_factory.mktemp("api-data"), model=tiny_model,
                             broker_port=broker.broker_port,
                             api_keys=f"{USER_KEY},{OTHER_KEY}", admin_token=ADMIN_TOKEN,
                             rate_limit_rps=1000, rate_limit_burst=1000)
    log_path = settings.data_dir / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kaizen", "serve"], env=settings.child_env(), cwd=ROOT,
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    base = f"http://127.0.0.1:{settings.port}"
    try:
        wait_http(f"{base}/readyz", 240, proc)
    except Exception:
        stop_group(proc)
        print(log_path.read_text()[-5000:])
        raise
    yield base, settings
    stop_group(proc)
