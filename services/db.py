"""The API's store as a database: SQLite in the data dir, or a PostgreSQL server several replicas share.

    kaizen serve                                                     # <data_dir>/api.sqlite
    KAIZEN_DATABASE_URL=postgresql://kaizen:secret@db/kaizen kaizen serve   # the shared server

One code path over both: SQLAlchemy Core (no ORM) with psycopg 3 for PostgreSQL.
Why Core rather than psycopg behind a thin interface of our own: one dialect layer
writes the SQL for both backends (upserts, `FOR UPDATE SKIP LOCKED` through
`with_for_update`, window functions), it brings a maintained connection pool with
pre-ping and overflow, and Alembic, the migration tool, is built on it; the thin
interface would have re-implemented each of these, twice. The ORM is not used: the
store is a handful of tables read and written by explicit statements.
The tables are declared here; their history lives in Alembic migrations
(services/migrations), run at start under a lock so replicas starting together
migrate once. What differs by backend is small and local:

* SQLite: one writer at a time. Every transaction starts with BEGIN IMMEDIATE
  (the pysqlite recipe in SQLAlchemy's docs), so a vote's read-check-write
  cannot interleave with another's; WAL with synchronous=NORMAL as before.
* PostgreSQL: a pool with pre-ping (a restarted server is noticed on checkout),
  connect and statement timeouts, row locks (`FOR UPDATE`) where SQLite relies
  on its single writer, and `SKIP LOCKED` so outbox relays share the work.

A server that cannot be reached surfaces as `DatabaseUnavailable` (the API
answers 503 with Retry-After; a vote is either committed or refused, never
half taken).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (BigInteger, Column, Float, Index, Integer, LargeBinary, MetaData, Table, Text,
                        create_engine, event, exc, text)
from sqlalchemy.engine import Connection, Engine, make_url

from kaizen.core.settings import Settings

log = logging.getLogger(__name__)

metadata = MetaData()

#: Served pairs and their vote (services/comparisons.py).
comparisons = Table(
    "comparisons", metadata,
    Column("id", Text, primary_key=True),
    Column("user", Text, nullable=False),
    Column("served_at", Text, nullable=False),  # ISO 8601, UTC: sorts as it reads
    Column("expires_at", Text, nullable=False),
    Column("messages", Text, nullable=False),  # JSON, the conversation up to the answered turn
    Column("answers", Text, nullable=False),  # JSON, two Answer objects
    Column("voted_at", Text),
    Column("event_id", Text),
    Column("choice", Text),
    Column("version_a", Text),  # answers[0].model_version, for the head-to-head without JSON functions
    Column("version_b", Text),
    Index("comparisons_expiry", "expires_at"),
    Index("comparisons_voted", "voted_at"),
    Index("comparisons_user_voted", "user", "voted_at"),  # a voter's recent votes (the vote limit), erasure
)

#: Accepted votes waiting for (or kept after) delivery to Kafka (services/outbox.py).
outbox = Table(
    "outbox", metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("event_id", Text, nullable=False, unique=True),
    Column("comparison_id", Text, nullable=False),
    Column("key", Text),  # the Kafka key: the pseudonymous user (NULL in rows from before it existed)
    Column("payload", LargeBinary, nullable=False),  # the Preference event, JSON bytes as sent to Kafka
    Column("created_at", Text, nullable=False),
    Column("delivered_at", Text),
    Index("outbox_pending", "delivered_at", "seq"),
    sqlite_autoincrement=True,  # seq never reused: the backlog bound relies on it growing
)

#: Highest offset the broker acknowledged, per partition (the relay's loss check).
relay_state = Table(
    "relay_state", metadata,
    Column("partition", Integer, primary_key=True, autoincrement=False),
    Column("max_offset", BigInteger, nullable=False),
)

#: Named leases: the rollout leader (services/leader.py) and the decision it last made.
leases = Table(
    "leases", metadata,
    Column("name", Text, primary_key=True),
    Column("holder", Text, nullable=False),
    Column("expires_at", Float, nullable=False),  # unix time
    Column("info", Text),  # JSON the holder publishes (the rollout decision)
    Column("updated_at", Float, nullable=False),
)

#: Each replica's health numbers per model version, so the rollout leader judges error rate and
#: latency from every replica's traffic (services/rollout.py). Counts are since the replica started.
version_health = Table(
    "version_health", metadata,
    Column("replica", Text, primary_key=True),
    Column("version", Text, primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("ttft_p50_s", Float),  # median time to first token of the replica's recent requests
    Column("updated_at", Float, nullable=False),  # unix time
)

#: Key of the advisory lock that serialises migrations of replicas starting together.
MIGRATION_LOCK = 0x6B61697A656E  # "kaizen"
READ_ONLY = "kaizen_read_only"
"""Execution option of a connection that only reads: SQLite begins it without the write lock."""


class DatabaseUnavailable(Exception):
    """The store cannot be reached (or timed out); the caller should retry later."""


def url_of(settings: Settings) -> str:
    """The SQLAlchemy URL: KAIZEN_DATABASE_URL with the psycopg 3 driver, or SQLite in the data dir."""
    if settings.database_url is None:
        return f"sqlite:///{settings.api_db}"
    url = settings.database_url.get_secret_value()
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def masked(url: str) -> str:
    """The URL with its password hidden, for logs and errors."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str, settings: Settings | None = None) -> Engine:
    """An engine for `url` with the pool, timeouts and SQLite transaction recipe described above."""
    if url.startswith("sqlite"):
        path = make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a process crash; only an OS crash can
            # lose the last transactions. FULL would fsync on every vote.
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # a writer takes the write lock up front (no deadlock upgrading a read lock); a
            # reader (`READ_ONLY`) does not, so in WAL mode it never waits behind a writer
            read_only = conn.get_execution_options().get(READ_ONLY)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    s = settings or Settings.model_construct()  # the defaults (no environment), for a bare URL
    return create_engine(
        url,
        pool_size=s.database_pool_size,
        max_overflow=s.database_max_overflow,
        pool_timeout=s.database_pool_timeout_s,
        pool_pre_ping=True,  # a server restart is noticed on checkout, not by the next vote
        pool_recycle=1800,
        connect_args={
            "connect_timeout": s.database_connect_timeout_s,
            "options": f"-c statement_timeout={s.database_statement_timeout_ms}",
            "application_name": "kaizen",
        },
    )


@contextmanager
def reachable(url: str) -> Iterator[None]:
    """Turn "cannot reach / timed out" errors into `DatabaseUnavailable`; others pass through."""
    try:
        yield
    except (exc.OperationalError, exc.InterfaceError, exc.TimeoutError) as e:
        if isinstance(e, exc.OperationalError) and url.startswith("sqlite") and "locked" not in str(e):
            raise  # a SQLite schema or file error is a bug or a broken disk, not an outage
        raise DatabaseUnavailable(f"the database at {masked(url)} is unavailable: {e.__class__.__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from e
    except exc.DBAPIError as e:
        if e.connection_invalidated:
            raise DatabaseUnavailable(f"lost the connection to {masked(url)}: {e.orig}") from e
        raise


def migrate(engine: Engine) -> str | None:
    """Bring the schema to the newest migration; return the revision now current.

    On PostgreSQL the whole upgrade runs in one transaction holding an advisory
    lock, so replicas that start together migrate once and the others wait."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        rev: str | None = MigrationContext.configure(conn).get_current_revision()
    return rev
