"""Schemathesis over /openapi.json: the chat and feedback routes never answer 5xx,
and every error they give has OpenAI's shape. Runs against the real server and engine.

(schemathesis' own pytest plugin fails on pytest 9 here — `'Function' object has no
attribute '_nodeid'` — so each operation's Hypothesis strategy is driven directly.)
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from services.settings import Settings
from tests.conftest import USER_KEY

ROUTES = ["/v1/chat/completions", "/v1/feedback"]


@pytest.mark.parametrize("path", ROUTES)
def test_no_server_errors_and_openai_error_shape(api_server: tuple[str, Settings], path: str) -> None:
    base, _ = api_server
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    operation = next(op for op in operations if op.path == path)
    seen: set[int] = set()

    @given(case=operation.as_strategy())
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: Any) -> None:
        response = case.call(base_url=base, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=60)
        seen.add(response.status_code)
        assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
        if response.status_code >= 400:
            body = response.json()
            assert set(body) == {"error"}, body
            assert set(body["error"]) == {"message", "type", "param", "code"}, body
            assert body["error"]["message"] and body["error"]["type"]

    check()
    assert seen, "no request was made"
