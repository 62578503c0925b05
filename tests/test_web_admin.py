"""The operator page at `/admin`, driven in headless Chromium against a real server.

    python -m pytest tests/test_web_admin.py -q

One `kaizen serve` process of its own (auto rollout off, so only the operator's
clicks change the rollout) on the tiny model, on the session broker. Before the
tests, three training rounds are logged where trainer/rounds.py logs them and
their two models published into the server's registry as the trainer does (v1
rejected by the gate, v2 a candidate). The operator puts v2 on canary from the
page, sees the split change and the live head-to-head, promotes it, and the chat
page's version label follows. A wrong token is explained on the page. Screenshots
land in docs/screenshots/ (admin-desktop.png, admin-bad-token-desktop.png).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from kaizen.core.registry import Registry
from kaizen.core.rounds_log import rounds_dir
from kaizen.core.settings import Settings
from tests.conftest import ADMIN_TOKEN, ROOT, USER_KEY, make_settings, stop_group, wait_http
from tests.test_web import CHROMIUM, CHROMIUM_ARGS, SHOTS, open_page, send

#: Starting a canary loads a second vLLM engine (~20 s on 2 CPU cores) before the
#: server answers; promoting swaps weights into the champion first.
ACTION_TIMEOUT_MS = 90_000
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
USER = {"Authorization": f"Bearer {USER_KEY}"}


@pytest.fixture(scope="module")
def server(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, broker: Settings
) -> Iterator[tuple[str, Settings]]:
    """`kaizen serve` with auto rollout off, after three training rounds: one skipped, one
    whose model the gate rejected (v1), one published as candidate v2. The versions are
    copies of v0's weights (the label, not the answers, is what the page follows). It
    talks to the session's broker: without one, each model event it emits waits out
    Kafka's bootstrap timeout."""
    settings = make_settings(tmp_path_factory.mktemp("admin-api"), model=tiny_model, api_keys=USER_KEY,
                             broker_port=broker.broker_port,
                             admin_token=ADMIN_TOKEN, auto_rollout=False, registry_poll_interval_s=1.0,
                             rate_limit_rps=1000, rate_limit_burst=1000,
                             canary_max_votes_per_user=6)  # one voter casts the 6 votes the chart shows
    log_path = settings.data_dir / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "kaizen", "serve"], env=settings.child_env(), cwd=ROOT,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{settings.port}"
    try:
        wait_http(f"{base}/readyz", 360, proc)  # ~25 s idle; minutes when the machine is busy
        registry = Registry(settings.registry_path)
        for r in ROUNDS:
            if r["outcome"] in ("published", "rejected"):
                gate = r["gate"]
                m = registry.publish(tiny_model, parent="v0", who="trainer", rejected=not gate["passed"],
                                     why="passed the gate" if gate["passed"] else "failed the gate: "
                                     + "; ".join(gate["failed"]), reward_model=r["reward_model"],
                                     training={"round_id": r["round_id"], "ppo": r["ppo"]}, gate=gate)
                assert m.version == r["version"], (m.version, r)
        write_rounds(settings, ROUNDS)
        deadline = time.monotonic() + 30
        while "v2" not in versions(base):
            assert time.monotonic() < deadline, "the server never listed the published v2"
            time.sleep(0.25)
    except Exception:
        stop_group(proc)
        print(log_path.read_text()[-5000:])
        raise
    yield base, settings
    stop_group(proc)


def _round(n: int, hours_ago: float, outcome: str, **fields: Any) -> dict[str, Any]:
    started = datetime.now(UTC) - timedelta(hours=hours_ago)
    ended = started + timedelta(minutes=9)
    return {"kind": "round", "round_id": f"r{started:%Y%m%dT%H%M%S}-test{n}", "started": started.isoformat(),
            "store_mark": 100 * n, "attempt": 1, "recovery": "fresh", "outcome": outcome,
            "ended": ended.isoformat(), "ended_ts": ended.timestamp(), "seconds": 540.0, **fields}


#: Round records as trainer/round_record.py logs them (`finish`), oldest first.
ROUNDS = [
    _round(1, 3, "skipped", reason="no reward model yet (too few held-out votes to accept one)"),
    _round(2, 2, "rejected", version="v1", reward_model="rm-v1", reward_accuracy=0.58,
           ppo={"iterations": 8, "reward_first": -0.31, "reward_last": -0.12, "kl_last": 0.041,
                "kl_coef_last": 0.05},
           gate={"win_rate": 0.47, "kl": 0.052, "passed": False, "failed": ["win rate 0.470 < 0.55"]}),
    _round(3, 1, "published", version="v2", reward_model="rm-v2", reward_accuracy=0.64,
           ppo={"iterations": 8, "reward_first": -0.08, "reward_last": 0.21, "kl_last": 0.028,
                "kl_coef_last": 0.048},
           gate={"win_rate": 0.61, "kl": 0.031, "passed": True, "failed": []}),
]


