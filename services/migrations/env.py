"""Alembic environment: migrations run on the connection `services.db.migrate` hands over.

    from services.db import make_engine, migrate; migrate(make_engine(URL))

No alembic.ini: the script location and the connection come from code, so the
API applies migrations at start with the same settings it serves with.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
