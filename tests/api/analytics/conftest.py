"""Fixtures of the analytics API tests: the analytics database (shared with the pipeline tests)."""

from tests.stream_processing.conftest import analytics, analytics_engine  # noqa: F401 -- re-exported fixtures
