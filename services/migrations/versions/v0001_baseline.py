"""Baseline: comparisons, outbox, relay_state, leases.

Revision ID: 0001
Revises:
Create Date: 2026-11-28

An API store made before migrations existed (SQLite, same tables created by a
script) is adopted as it is: tables that exist are kept, and only the columns
added since (`choice`, `version_a`/`version_b`, the outbox `key`) are added and,
for the versions, filled from the stored answers.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    tables = set(inspector.get_table_names())
    if "comparisons" not in tables:
        op.create_table(
            "comparisons",
            sa.Column("id", sa.Text(), primary_key=True),
            sa.Column("user", sa.Text(), nullable=False),
            sa.Column("served_at", sa.Text(), nullable=False),
            sa.Column("expires_at", sa.Text(), nullable=False),
            sa.Column("messages", sa.Text(), nullable=False),
            sa.Column("answers", sa.Text(), nullable=False),
            sa.Column("voted_at", sa.Text()),
            sa.Column("event_id", sa.Text()),
            sa.Column("choice", sa.Text()),
            sa.Column("version_a", sa.Text()),
            sa.Column("version_b", sa.Text()),
        )
        op.create_index("comparisons_expiry", "comparisons", ["expires_at"])
    else:
        columns = {c["name"] for c in inspector.get_columns("comparisons")}
        for name in ("choice", "version_a", "version_b"):
            if name not in columns:
                op.add_column("comparisons", sa.Column(name, sa.Text()))
        if "version_a" not in columns:  # only an old SQLite store lacks them
            op.execute("UPDATE comparisons SET version_a = json_extract(answers, '$[0].model_version'), "
                       "version_b = json_extract(answers, '$[1].model_version')")
    if "comparisons_voted" not in {i["name"] for i in sa.inspect(bind).get_indexes("comparisons")}:
        op.create_index("comparisons_voted", "comparisons", ["voted_at"])
    if "outbox" not in tables:
        op.create_table(
            "outbox",
            sa.Column("seq", BIGINT, primary_key=True, autoincrement=True),
            sa.Column("event_id", sa.Text(), nullable=False, unique=True),
            sa.Column("comparison_id", sa.Text(), nullable=False),
            sa.Column("key", sa.Text()),
            sa.Column("payload", sa.LargeBinary(), nullable=False),
            sa.Column("created_at", sa.Text(), nullable=False),
            sa.Column("delivered_at", sa.Text()),
            sqlite_autoincrement=True,
        )
        op.create_index("outbox_pending", "outbox", ["delivered_at", "seq"])
    elif "key" not in {c["name"] for c in inspector.get_columns("outbox")}:
        op.add_column("outbox", sa.Column("key", sa.Text()))
    if "relay_state" not in tables:
        op.create_table(
            "relay_state",
            sa.Column("partition", sa.Integer(), primary_key=True, autoincrement=False),
            sa.Column("max_offset", sa.BigInteger(), nullable=False),
        )
    op.create_table(
        "leases",
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("info", sa.Text()),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    for name in ("leases", "relay_state", "outbox", "comparisons"):
        op.drop_table(name)
