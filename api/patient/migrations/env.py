"""Alembic env of the patients database: the kernel's runner over this service's metadata."""

from api.patient.models import Base
from pms.db import run_migrations_env

run_migrations_env(Base.metadata)
