"""Alembic environment: runs on a connection handed in by :func:`services.gateway.db.session.migrate`."""

from alembic import context

from services.gateway.db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `loomis db upgrade` or services.gateway.db.session.migrate")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
