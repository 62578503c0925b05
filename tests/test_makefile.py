"""The Makefile's test targets: `make test` runs the whole suite, `make test-fast` the inner loop
(everything not marked `slow`, the marker pyproject.toml declares).

    python -m pytest tests/test_makefile.py -q
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tomllib

import pytest

from tests.conftest import ROOT


def pytest_line(target: str) -> str:
    """The pytest command `make -n <target>` would run (a dry run: nothing is installed or tested)."""
    out = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    lines = [line for line in out.stdout.splitlines() if " -m pytest" in line]
    assert len(lines) == 1, out.stdout
    return lines[0]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_is_the_whole_suite_and_test_fast_leaves_out_slow() -> None:
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("slow:") for m in markers), markers
    assert " -m " not in pytest_line("test").split("-m pytest", 1)[1]
    assert shlex.split(pytest_line("test-fast").split("-m pytest", 1)[1])[:2] == ["-m", "not slow"]