def write_rounds(settings: Settings, rounds: list[dict[str, Any]]) -> None:
    """Append the records where the trainer does; the API reads them back with `read_rounds`."""
    path = rounds_dir(settings) / "rounds.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in rounds:
            f.write(json.dumps(r) + "\n")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def versions(base: str) -> dict[str, str]:
    """Version → stage, as the admin API says."""
    r = httpx.get(f"{base}/admin/versions", headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    return {v["version"]: v["stage"] for v in r.json()["data"]}


def rollout(base: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/admin/rollout", headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def open_admin(browser: Browser, base: str, token: str | None) -> Page:
    page = open_page(browser, f"{base}/admin?refresh=1")
    if token is not None:
        page.get_by_role("textbox", name="Admin token").fill(token)
        page.get_by_role("button", name="Use token").click()
    return page


def vote_pairs(base: str, n: int) -> None:
    """Champion-vs-canary pairs through the chat API, each voted: the live head-to-head."""
    with httpx.Client(base_url=base, headers=USER, timeout=60) as client:
        for i in range(n):
            r = client.post("/v1/chat/completions", json={
                "model": "kaizen", "messages": [{"role": "user", "content": f"Question {i}"}],
                "comparison": "force", "max_tokens": 8})
            assert r.status_code == 200, r.text
            choices: list[int | str] = [0, 1, 0, "tie", 1, 0]
            choice = choices[i % 6]
            cid = r.json()["comparison_id"]
            r = client.post("/v1/feedback", json={"comparison_id": cid, "choice": choice})
            assert r.status_code == 202, r.text


# -- tests --------------------------------------------------------------------------------------


def test_wrong_token_is_explained(server: tuple[str, Settings], browser: Browser) -> None:
    base, _ = server
    # no token at all: 401, the token field is offered and focused
    page = open_admin(browser, base, None)
    alert = page.locator("#alerts").get_by_role("alert")
    expect(alert).to_contain_text("This page needs the admin token")
    expect(alert).to_contain_text("HTTP 401")
    expect(page.get_by_role("textbox", name="Admin token")).to_be_focused()

    # a wrong token, then a user's API key: both refused in words, nothing of the dashboard shown
    for wrong in ("not-the-admin-token", USER_KEY):
        page.get_by_role("textbox", name="Admin token").fill(wrong)
        page.get_by_role("button", name="Use token").click()
        expect(alert).to_contain_text("The admin token was not accepted")
        expect(alert).to_contain_text("HTTP 403")
        expect(page.locator("#token-hint")).to_contain_text("did not accept this token")
        expect(page.locator("#dashboard")).to_be_hidden()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "admin-bad-token-desktop.png"))

    # the right one: the alert goes, the dashboard comes, the token field folds away
    page.get_by_role("textbox", name="Admin token").fill(ADMIN_TOKEN)
    page.get_by_role("textbox", name="Admin token").press("Enter")
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator("#alerts .notice")).to_have_count(0)
    expect(page.locator("#settings")).to_be_hidden()
    expect(page.locator("#versions-table tr[data-version=v0]")).to_contain_text("champion")
    page.context.close()


