"""Fuzzing the API: no request, however malformed, gets a 5xx, and every error has OpenAI's shape.

    python -m pytest tests/test_api_fuzz.py -q

- Schemathesis over /openapi.json against the real server and engine: the chat and feedback
  routes, and every read-only (GET) operation of the schema (admin ones with the admin token).
  (schemathesis' own pytest plugin fails on pytest 9 here — `'Function' object has no
  attribute '_nodeid'` — so each operation's Hypothesis strategy is driven directly.)
- Hypothesis over POST /v1/feedback with random bodies (bytes, any JSON, vote-shaped JSON with
  wrong types) and random headers (any name and latin-1 value, credentials right and wrong,
  content types, forwarded-for addresses), #19 "Done when". It runs against its own instance of
  the real app (uvicorn in a thread, no engine: the vote route needs none), so its wrong keys
  count against no shared server's failed-authentication limit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.app import build_app
from services.auth import user_id
from kaizen.core.events import Answer
from kaizen.core.settings import Settings
from tests.conftest import ADMIN_TOKEN, OTHER_KEY, USER_KEY, make_settings
from tests.test_security import app_server

ROUTES = ["/v1/chat/completions", "/v1/feedback"]


def schema_operations(base: str) -> list[Any]:
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    return [r.ok() for r in schema.get_all_operations()]


def get_operations(base: str) -> list[str]:
    return sorted(op.path for op in schema_operations(base) if op.method.upper() == "GET")


def assert_no_server_error(status: int, text: str, what: Any) -> None:
    """Below 500, and every error (4xx) in OpenAI's shape."""
    assert status < 500, (what, status, text[:500])
    if status >= 400:
        body = json.loads(text)
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["message"] and body["error"]["type"]


