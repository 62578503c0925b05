"""Alembic environment: migrations run on the connection `services.db.migrate` hands over.

    from services.db import make_engine, migrate; migrate(make_engine(URL))

No alembic.ini: the script location and the connection come from code, so the
API applies migrations at start with the same settings it serves with (under a
lock on PostgreSQL: replicas starting together migrate once). A new migration
(then write its upgrade() with `op.*`, keep services/db.py's tables equal):

    .venv/bin/python -c "from alembic.config import Config; from alembic import command; \
        c = Config(); c.set_main_option('script_location', 'services/migrations'); \
        c.set_main_option('file_template', 'v%%(rev)s_%%(slug)s'); command.revision(c, 'what', rev_id='0003')"
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
