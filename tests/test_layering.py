"""Layering: the online side (services/) imports nothing from the offline side (trainer/).

What both sides need (settings, event schemas, the registry, the rounds log reader) lives under
services/ and the trainer imports it from there; the chat API then installs and type-checks
without the trainer. Reads the source with `ast`, so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

FORBIDDEN = "trainer"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import statement in the file, at any depth."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            found.append((node.lineno, str(node.args[0].value)))  # importlib.import_module("trainer.x")
    return found


def test_services_import_nothing_from_trainer() -> None:
    files = sorted((ROOT / "services").rglob("*.py"))
    assert len(files) > 10, files  # the walk found the package
    offenders = [f"{path.relative_to(ROOT)}:{line}: {module}"
                 for path in files for line, module in imported_modules(path)
                 if module == FORBIDDEN or module.startswith(FORBIDDEN + ".")]
    assert offenders == [], "services/ must not import trainer/:\n" + "\n".join(offenders)


def test_nothing_in_the_service_imports_the_simulation_harness() -> None:
    """simulation/ (simulated users, judges, the loop benchmark) drives the service from outside:
    the loop learns from votes only, so neither side may import a judge or the harness."""
    files = sorted((ROOT / "services").rglob("*.py")) + sorted((ROOT / "trainer").rglob("*.py"))
    offenders = [f"{path.relative_to(ROOT)}:{line}: {module}"
                 for path in files for line, module in imported_modules(path)
                 if module == "simulation" or module.startswith("simulation.")]
    assert offenders == [], "services/ and trainer/ must not import simulation/:\n" + "\n".join(offenders)


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from trainer.rounds import read_rounds\n    import trainer.ppo\n"
                      "    importlib.import_module('trainer.reward')\n")
    assert [m for _, m in imported_modules(source)] == ["trainer.rounds", "trainer.ppo", "trainer.reward"]


def private_reads(path: Path) -> list[str]:
    """`obj._name` where obj is not self/cls: another object's or module's private attribute."""
    return [f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}"
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))]


def test_the_daemon_uses_the_public_names_of_the_consumer_and_the_rounds_log() -> None:
    """It read `consumer._stop` (now `consumer.stopping`) and `rounds._state_file` (now
    `services.rounds_log.state_file`)."""
    assert private_reads(ROOT / "trainer" / "daemon.py") == []
