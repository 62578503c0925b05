"""Settings: one class, KAIZEN_ prefix, secrets masked, unsafe production refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from kaizen.core.settings import Settings
from tests.conftest import ROOT


def test_defaults_need_no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAIZEN_DATA_DIR", raising=False)
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.port == 8000 and s.host == "127.0.0.1"
    assert str(s.data_dir) == ".kaizen"
    assert s.embedded_broker and s.bootstrap_servers == "127.0.0.1:9092"
    assert s.model_dir == s.data_dir / "models" / "SmolLM2-135M-Instruct"


def test_environment_overrides_and_key_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAIZEN_PORT", "9100")
    monkeypatch.setenv("KAIZEN_API_KEYS", "k-one, k-two,,")
    monkeypatch.setenv("KAIZEN_KAFKA_BOOTSTRAP", "kafka-0:9092,kafka-1:9092")
    s = Settings()
    assert s.port == 9100
    assert [k.get_secret_value() for k in s.api_keys] == ["k-one", "k-two"]
    assert not s.embedded_broker and s.bootstrap_servers == "kafka-0:9092,kafka-1:9092"
    # a child process started with child_env() sees exactly the same settings
    monkeypatch.delenv("KAIZEN_PORT")
    child = subprocess.run([sys.executable, "-c", "from kaizen.core.settings import Settings; "
                            "import sys; sys.stdout.write(Settings().model_dump_json())"],
                           env=s.child_env(), cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(child.stdout)["port"] == 9100


def test_bad_values_name_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAIZEN_PORT", "99999")
    with pytest.raises(ValidationError, match="port"):
        Settings()


def test_a_round_kl_cap_needs_the_guard_that_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """KAIZEN_PPO_ROUND_KL is read by the update's guard: without the guard's KL it would be ignored
    silently, so the settings refuse it and say what it needs."""
    monkeypatch.setenv("KAIZEN_PPO_ROUND_KL", "1.5")
    assert Settings(_env_file=None).ppo_round_kl == 1.5  # type: ignore[call-arg]
    for name in ("KAIZEN_PPO_SANITY_EVERY", "KAIZEN_PPO_GUARD_KL_FRACTION"):
        with monkeypatch.context() as m:
            m.setenv(name, "0")
            with pytest.raises(ValidationError, match="KAIZEN_PPO_ROUND_KL needs the update's guard"):
                Settings(_env_file=None)  # type: ignore[call-arg]


def test_production_refuses_placeholders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAIZEN_ENVIRONMENT", "production")
    with pytest.raises(ValidationError, match="KAIZEN_API_KEYS"):
        Settings()
    monkeypatch.setenv("KAIZEN_API_KEYS", "real-key")
    monkeypatch.setenv("KAIZEN_ADMIN_TOKEN", "changeme")
    with pytest.raises(ValidationError, match="KAIZEN_ADMIN_TOKEN"):
        Settings()
    monkeypatch.setenv("KAIZEN_ADMIN_TOKEN", "s3cret-admin")
    assert Settings().environment == "production"


def test_kaizen_config_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    env = Settings(api_keys="user-key-123", admin_token="admin-secret-456").child_env()  # type: ignore[arg-type]
    out = subprocess.run([sys.executable, "-m", "kaizen", "config", "--json"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "user-key-123" not in out.stdout and "admin-secret-456" not in out.stdout
    shown = json.loads(out.stdout)
    assert shown["api_keys"] == ["**********"] and shown["admin_token"] == "**********"
    assert shown["port"] == 8000


def test_kafka_security_reaches_every_client_through_one_method(tmp_path: Path) -> None:
    plain = Settings(data_dir=tmp_path)
    assert plain.kafka_options() == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "PLAINTEXT",
                                     "bootstrap_timeout_ms": 10_000}
    assert plain.kafka_options(bootstrap_timeout_s=2.5)["bootstrap_timeout_ms"] == 2500
    scram = Settings(data_dir=tmp_path, kafka_bootstrap="kafka:9093", kafka_security_protocol="SASL_SSL",
                     kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="kaizen",
                     kafka_sasl_password="s3cret",  # type: ignore[arg-type]
                     kafka_ssl_cafile=tmp_path / "ca.pem")
    assert scram.kafka_options() == {
        "bootstrap_servers": "kafka:9093", "security_protocol": "SASL_SSL", "bootstrap_timeout_ms": 10_000,
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "kaizen", "sasl_plain_password": "s3cret",
        "ssl_cafile": str(tmp_path / "ca.pem")}
    assert "s3cret" not in str(scram.masked())
    with pytest.raises(ValueError, match="KAIZEN_KAFKA_SASL_MECHANISM"):
        Settings(data_dir=tmp_path, kafka_security_protocol="SASL_PLAINTEXT")
    from kafka import KafkaProducer

    # kafka-python refuses unknown parameter names ("Unrecognized configs"): these pass
    KafkaProducer(**scram.kafka_options(), api_version=(2, 8)).close(timeout=0)
    with pytest.raises(ValueError, match="Unrecognized configs"):
        KafkaProducer(**scram.kafka_options(), sasl_password="typo", api_version=(2, 8))


def test_long_durations_reach_child_processes(tmp_path: Path) -> None:
    """`kaizen up` hands settings to its children through the environment: 30 days must survive it."""
    s = Settings(data_dir=tmp_path, round_interval="P30D", canary_max_duration="PT0.5S")  # type: ignore[arg-type]
    env = s.child_env()
    assert env["KAIZEN_ROUND_INTERVAL"] == "PT2592000S"
    child = Settings.model_validate({"round_interval": env["KAIZEN_ROUND_INTERVAL"],
                                     "canary_max_duration": env["KAIZEN_CANARY_MAX_DURATION"]})
    assert (child.round_interval, child.canary_max_duration) == (s.round_interval, s.canary_max_duration)