def fuzz_operation(base: str, path: str, method: str, token: str, max_examples: int) -> set[int]:
    operation = next(op for op in schema_operations(base) if op.path == path and op.method.upper() == method)
    seen: set[int] = set()

    @given(case=operation.as_strategy())
    @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: Any) -> None:
        response = case.call(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        seen.add(response.status_code)
        assert_no_server_error(response.status_code, response.text, case.body)

    check()
    return seen


@pytest.mark.parametrize("path", ROUTES)
def test_no_server_errors_and_openai_error_shape(api_server: tuple[str, Settings], path: str) -> None:
    base, _ = api_server
    assert fuzz_operation(base, path, "POST", USER_KEY, 40), "no request was made"


def test_no_server_errors_on_read_only_operations(api_server: tuple[str, Settings]) -> None:
    """#19 "Done when": schemathesis over every GET operation of the OpenAPI finds no 5xx (path and
    query parameters: versions, limits). Admin routes are called with the admin token."""
    base, _ = api_server
    paths = get_operations(base)
    assert {"/v1/models", "/admin/versions/{version}", "/admin/audit"} <= set(paths), paths
    for path in paths:
        token = ADMIN_TOKEN if path.startswith("/admin") else USER_KEY
        assert fuzz_operation(base, path, "GET", token, 15), path


# -- POST /v1/feedback: random bodies and random headers ----------------------------------------

#: Framing headers are uvicorn's to parse (a random Content-Length would make the client and server
#: wait on each other); chunked framing is tested in tests/test_security.py (#19 item 1).
FRAMING = {"content-length", "transfer-encoding", "connection", "upgrade", "expect", "te", "trailer",
           "keep-alive", "http2-settings"}
TOKEN_CHARS = "!#$%&'*+.^_`|~-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
LATIN1 = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
HEADER_NAMES = st.one_of(
    st.sampled_from(["authorization", "Authorization", "content-type", "content-encoding", "accept",
                     "accept-encoding", "x-forwarded-for", "forwarded", "host", "origin", "cookie",
                     "user-agent", "x-request-id", "x-kaizen-model-version", "range"]),
    st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=30),
).filter(lambda name: name.lower() not in FRAMING)
HEADER_VALUES = st.one_of(
    st.text(alphabet=LATIN1, max_size=120),
    st.sampled_from(["application/json", "application/json; charset=latin-1", "application/json; charset=nope",
                     "text/plain", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded",
                     "gzip", "deflate", "br", "Bearer", "Bearer ", "Basic dXNlcjpwdw==", "1.2.3.4, ::1",
                     "for=\"[::1]\";proto=https", "::1", "0.0.0.0"]),
).map(lambda v: v.strip(" \t"))  # h11 refuses a value that starts or ends with whitespace, client-side
AUTHORIZATION = st.one_of(
    st.just(f"Bearer {USER_KEY}"),  # often right, so bodies reach the vote itself
    st.none(),
    st.sampled_from([f"Bearer {USER_KEY}", f"Bearer {OTHER_KEY}", f"bearer {USER_KEY}", f"Bearer {ADMIN_TOKEN}",
                     f"Bearer {USER_KEY}x", "Bearer", USER_KEY]),
    st.text(alphabet=LATIN1, max_size=80).map(lambda v: f"Bearer {v}".strip(" \t")),
)
CONTENT_TYPE = st.one_of(st.just("application/json"), st.none(), HEADER_VALUES)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def vote_bodies(comparison_ids: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Vote-shaped JSON: real and unknown comparisons, right and wrong choices, extra fields."""
    return st.fixed_dictionaries(
        {"comparison_id": st.one_of(st.sampled_from(comparison_ids), st.text(max_size=80), JSON),
         "choice": st.one_of(st.sampled_from([0, 1, "tie", "both_bad", 2, -1, "0", 1.0, True]), JSON)},
        optional={"reason": st.one_of(st.text(max_size=600), JSON), "extra": JSON, "user": JSON},
    )


def bodies(comparison_ids: list[str]) -> st.SearchStrategy[bytes]:
    valid = st.fixed_dictionaries({"comparison_id": st.sampled_from(comparison_ids),
                                   "choice": st.sampled_from([0, 1, "tie", "both_bad"])},
                                  optional={"reason": st.text(max_size=600)})
    return st.one_of(
        valid.map(lambda v: json.dumps(v).encode()),  # reaches the vote itself, with any headers
        st.binary(max_size=1500),  # also past the fuzzed server's 1024-byte body limit
        JSON.map(lambda v: json.dumps(v).encode()),
        vote_bodies(comparison_ids).map(lambda v: json.dumps(v).encode()),
        st.text(alphabet=LATIN1, max_size=300).map(lambda v: v.encode("latin-1")),
    )


def test_feedback_fuzz_random_bodies_and_headers(tmp_path: Path) -> None:
    """#19 "Done when": POST /v1/feedback with random bodies and random headers never answers
    5xx, and its errors have OpenAI's shape. Votes on real comparisons succeed among them."""
    fuzzed = make_settings(tmp_path, api_keys=f"{USER_KEY},{OTHER_KEY}", admin_token=ADMIN_TOKEN,
                           rate_limit_rps=10_000, rate_limit_burst=10_000, max_body_bytes=1024,
                           auth_failure_limit=1_000_000)  # keep checking keys: wrong ones are most cases
    app = build_app(fuzzed)
    answers = [Answer(text="a", model_version="v0"), Answer(text="b", model_version="v0")]
    ids = [str(app.state.comparisons.record(user_id(app.state.user_secret, USER_KEY),
                                            [{"role": "user", "content": "q"}], answers)) for _ in range(30)]
    seen: dict[int, int] = {}

    with app_server(fuzzed, app) as base, httpx.Client(base_url=base, timeout=60) as client:

        @given(body=bodies(ids), headers=st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=6),
               authorization=AUTHORIZATION, content_type=CONTENT_TYPE)
        @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)
        def check(body: bytes, headers: dict[str, str], authorization: str | None,
                  content_type: str | None) -> None:
            # these first: the server reads the first of repeated headers (FastAPI parses JSON only
            # when the content type says so)
            drawn = (("Authorization", authorization), ("Content-Type", content_type))
            raw = [(k.encode(), v.encode("latin-1")) for k, v in drawn if v is not None]
            raw += [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]
            response = client.post("/v1/feedback", content=body, headers=raw)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert_no_server_error(response.status_code, response.text, (body[:200], raw))

        check()
    print("statuses seen:", seen)
    # the fuzz reached the vote itself, not only the checks in front of it
    assert 202 in seen and 401 in seen and 413 in seen and (400 in seen or 422 in seen), seen
