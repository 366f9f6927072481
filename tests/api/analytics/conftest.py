"""Fixtures of the analytics API tests: the analytics database (shared with the pipeline tests) and the app."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.analytics.main import create_app
from pms.settings import Settings
from tests.fixtures.servers import ServerSet
from tests.stream_processing.conftest import analytics, analytics_engine  # noqa: F401 -- re-exported fixtures


@pytest.fixture(scope="module")
def api_settings(servers: ServerSet) -> Settings:
    return servers.make_settings()


@pytest.fixture(scope="module")
def client(api_settings: Settings) -> Iterator[TestClient]:
    """The analytics app in-process, one per test module (its own settings and engine)."""
    with TestClient(create_app(api_settings)) as test_client:
        yield test_client