def test_training_rounds_are_charted(server: tuple[str, Settings], browser: Browser) -> None:
    base, _ = server
    page = open_admin(browser, base, ADMIN_TOKEN)
    expect(page.locator("#rounds-count")).to_have_text("3 rounds")
    charts = page.locator("#rounds-charts")
    # the latest value of each chart is the newest round's, as the API sent it
    expect(charts.locator("[data-series=reward_mean] .latest")).to_have_text("0.210")
    expect(charts.locator("[data-series=kl] .latest")).to_have_text("0.0310")
    expect(charts.locator("[data-series=rm_accuracy] .latest")).to_have_text("64.0%")
    # a point per round that has the metric; the rejected round's is hollow
    reward = charts.locator("[data-series=reward_mean] svg")
    expect(reward.locator("circle")).to_have_count(2)
    expect(reward.locator("circle.hollow")).to_have_count(1)
    expect(reward).to_have_attribute("aria-label", re.compile(r"over 2 rounds: first -0\.120, latest 0\.210"))
    page.get_by_text("Rounds as a table").click()
    rows = page.locator("#rounds-table tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.nth(0)).to_contain_text("published")
    expect(rows.nth(1)).to_contain_text("failed (47%) · KL 0.052")
    expect(rows.nth(2)).to_contain_text("skipped")
    # a round links to the version it published: its details, with the gate numbers
    expect(rows.nth(0)).to_contain_text("passed (61%) · KL 0.031")
    rows.nth(0).get_by_role("button", name=re.compile(r"^Details of v2, published by round ")).click()
    detail = page.locator("#version-detail")
    expect(detail).to_be_visible()
    expect(detail).to_contain_text("v2 ← v0")
    # the gate's win rate
    expect(detail.locator(".kv-groups")).to_contain_text(re.compile(r"0\.61|61(\.0)?%"))
    expect(detail).to_be_in_viewport()
    expect(page.locator("#first-run")).to_be_hidden()  # not a first run: versions and rounds exist
    page.context.close()


def test_canary_then_promote(server: tuple[str, Settings], browser: Browser) -> None:
    base, _ = server
    # a chat user, before anything changes: answers come from v0
    chat = open_page(browser, f"{base}/?compare=off&max_tokens=8", key=USER_KEY)
    send(chat, "Hello")
    expect(chat.locator(".msg.assistant[data-done=true]")).to_have_count(1)
    expect(chat.locator("#model-version")).to_have_text("model v0")

    page = open_admin(browser, base, ADMIN_TOKEN)
    page.set_default_timeout(ACTION_TIMEOUT_MS)
    split = page.locator("#split")
    expect(split).to_have_attribute("aria-label", "Traffic split: champion v0 100%, no canary")
    v2 = page.locator("#versions-table tr[data-version=v2]")
    expect(v2).to_have_attribute("data-stage", "candidate")
    expect(v2).to_contain_text("61.0%")        # the gate's win rate, as the trainer published it
    expect(v2).to_contain_text("passed")
    page.get_by_role("button", name="Details of v2").click()
    expect(page.locator("#version-detail")).to_contain_text("v2 ← v0")
    expect(page.locator("#version-detail")).to_contain_text("passed the gate")
    expect(page.locator("#versions-table tr[data-version=v1]")).to_have_attribute("data-stage", "rejected")

    # nothing to roll back yet: the server's refusal shows in the dialog, which stays open
    page.get_by_role("button", name="Roll back v0…").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Roll back the champion v0?")
    dialog.get_by_role("button", name="Roll back").click()
    expect(dialog.get_by_role("alert")).to_contain_text("HTTP 409")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    expect(page.get_by_role("button", name="Roll back v0…")).to_be_focused()

    # canary: Escape cancels and changes nothing; then 30% for real
    page.get_by_role("button", name="Put v2 on canary").click()
    expect(dialog).to_contain_text("Put v2 on canary?")
    expect(dialog.get_by_label("Share of users on the canary (%)")).to_be_focused()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    assert rollout(base)["canary"] is None
    page.get_by_role("button", name="Put v2 on canary").click()
    dialog.get_by_label("Share of users on the canary (%)").fill("30")
    dialog.get_by_label("Reason (recorded in the audit log)").fill("gate passed, try it live")
    dialog.get_by_role("button", name="Start canary").click()
    expect(dialog.get_by_role("button", name="Start canary")).to_be_disabled()  # waits for the server
    expect(dialog).to_be_hidden(timeout=ACTION_TIMEOUT_MS)
    expect(page.locator("#result")).to_contain_text("v2 is on canary for 30% of users; champion v0.")
    expect(split).to_have_attribute("aria-label", "Traffic split: champion v0 70%, canary v2 30%")
    expect(split.locator(".split-seg.canary")).to_contain_text("v2 · 30%")
    expect(v2).to_have_attribute("data-stage", "canary")
    server_side = rollout(base)
    assert (server_side["canary"], server_side["canary_fraction"]) == ("v2", 0.3), server_side
    audit = page.locator("#audit-table tbody tr").first
    expect(audit).to_contain_text("gate passed, try it live")
    expect(audit).to_contain_text("operator (web)")

    # live votes between the two: the head-to-head chart draws what the server computed
    vote_pairs(base, 6)
    h2h = rollout(base)["head_to_head"]
    assert h2h["votes"] == 6, h2h
    expect(page.locator("#h2h-chart .votebar")).to_have_attribute("aria-label", re.compile(r"^6 votes: "))
    shown = page.locator("#h2h-chart figure").get_attribute("data-win-rate")
    assert shown is not None and float(shown) == h2h["win_rate"], (shown, h2h)
    expect(page.locator("#votes-rate")).not_to_have_text("0.00")
    page.locator("#version-detail button", has_text="Close").click()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "admin-desktop.png"), full_page=True)

    # promote from the traffic panel
    page.get_by_role("button", name="Promote v2…").click()
    expect(dialog).to_contain_text("Promote v2 to champion?")
    dialog.get_by_role("button", name="Promote v2").click()
    expect(dialog).to_be_hidden(timeout=ACTION_TIMEOUT_MS)
    expect(page.locator("#result")).to_contain_text("v2 is the champion now.")
    expect(split).to_have_attribute("aria-label", "Traffic split: champion v2 100%, no canary")
    expect(v2).to_have_attribute("data-stage", "champion")
    expect(page.locator("#versions-table tr[data-version=v0]")).to_have_attribute("data-stage", "retired")
    expect(page.locator("#serving-now")).to_have_text("v2")
    assert versions(base) == {"v0": "retired", "v1": "rejected", "v2": "champion"}

    # the chat page, without a reload, labels its next answer with the new champion
    send(chat, "And now?")
    expect(chat.locator(".msg.assistant[data-done=true]")).to_have_count(2)
    expect(chat.locator("#model-version")).to_have_text("model v2")
    chat.context.close()
    page.context.close()
