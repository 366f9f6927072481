"""Alembic environment of the billing database (run by ``pms.db.migrate(settings, "billing")``)."""

from billing.models import Base
from pms.db import run_migrations_env

run_migrations_env(Base.metadata)
