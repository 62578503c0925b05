"""An index on (user, voted_at) of comparisons: the per-user vote limit reads a voter's recent
votes on every vote, and `kaizen prefs erase` finds a user's rows, without scanning the table.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("comparisons_user_voted", "comparisons", ["user", "voted_at"])


def downgrade() -> None:
    op.drop_index("comparisons_user_voted", table_name="comparisons")
