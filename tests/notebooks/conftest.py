"""Shared fixtures of the notebook tests: a migrated analytics database with known synthetic rows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.fixtures.servers import ServerSet
from tests.notebooks import factories


@pytest.fixture(scope="module")
def analytics_engine(servers: ServerSet) -> Iterator[Engine]:
    """App-role engine on a migrated, emptied analytics database (what the pipeline may do)."""
    engine = factories.migrate_analytics(servers.settings)
    factories.reset_analytics(engine)
    yield engine
    factories.reset_analytics(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def synthetic(analytics_engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """300 synthetic patients (12 deleted) and 2 dead letters loaded into the analytics tables."""
    rows = factories.analytics_rows(patients=300, deleted=12)
    factories.load(analytics_engine, rows, dead_letters=2)
    return rows
