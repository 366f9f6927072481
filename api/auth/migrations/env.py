"""Alembic environment of the auth database."""

from api.auth.models import Base
from pms.db import run_migrations_env

run_migrations_env(Base.metadata)
