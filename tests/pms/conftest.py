"""Fixtures of the kernel's own tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.servers import server_data_dir


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A fresh PMS_DATA_DIR that an embedded PostgreSQL can use (see ``server_data_dir``)."""
    with server_data_dir(prefix="pms-kernel-test-") as path:
        yield path / "data"
