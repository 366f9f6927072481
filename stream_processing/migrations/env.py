"""Alembic env of the ``analytics`` database (owned by the stream-processing pipeline)."""

from pms.db import run_migrations_env
from stream_processing.models import metadata

run_migrations_env(metadata)
