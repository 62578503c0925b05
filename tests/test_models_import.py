"""`kaizen models import DIR`: a Hugging Face folder trained elsewhere becomes a candidate version.

    python -m pytest tests/test_models_import.py -q

Against a real `kaizen serve` (open, on loopback, so the operator CLI signs in with the admin token
the server generated) on the tiny model, with automatic rollout on: an imported folder made by
`kaizen model tiny --seed 1` is registered as v1 but not put on canary by the automatic rollout;
the operator canaries it and its answers come labelled v1, and on the chat page each answer of a
champion-vs-canary pair names its own version once voted on. A folder holding a pickled `.bin`, or
one whose config does not fit the serving engine, is refused with the reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from playwright.sync_api import Browser, expect, sync_playwright

from services.models import build_tiny
from kaizen.core.registry import Registry
from kaizen.core.settings import Settings
from tests.conftest import ROOT, make_settings, stop_group, wait_http
from tests.test_feedback import outbox
from tests.test_web import CHROMIUM, CHROMIUM_ARGS, SHOTS, open_page, send

KAIZEN = Path(sys.executable).parent / "kaizen"


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory,
           broker: Settings) -> Iterator[tuple[str, Settings]]:
    settings = make_settings(tmp_path_factory.mktemp("import-api"), model=tiny_model,
                             broker_port=broker.broker_port, registry_poll_interval_s=1.0,
                             rate_limit_rps=1000, rate_limit_burst=1000)
    assert settings.auto_rollout and settings.admin_token is None and not settings.api_keys
    log_path = settings.data_dir / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([str(KAIZEN), "serve"], env=settings.child_env(), cwd=ROOT,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{settings.port}"
    try:
        wait_http(f"{base}/readyz", 360, proc)
    except Exception:
        stop_group(proc)
        print(log_path.read_text()[-5000:])
        raise
    yield base, settings
    stop_group(proc)
    print(log_path.read_text()[-3000:])


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def kaizen(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KAIZEN), *args], env=settings.child_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def chat_version(base: str) -> str:
    r = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
        "model": "kaizen", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    version: str = r.json()["model_version"]
    assert r.headers["x-kaizen-model-version"] == version
    return version


def test_refused_folders_say_why(server: tuple[str, Settings], tmp_path: Path) -> None:
    _, settings = server
    made = kaizen(settings, "model", "tiny", str(tmp_path / "good"), "--seed", "1")
    assert made.returncode == 0, made.stderr

    pickled = tmp_path / "pickled"
    shutil.copytree(tmp_path / "good", pickled)
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")  # a real pickle, as older exports have
    r = kaizen(settings, "models", "import", str(pickled))
    assert r.returncode == 1, r
    assert "pytorch_model.bin" in r.stderr and "pickled weights" in r.stderr, r.stderr
    assert "safetensors" in r.stderr, r.stderr

    bigger = build_tiny(settings, tmp_path / "bigger", hidden_size=256, num_heads=4)  # another shape
    r = kaizen(settings, "models", "import", str(bigger))
    assert r.returncode == 1, r
    assert "does not fit the serving engine" in r.stderr, r.stderr
    assert "hidden_size 256 (champion 128)" in r.stderr, r.stderr

    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "good", broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    r = kaizen(settings, "models", "import", str(broken))
    assert r.returncode == 1 and "not a readable safetensors file" in r.stderr, r

    assert Registry(settings.registry_path).names() == ["v0"]  # nothing refused got a version


def test_import_canary_and_labelled_answers(server: tuple[str, Settings], tmp_path: Path,
                                            browser: Browser) -> None:
    base, settings = server
    folder = tmp_path / "elsewhere"
    made = kaizen(settings, "model", "tiny", str(folder), "--seed", "1")
    assert made.returncode == 0, made.stderr
    r = kaizen(settings, "models", "import", str(folder), "-m", "fine-tuned elsewhere")
    assert r.returncode == 0, r
    assert "as v1 (candidate)" in r.stdout, r.stdout
    registry = Registry(settings.registry_path)
    manifest = registry.manifest("v1")
    assert manifest.imported and manifest.source == str(folder.resolve()) and manifest.parent is None
    assert registry.verify("v1") == manifest  # every file's sha256 as copied

    # the API lists it; the automatic rollout leaves an imported version to the operator
    listed = kaizen(settings, "models", "list", "--json")  # the CLI signs in with the generated admin token
    assert listed.returncode == 0, listed
    time.sleep(3 * settings.registry_poll_interval_s)
    status = json.loads(kaizen(settings, "models", "show", "v1", "--json").stdout)
    assert status["stage"] == "candidate" and status["stage_reason"] == "fine-tuned elsewhere", status
    assert chat_version(base) == "v0"

    r = kaizen(settings, "models", "canary", "v1", "--fraction", "1.0", "-m", "try the import on live votes")
    assert r.returncode == 0, r
    assert "canary v1" in r.stdout, r.stdout
    assert chat_version(base) == "v1"  # the one (anonymous) user of an open API is on the canary

    # a champion-vs-canary pair on the chat page: after the vote, each answer names its version
    page = open_page(browser, f"{base}/?compare=force&max_tokens=12")
    send(page, "Tell me something")
    pair = page.locator(".pair[data-ready=true]")
    expect(pair).to_have_count(1, timeout=60_000)
    expect(pair.locator(".card-version")).to_have_count(0)  # not before the vote
    cid = pair.get_attribute("data-comparison-id")
    pair.get_by_role("button", name="A is better").click()
    expect(pair.locator(".vote-thanks")).to_contain_text("answer A")
    events = [e for e in outbox(settings) if e.comparison_id == cid]
    assert len(events) == 1
    served = [a.model_version for a in events[0].answers]
    assert sorted(served) == ["v0", "v1"], served
    expect(pair.locator(".card-version")).to_have_text(served)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "chat-canary-voted-desktop.png"))
    page.context.close()
