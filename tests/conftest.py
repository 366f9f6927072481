"""Session-wide real servers and helpers shared by every test package.

Fixtures:
- ``servers``: the session's PostgreSQL + broker (``PMS_TEST_BACKEND``, see fixtures/servers.py)
- ``settings``: a ``Settings`` pointing at them (fresh ports for services, same secrets)
- ``start_service``: start a registered service as a real process, stopped at test end
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pms import process
from pms.settings import Settings
from tests.fixtures.servers import TEST_AUTH_LIMITS, ServerSet, server_data_dir, start_servers
from tests.fixtures.services import ServiceProcess


@pytest.fixture(scope="session")
def servers() -> Iterator[ServerSet]:
    with server_data_dir() as data_dir, start_servers(data_dir) as running:
        yield running


def _with_free_ports(servers: ServerSet) -> Settings:
    port = process.free_port
    return servers.make_settings(
        patient={"port": port()},
        auth={"port": port(), **TEST_AUTH_LIMITS},
        gateway={"port": port()},
        analytics={"port": port()},
        billing={"port": port(), "metrics_port": port()},
        dashboard={"port": port()},
        pipeline={"port": port()},
    )


@pytest.fixture
def settings(servers: ServerSet) -> Settings:
    """Settings on the session servers, with free ports for every service."""
    return _with_free_ports(servers)


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    started: list[ServiceProcess] = []

    def _start(name: str, settings: Settings, *, timeout: float = 60.0) -> ServiceProcess:
        svc = ServiceProcess(name, settings, tmp_path / f"{name}.log").start(timeout=timeout)
        started.append(svc)
        return svc

    yield _start
    for svc in reversed(started):
        svc.stop()
