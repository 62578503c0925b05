"""The embedded broker (real Tansu) and the topic helpers that also serve Apache Kafka."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer

from kaizen.core import broker as broker_mod
from kaizen.core.settings import Settings
from tests.conftest import ROOT, make_settings


def test_topics_exist_and_creation_is_idempotent(broker: Settings) -> None:
    admin = broker_mod.admin_client(broker)
    try:
        assert set(broker_mod.topics(broker)) <= set(admin.list_topics())
    finally:
        admin.close()
    assert broker_mod.ensure_topics(broker) == []  # nothing left to create


def test_produce_and_consume_roundtrip(broker: Settings) -> None:
    topic = f"test.roundtrip.{uuid.uuid4().hex[:8]}"
    broker_mod.ensure_topics(broker, [topic])
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all", enable_idempotence=True)
    for i in range(5):
        producer.send(topic, key=b"k", value=f"m{i}".encode()).get(timeout=10)
    producer.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=broker.bootstrap_servers, auto_offset_reset="earliest",
                             group_id=f"g-{uuid.uuid4().hex[:6]}", enable_auto_commit=False,
                             session_timeout_ms=broker.kafka_session_timeout_ms,
                             max_poll_interval_ms=broker.kafka_max_poll_interval_ms)
    got: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(got) < 5 and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            got.extend(r.value for r in records)
    consumer.close()
    assert got == [b"m0", b"m1", b"m2", b"m3", b"m4"]


def test_second_broker_on_same_port_is_refused_clearly(broker: Settings) -> None:
    with pytest.raises(broker_mod.BrokerError, match="already in use"):
        broker_mod.start_embedded_broker(broker)


def test_kaizen_broker_with_external_bootstrap_starts_no_broker(broker: Settings, tmp_path) -> None:
    # The fixture broker plays "Apache Kafka": with KAIZEN_KAFKA_BOOTSTRAP set, the
    # command only makes sure the topics exist there and exits.
    external = broker.model_copy(update={"kafka_bootstrap": broker.bootstrap_servers,
                                         "broker_port": 1, "data_dir": tmp_path})
    out = subprocess.run([sys.executable, "-m", "kaizen", "broker"], env=external.child_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "no embedded broker started" in out.stdout
    assert "topics created: none missing" in out.stdout


def test_kaizen_broker_command_runs_and_stops(tmp_path) -> None:
    settings = make_settings(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "kaizen", "broker"], env=settings.child_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "topics created" in first and settings.topic_preferences in first, first
        assert broker_mod.port_in_use(settings.broker_host, settings.broker_port)
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    deadline = time.monotonic() + 5
    while broker_mod.port_in_use(settings.broker_host, settings.broker_port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not broker_mod.port_in_use(settings.broker_host, settings.broker_port)
