"""The first hour: `kaizen up` as `make run` starts it, its stage lines, and the operator URL it
prints, opened in headless Chromium (Debian's, as in tests/test_web.py).

    python -m pytest tests/test_first_run.py -q

The URL carries a generated admin token in its fragment; the page signs in from it without
anyone typing a token. The same URL against a server in production mode does not sign in, and
production or a non-loopback address never get a generated token.
"""

from __future__ import annotations

import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, expect, sync_playwright

from services.app import build_app
from services.auth import admin_token
from kaizen.core.settings import Settings
from tests.conftest import ROOT, make_settings, stop_group, wait_http
from tests.test_web import CHROMIUM, CHROMIUM_ARGS, SHOTS, open_page

KAIZEN = Path(sys.executable).parent / "kaizen"  # .venv/bin/kaizen, the command `make run` runs
URL_RE = re.compile(r"operator page: (http://\S+/admin#token=[0-9a-f]+)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def wait_for_text(path: Path, pattern: re.Pattern[str], proc: subprocess.Popen[bytes],
                  timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = pattern.search(path.read_text(errors="replace"))
        if m:
            return m.group(1)
        assert proc.poll() is None, f"kaizen up exited with {proc.returncode}:\n{path.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no match for {pattern.pattern} in {timeout_s} s:\n{path.read_text()[-3000:]}")


def test_generated_token_only_for_loopback_development(tmp_path: Path) -> None:
    dev = make_settings(tmp_path)
    token = admin_token(dev)
    assert token is not None and len(token) >= 32
    assert stat.S_IMODE(dev.admin_token_path.stat().st_mode) == 0o600
    assert admin_token(dev) == token  # created once, read back after
    assert admin_token(make_settings(tmp_path, admin_token="explicit-token")) == "explicit-token"
    # the file exists, yet it is not used off loopback
    assert admin_token(make_settings(tmp_path, host="0.0.0.0")) is None
    production = make_settings(tmp_path, environment="production", api_keys="k1", admin_token="prod-secret")
    assert admin_token(production) == "prod-secret"
    fresh = tmp_path / "fresh"
    assert admin_token(make_settings(fresh), create=False) is None and not fresh.exists()


@pytest.mark.slow
def test_up_prints_a_signing_in_operator_url(tiny_model: Path, tmp_path: Path, browser: Browser) -> None:
    settings = make_settings(tmp_path / "data", model=tiny_model)
    env = settings.child_env()
    assert "KAIZEN_ADMIN_TOKEN" not in env and not env.get("KAIZEN_API_KEYS")  # as on a fresh clone
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log_file:
        up = subprocess.Popen([str(KAIZEN), "up"], env=env, cwd=ROOT, stdout=log_file,
                              stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{settings.port}"
    try:
        url = wait_for_text(log_path, URL_RE, up, 300)
        out = log_path.read_text()
        # one line per stage, with its time; a first start says the engine is loading and how long it takes
        for stage in (r"broker is ready in \d+\.\d s", r"engine loaded in \d+\.\d s",
                      r"api is ready in \d+\.\d s", r"trainer is ready in \d+\.\d s", r"Kaizen is up in \d+ s"):
            assert re.search(stage, out), (stage, out[-3000:])
        assert "loading the engine" in out and "first start with this data dir" in out
        assert url.startswith(f"{base}/admin#token=")
        token_file = settings.admin_token_path
        assert url.endswith(token_file.read_text().strip())
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

        shown = subprocess.run([str(KAIZEN), "config", "--show-admin-url"], env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and shown.stdout.strip() == url, shown

        page = open_page(browser, url)
        expect(page.locator("#versions-table tr[data-version=v0]")).to_contain_text("champion")
        expect(page.locator("#alerts .notice")).to_have_count(0)
        expect(page.locator("#settings")).to_be_hidden()  # no token typed, none asked for
        assert page.evaluate("location.hash") == ""  # the token left the address bar
        assert "token" not in page.url

        # only v0: the first-run view says what starts a round, from the trainer's own scheduler
        first = page.locator("#first-run")
        expect(first).to_be_visible()
        expect(first.locator("[data-fact=trigger]")).to_contain_text(
            f"{settings.min_new_preferences} new votes since the last round")
        expect(first.locator("[data-fact=votes]")).to_contain_text("0 stored")
        # one vote through the real pipeline (API outbox -> Kafka -> trainer store) shows up there
        r = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "model": "kaizen", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "comparison": "force"})
        assert r.status_code == 200, r.text
        vote = httpx.post(f"{base}/v1/feedback",
                          json={"comparison_id": r.json()["comparison_id"], "choice": 0})
        assert vote.status_code == 202, vote.text
        page.get_by_role("button", name="Refresh now").click()
        expect(first.locator("[data-fact=votes]")).to_contain_text("1 stored (1 chose an answer",
                                                                   timeout=60_000)
        expect(first.locator("[data-fact=next]")).to_contain_text(
            f"When {settings.min_new_preferences - 1} more votes arrive, or at ")
        expect(first.locator("[data-fact=reward]")).to_contain_text(
            f"Needs {settings.reward_min_holdout} held-out")
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "admin-first-run-desktop.png"), full_page=True)
        page.context.close()
    finally:
        stop_group(up)

    # the same URL on a production server (its own admin token, the same data dir) does not sign in
    production = make_settings(settings.data_dir, port=settings.port, model=tiny_model,
                               environment="production", api_keys="user-key-1",
                               admin_token="production-admin-token")
    refused = subprocess.run([str(KAIZEN), "config", "--show-admin-url"], env=production.child_env(),
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 0 and "#token=" not in refused.stdout, refused
    server = uvicorn.Server(uvicorn.Config(build_app(production), host="127.0.0.1", port=production.port,
                                           lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_http(f"{base}/healthz", 10)
        page = open_page(browser, url)
        alert = page.locator("#alerts").get_by_role("alert")
        expect(alert).to_contain_text("The admin token was not accepted")
        expect(alert).to_contain_text("HTTP 403")
        expect(page.locator("#dashboard")).to_be_hidden()
        expect(page.locator("#versions-table tr[data-version=v0]")).to_have_count(0)
        page.context.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_production_without_a_token_has_no_operator_url(tmp_path: Path) -> None:
    env = make_settings(tmp_path, host="0.0.0.0", api_keys="k1").child_env()
    r = subprocess.run([str(KAIZEN), "config", "--show-admin-url"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "set KAIZEN_ADMIN_TOKEN" in r.stderr and "#token=" not in r.stdout, r
    assert not (tmp_path / "admin.token").exists()
