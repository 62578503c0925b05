"""The code's shape (#20): no module over MAX_MODULE_LINES lines and no function over
MAX_FUNCTION_LINES lines in the Python code (services/, trainer/, kaizen/, simulation/, bench/), so a
newcomer finds each stage in one room and reads each step in one screen.

    python -m pytest tests/test_code_shape.py -q

A function's length counts from its `def` to its last line, docstring included. The
allow-list below names what is over the limit on purpose, each with its reason; it is
meant to shrink, never to grow without a reason a reviewer accepts.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("services", "trainer", "kaizen", "simulation", "bench")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

ALLOWED_MODULES: dict[str, str] = {}
"""Module path (relative to the repository) → why it may be longer."""

ALLOWED_FUNCTIONS: dict[str, str] = {}
"""`path:qualified.name` → why it may be longer."""


def python_files() -> list[Path]:
    files = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py")
                   if "migrations" not in p.parts or p.name == "env.py")
    assert len(files) > 40, files  # the walk found the code
    return files


def functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, int]]:
    """(qualified name, length in lines) of every function and method, nested ones included."""
    found: list[tuple[str, int]] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            name = f"{prefix}{node.name}"
            found.append((name, (node.end_lineno or node.lineno) - node.lineno + 1))
            found += functions(node, f"{name}.")
        elif isinstance(node, ast.ClassDef):
            found += functions(node, f"{prefix}{node.name}.")
        else:
            found += functions(node, prefix)
    return found


def test_no_module_is_too_long() -> None:
    too_long = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in python_files()}
    offenders = {path: n for path, n in too_long.items() if n > MAX_MODULE_LINES and path not in ALLOWED_MODULES}
    assert offenders == {}, f"modules over {MAX_MODULE_LINES} lines (split them by concept): {offenders}"
    stale = [path for path in ALLOWED_MODULES if too_long.get(path, 0) <= MAX_MODULE_LINES]
    assert stale == [], f"allowed but no longer too long (take them off the list): {stale}"


def test_no_function_is_too_long() -> None:
    lengths: dict[str, int] = {}
    for path in python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, n in functions(tree):
            lengths[f"{path.relative_to(ROOT)}:{name}"] = n
    offenders = {name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES and name not in ALLOWED_FUNCTIONS}
    assert offenders == {}, f"functions over {MAX_FUNCTION_LINES} lines (name their steps): {offenders}"
    stale = [name for name in ALLOWED_FUNCTIONS if lengths.get(name, 0) <= MAX_FUNCTION_LINES]
    assert stale == [], f"allowed but no longer too long (take them off the list): {stale}"


def test_the_walk_measures_what_it_should(tmp_path: Path) -> None:
    """The measuring itself: a method and a nested function are found with their lengths."""
    source = "class A:\n    def m(self):\n        def inner():\n            return 1\n        return inner()\n"
    assert dict(functions(ast.parse(source))) == {"A.m": 4, "A.m.inner": 2}
