"""Paired answers and votes: through the real engine, and every feedback status in-process."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from services.app import build_app
from services.auth import user_id
from services.comparisons import ComparisonStore
from kaizen.core.events import Answer, PreferenceEvent
from kaizen.core.settings import Settings
from tests.conftest import ADMIN_TOKEN, OTHER_KEY, USER_KEY, make_settings


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def outbox(settings: Settings) -> list[PreferenceEvent]:
    store = ComparisonStore(settings.api_db, settings.comparison_ttl)
    try:
        return store.outbox_events()
    finally:
        store.close()


# -- through the real engine ----------------------------------------------------------


def test_forced_comparison_then_vote(api_server: tuple[str, Settings]) -> None:
    base, settings = api_server
    client = OpenAI(base_url=f"{base}/v1", api_key=USER_KEY, max_retries=0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit"}]
    resp = client.chat.completions.create(model=settings.served_model_name, messages=messages,  # type: ignore[arg-type]
                                          max_tokens=8, temperature=0, extra_body={"comparison": "force"})
    assert [c.index for c in resp.choices] == [0, 1]
    cid = (resp.model_extra or {})["comparison_id"]
    assert cid and cid.startswith("cmp-")
    before = len(outbox(settings))
    r = httpx.post(f"{base}/v1/feedback", headers=auth(USER_KEY),
                   json={"comparison_id": cid, "choice": 1, "reason": "more concrete"})
    assert r.status_code == 202, r.text
    event_id = r.json()["event_id"]
    events = outbox(settings)
    assert len(events) == before + 1
    ev = events[-1]
    assert str(ev.event_id) == event_id and ev.comparison_id == cid and ev.choice == 1
    assert ev.reason == "more concrete"
    assert [m.model_dump() for m in ev.messages] == messages  # the full conversation
    assert [a.text for a in ev.answers] == [c.message.content for c in resp.choices]
    assert all(a.model_version == "v0" for a in ev.answers)
    # greedy requests are sampled for a pair, so the two answers can differ
    assert ev.answers[0].sampling["temperature"] == settings.comparison_temperature
    assert ev.user.startswith("u-") and USER_KEY not in ev.model_dump_json()
    # a second vote on the same pair is refused and adds nothing
    again = httpx.post(f"{base}/v1/feedback", headers=auth(USER_KEY), json={"comparison_id": cid, "choice": 0})
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_voted"
    assert len(outbox(settings)) == before + 1


def test_streamed_comparison(api_server: tuple[str, Settings]) -> None:
    base, settings = api_server
    client = OpenAI(base_url=f"{base}/v1", api_key=USER_KEY, max_retries=0)
    stream = client.chat.completions.create(
        model=settings.served_model_name, messages=[{"role": "user", "content": "Say hi"}], max_tokens=6,
        stream=True, extra_body={"comparison": "force"})
    chunks = list(stream)
    cid = (chunks[0].model_extra or {})["comparison_id"]
    assert cid
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    r = httpx.post(f"{base}/v1/feedback", headers=auth(USER_KEY), json={"comparison_id": cid, "choice": "tie"})
    assert r.status_code == 202
    ev = outbox(settings)[-1]
    assert ev.comparison_id == cid and [a.text for a in ev.answers] == [texts[0], texts[1]]


def test_allow_pairs_at_the_configured_rate_and_n_must_be_one(api_server: tuple[str, Settings]) -> None:
    base, settings = api_server
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "comparison": "allow"}
    paired = sum(
        "comparison_id" in r.json() and r.json()["comparison_id"] is not None
        for r in (httpx.post(f"{base}/v1/chat/completions", headers=auth(USER_KEY), json=body, timeout=30)
                  for _ in range(12))
    )
    assert paired <= 6  # default rate 0.1: P(>6 of 12) is below 1e-5
    bad = httpx.post(f"{base}/v1/chat/completions", headers=auth(USER_KEY),
                     json={**body, "comparison": "force", "n": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"


def test_auth_on_the_real_server(api_server: tuple[str, Settings]) -> None:
    base, _ = api_server
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    r = httpx.post(f"{base}/v1/chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(f"{base}/v1/chat/completions", json=body, headers=auth("wrong")).status_code == 401
    assert httpx.get(f"{base}/admin/versions", headers=auth(USER_KEY)).status_code == 403
    versions = httpx.get(f"{base}/admin/versions", headers=auth(ADMIN_TOKEN))
    assert versions.status_code == 200 and versions.json()["data"][0]["version"] == "v0"
    assert httpx.get(f"{base}/healthz").status_code == 200  # probes stay open


# -- feedback statuses, in-process (no engine needed) ---------------------------------


@pytest.fixture
def app_client(tmp_path: Path) -> tuple[TestClient, Settings]:
    settings = make_settings(tmp_path, api_keys=f"{USER_KEY},{OTHER_KEY}", admin_token=ADMIN_TOKEN,
                             comparison_ttl=timedelta(minutes=5), rate_limit_rps=2, rate_limit_burst=3)
    return TestClient(build_app(settings)), settings


def seed_comparison(client: TestClient, key: str, served_at: datetime | None = None) -> str:
    app = client.app
    answers = [Answer(text="a", model_version="v0"), Answer(text="b", model_version="v0")]
    return str(app.state.comparisons.record(  # type: ignore[attr-defined]
        user_id(app.state.user_secret, key), [{"role": "user", "content": "q"}], answers,  # type: ignore[attr-defined]
        served_at=served_at))


def test_every_feedback_status(app_client: tuple[TestClient, Settings]) -> None:
    client, settings = app_client
    client.app.state.limiter.rate = 1000  # type: ignore[attr-defined]  # this test is not about limits
    client.app.state.limiter.burst = 1000.0  # type: ignore[attr-defined]
    mine = seed_comparison(client, USER_KEY)
    theirs = seed_comparison(client, OTHER_KEY)
    old = seed_comparison(client, USER_KEY, served_at=datetime.now(UTC) - timedelta(minutes=6))

    def vote(body: Any, key: str = USER_KEY) -> httpx.Response:
        return client.post("/v1/feedback", headers=auth(key), **({"json": body} if not isinstance(body, str) else {"content": body}))

    assert vote({"comparison_id": "cmp-nope", "choice": 0}).status_code == 404
    r = vote({"comparison_id": theirs, "choice": 0})
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_your_comparison"
    assert vote({"comparison_id": old, "choice": 0}).status_code == 410
    for bad in ({"comparison_id": mine, "choice": 2}, {"comparison_id": mine, "choice": "A"},
                {"comparison_id": mine, "choice": True}, {"comparison_id": mine}, "{not json"):
        r = vote(bad)
        assert r.status_code == 422, (bad, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert vote({"comparison_id": mine, "choice": "both_bad"}, key="nobody").status_code == 401
    assert client.app.state.comparisons.outbox_events() == []  # type: ignore[attr-defined]  # nothing refused got in
    ok = vote({"comparison_id": mine, "choice": "both_bad"})
    assert ok.status_code == 202
    assert vote({"comparison_id": mine, "choice": 0}).status_code == 409
    events = client.app.state.comparisons.outbox_events()  # type: ignore[attr-defined]
    assert [str(e.event_id) for e in events] == [ok.json()["event_id"]]
    assert events[0].choice == "both_bad"


def test_rate_limit_then_recovery(app_client: tuple[TestClient, Settings]) -> None:
    client, settings = app_client
    cid = seed_comparison(client, USER_KEY)
    statuses = [client.post("/v1/feedback", headers=auth(USER_KEY),
                            json={"comparison_id": "cmp-x", "choice": 0}).status_code for _ in range(5)]
    assert statuses[:3] == [404, 404, 404] and statuses[3:] == [429, 429]  # burst of 3
    limited = client.post("/v1/feedback", headers=auth(USER_KEY), json={"comparison_id": cid, "choice": 0})
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["type"] == "rate_limit_error"
    # another key has its own bucket
    assert client.post("/v1/feedback", headers=auth(OTHER_KEY), json={"comparison_id": cid, "choice": 0}).status_code == 403
    time.sleep(0.6)  # 2 tokens/s refill
    assert client.post("/v1/feedback", headers=auth(USER_KEY), json={"comparison_id": cid, "choice": 0}).status_code == 202


def test_body_size_limit(app_client: tuple[TestClient, Settings]) -> None:
    client, settings = app_client
    r = client.post("/v1/chat/completions", headers=auth(USER_KEY),
                    content=json.dumps({"messages": [{"role": "user", "content": "x" * settings.max_body_bytes}]}))
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_open_server_refuses_public_bind(tmp_path: Path) -> None:
    from services.app import check_bind

    with pytest.raises(SystemExit, match="KAIZEN_API_KEYS"):
        check_bind(make_settings(tmp_path, host="0.0.0.0"))
    check_bind(make_settings(tmp_path, host="0.0.0.0", api_keys="k"))  # keys set: allowed
