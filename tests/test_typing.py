"""The whole package (services/, trainer/, kaizen/, simulation/) type-checks under mypy --strict
(configured in pyproject.toml: `files`)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_the_package_passes_mypy_strict() -> None:
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-5000:]
