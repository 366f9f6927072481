"""Alembic owns the analytics DDL: the migrated database matches the models the code reads."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from stream_processing import models

pytestmark = pytest.mark.integration


def test_migrated_schema_equals_the_models(analytics_engine: Engine) -> None:
    with analytics_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), models.metadata)
    assert diff == []


def test_no_analytics_table_has_a_pii_column(analytics_engine: Engine) -> None:
    inspector = inspect(analytics_engine)
    columns = {c["name"] for t in inspector.get_table_names() for c in inspector.get_columns(t)}
    assert not columns & {"name", "email", "phone", "address", "first_name", "last_name"}
    assert set(models.metadata.tables) <= set(inspector.get_table_names())
