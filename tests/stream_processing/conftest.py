"""Fixtures of the pipeline tests: the migrated analytics database, emptied per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from pms import db
from tests.fixtures.servers import ServerSet
from tests.stream_processing.helpers import truncate


@pytest.fixture(scope="session")
def analytics_engine(servers: ServerSet) -> Iterator[Engine]:
    db.migrate(servers.settings, "analytics")
    engine = db.make_engine(servers.settings.database_url_for("analytics"), pool_size=2)
    yield engine
    engine.dispose()


@pytest.fixture
def analytics(analytics_engine: Engine) -> Engine:
    """The analytics database with every table empty."""
    truncate(analytics_engine)
    return analytics_engine
