"""The chat API on a real vLLM engine (tiny model), through the official openai client."""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest
from openai import OpenAI

from kaizen.core.settings import Settings
from tests.conftest import USER_KEY

AUTH = {"Authorization": f"Bearer {USER_KEY}"}


@pytest.fixture(scope="module")
def client(api_server: tuple[str, Settings]) -> OpenAI:
    base, _ = api_server
    return OpenAI(base_url=f"{base}/v1", api_key=USER_KEY, max_retries=0)


def metric(base: str, name: str) -> float:
    """One unlabelled sample from the API's /metrics."""
    text = httpx.get(f"{base}/metrics/").text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert found, f"{name} missing from /metrics"
    return float(found.group(1))


def test_chat_non_streaming(client: OpenAI, api_server: tuple[str, Settings]) -> None:
    _, settings = api_server
    raw = client.chat.completions.with_raw_response.create(
        model=settings.served_model_name, messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
        temperature=0,
    )
    resp = raw.parse()
    assert raw.headers["x-kaizen-model-version"] == "v0"
    assert resp.model == settings.served_model_name
    assert len(resp.choices) == 1
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage is not None and 0 < resp.usage.completion_tokens <= 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    # greedy decoding is deterministic: the same request gives the same text
    again = client.chat.completions.create(
        model=settings.served_model_name, messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
        temperature=0,
    )
    assert again.choices[0].message.content == resp.choices[0].message.content


def test_chat_streaming_with_usage(client: OpenAI, api_server: tuple[str, Settings]) -> None:
    _, settings = api_server
    stream = client.chat.completions.create(
        model=settings.served_model_name, messages=[{"role": "user", "content": "Count to five"}],
        max_tokens=10, stream=True, stream_options={"include_usage": True}, temperature=0,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"] or finishes == ["stop"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 10 or finishes == ["stop"]
    # the streamed text equals the non-streamed greedy answer
    full = client.chat.completions.create(
        model=settings.served_model_name, messages=[{"role": "user", "content": "Count to five"}],
        max_tokens=10, temperature=0,
    )
    assert text == full.choices[0].message.content


def test_n2_sampling_gives_two_choices(client: OpenAI, api_server: tuple[str, Settings]) -> None:
    _, settings = api_server
    resp = client.chat.completions.create(
        model=settings.served_model_name, messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=12, n=2, temperature=1.0, seed=7,
    )
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in resp.choices)
    assert resp.usage is not None
    if all(c.finish_reason == "length" for c in resp.choices):
        assert resp.usage.completion_tokens == 24
    assert 2 <= resp.usage.completion_tokens <= 24


def test_errors_use_openai_shape(client: OpenAI, api_server: tuple[str, Settings]) -> None:
    base, settings = api_server
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])
    assert not_found.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=settings.served_model_name,
                                       messages=[{"role": "user", "content": "x"}], max_tokens=10_000)
    assert too_long.value.body["param"] == "max_tokens"  # type: ignore[index]
    # the last: vLLM's own validation (n > 1 needs sampling) was a 500, found by tests/test_api_fuzz.py
    for body in ({"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]},
                 {"messages": [{"role": "user", "content": "x"}], "temperature": 9}, "not json",
                 {"messages": [{"role": "tool"}], "comparison": "off", "n": 2, "temperature": 0}):
        r = httpx.post(f"{base}/v1/chat/completions", headers=AUTH, **({"json": body} if isinstance(body, dict) else {"content": body}))
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    r = httpx.get(f"{base}/no/such/route")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_unknown_fields_are_ignored(api_server: tuple[str, Settings]) -> None:
    base, settings = api_server
    r = httpx.post(f"{base}/v1/chat/completions", headers=AUTH, json={
        "model": settings.served_model_name, "messages": [{"role": "user", "content": "hi", "x": 1}],
        "max_tokens": 4, "logit_bias": {"1": 2}, "some_future_field": True,
    }, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == "v0"


def test_prompt_longer_than_context_is_refused(api_server: tuple[str, Settings]) -> None:
    base, settings = api_server
    long = "word " * (settings.engine_max_model_len + 10)
    r = httpx.post(f"{base}/v1/chat/completions", headers=AUTH,
                   json={"messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_models_and_probes(client: OpenAI, api_server: tuple[str, Settings]) -> None:
    base, settings = api_server
    models = client.models.list()
    assert [m.id for m in models.data] == [settings.served_model_name]
    assert models.data[0].model_extra and models.data[0].model_extra["version"] == "v0"
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base}/readyz").json()["status"] == "ready"
    metrics = httpx.get(f"{base}/metrics/").text
    assert re.search(r'kaizen_http_requests_total\{method="POST",route="/v1/chat/completions",status="200"\} [1-9]', metrics)
    assert "kaizen_time_to_first_token_seconds_bucket" in metrics
    assert re.search(r"^kaizen_engine_ready 1\.0$", metrics, re.M)


def test_client_disconnect_aborts_generation(api_server: tuple[str, Settings]) -> None:
    base, settings = api_server
    disconnects = metric(base, "kaizen_client_disconnects_total")
    body = {"model": settings.served_model_name, "messages": [{"role": "user", "content": "go on"}],
            "max_tokens": settings.max_tokens_limit, "stream": True, "n": 4, "temperature": 1.0}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{base}/v1/chat/completions", json=body,
                                                             headers=AUTH) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # one real token arrived: now walk away mid-stream
        else:
            pytest.fail("the stream ended before any token arrived")
    deadline = time.monotonic() + 60  # polled: a busy machine takes a while to abort four sequences
    while time.monotonic() < deadline and (
        metric(base, "kaizen_engine_requests_in_flight") > 0
        or metric(base, "kaizen_client_disconnects_total") == disconnects
    ):
        time.sleep(0.1)
    assert metric(base, "kaizen_client_disconnects_total") == disconnects + 1
    assert metric(base, "kaizen_engine_requests_in_flight") == 0


def test_an_idle_pooled_connection_outlives_the_proxys_pool(api_server: tuple[str, Settings]) -> None:
    """KAIZEN_KEEP_ALIVE_S: a proxy that pools connections to the API (nginx `keepalive`) must be the
    one to close an idle connection; uvicorn's default closed it after 5 s, and a POST nginx sent on it
    as it closed came back 502 (tests/test_scale_out.py, "Connection reset by peer"). The same
    connection, idle past uvicorn's default, still answers."""
    base, settings = api_server
    assert settings.keep_alive_s > 30  # deploy/nginx/nginx.conf and tests/lb.py pool for 30 s
    seen: list[str] = []
    trace = {"trace": lambda name, info: seen.append(name)}
    with httpx.Client(limits=httpx.Limits(max_connections=1, keepalive_expiry=60)) as http:
        assert http.get(f"{base}/healthz", extensions=trace).status_code == 200
        assert any(name.startswith("connection.connect_tcp") for name in seen), seen  # the trace sees it
        time.sleep(6.5)
        seen.clear()
        second = http.get(f"{base}/healthz", extensions=trace)
    assert second.status_code == 200
    # reused, not reconnected: no new TCP connection was opened for the second request
    assert not any(name.startswith("connection.connect_tcp") for name in seen), seen
