"""The whole package (services/, trainer/, kaizen/, simulation/) type-checks under mypy --strict
(configured in pyproject.toml: `files`). mypy runs in the background from the end of collection
(tests/conftest.py); this test reads its verdict."""

from __future__ import annotations

from tests.conftest import mypy_result


def test_the_package_passes_mypy_strict() -> None:
    code, out = mypy_result(timeout_s=600)
    assert code == 0, out[-5000:]
