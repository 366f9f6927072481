"""The billing migrations: they build exactly the tables models.py declares, and undo cleanly."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import URL

from billing.models import Base
from pms import db
from pms.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def scratch_url(billing_settings: Settings) -> Iterator[URL]:
    """A throwaway database, so up/down migrations never touch the shared billing database."""
    name = f"billing_mig_{uuid.uuid4().hex[:12]}"
    admin = db.make_engine(billing_settings.database_url_for("billing"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield billing_settings.database_url_for("billing").set(database=name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_upgrade_matches_models_and_downgrade_removes_everything(billing_settings: Settings, scratch_url: URL) -> None:
    db.migrate(billing_settings, "billing", url=scratch_url)
    db.migrate(billing_settings, "billing", url=scratch_url)  # idempotent: every service start runs it
    engine = db.make_engine(scratch_url, pool_size=1)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diff == [], f"models.py and the migrations disagree: {diff}"
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0001_billing_accounts"
        from alembic import command

        command.downgrade(db.alembic_config(billing_settings, "billing", url=scratch_url), "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
