"""Layering: two sides on one shared floor.

    kaizen/core/   settings, event schemas, the registry, atomic writes, the rounds log, metrics, ...
    services/      the online side (chat API)       -> kaizen.core only
    trainer/       the offline side (training)      -> kaizen.core only
    simulation/    simulated users and judges, driving the service from outside (nobody imports it)

services/ and trainer/ never import each other, kaizen/core/ imports neither (nor the CLI), so the
chat API installs and type-checks without the trainer and the trainer without the API. Reads the
source with `ast`, so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

CLI = tuple(sorted(f"kaizen.{path.stem}" for path in (ROOT / "kaizen").glob("*.py")
                   if path.stem != "__init__"))
"""The command-line modules of the kaizen package: everything in it except the floor, kaizen.core."""


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


def offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert len(files) > 10, files  # the walk found the package
    return [f"{path.relative_to(ROOT)}:{line}: {module}"
            for path in files for line, module in imported_modules(path)
            if any(module == f or module.startswith(f + ".") for f in forbidden)]


def test_services_import_nothing_from_trainer() -> None:
    found = offenders("services", ("trainer",))
    assert found == [], "services/ must not import trainer/:\n" + "\n".join(found)


def test_trainer_imports_nothing_from_services() -> None:
    """What the trainer needs of the online side's world (settings, events, the registry) is the floor."""
    found = offenders("trainer", ("services",))
    assert found == [], "trainer/ must not import services/ (move what both need to kaizen/core/):\n" + \
        "\n".join(found)


def test_the_floor_stands_on_nothing_above_it() -> None:
    found = offenders("kaizen/core", ("services", "trainer", "simulation") + CLI)
    assert found == [], "kaizen/core/ must import only itself and libraries:\n" + "\n".join(found)


def test_both_sides_use_only_the_floor_of_the_cli_package() -> None:
    assert "kaizen.cli" in CLI and "kaizen.supervisor" in CLI, CLI
    found = offenders("services", CLI) + offenders("trainer", CLI)
    assert found == [], "services/ and trainer/ may import kaizen.core, not the CLI:\n" + "\n".join(found)


def test_nothing_in_the_service_imports_the_simulation_harness() -> None:
    """simulation/ (simulated users, judges, the loop benchmark) drives the service from outside:
    the loop learns from votes only, so neither side may import a judge or the harness."""
    found = offenders("services", ("simulation",)) + offenders("trainer", ("simulation",))
    assert found == [], "services/ and trainer/ must not import simulation/:\n" + "\n".join(found)


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
    `kaizen.core.rounds_log.state_file`)."""
    assert private_reads(ROOT / "trainer" / "daemon.py") == []
