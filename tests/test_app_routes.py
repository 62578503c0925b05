"""Small route contracts of the chat API, on the real app without an engine (lifespan off).

    python -m pytest tests/test_app_routes.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.app import build_app
from services.comparisons import ComparisonStore
from services.engine import EngineUnavailable
from services.rollout import Rollout
from tests.conftest import make_settings


def test_metrics_answers_at_its_own_path(tmp_path: Path) -> None:
    """GET /metrics is 200 with the exposition text, no 307 to /metrics/ (which still answers)."""
    client = TestClient(build_app(make_settings(tmp_path)), base_url="http://127.0.0.1", follow_redirects=False)
    for path in ("/metrics", "/metrics/"):
        response = client.get(path)
        assert response.status_code == 200, (path, response.status_code, response.headers)
        assert response.headers["content-type"].startswith("text/plain"), response.headers
        assert "kaizen_http_requests_total" in response.text
    openmetrics = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")
    # the scrape is counted under its route, as before
    assert 'kaizen_http_requests_total{method="GET",route="/metrics",status="200"}' in client.get("/metrics").text


def test_a_request_racing_shutdown_gets_the_503_engine_error(tmp_path: Path) -> None:
    """With no champion (stopped, or not loaded yet) routing raises what the API answers 503
    `engine_stopped` to (it raised a `NotReady` nothing handled: a 500)."""
    settings = make_settings(tmp_path)
    comparisons = ComparisonStore.from_settings(settings)
    try:
        rollout = Rollout(settings, comparisons)
        with pytest.raises(EngineUnavailable) as caught:
            rollout.engine_for("someone")
        assert caught.value.reason == "engine_stopped"
    finally:
        comparisons.close()
