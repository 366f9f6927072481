"""The container health check against a real service bound the way containers bind it (0.0.0.0)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from pms import process
from pms.settings import Settings, to_env
from tests.fixtures.servers import ServerSet
from tests.fixtures.services import ServiceProcess

pytestmark = pytest.mark.integration


def healthcheck(settings: Settings, name: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PMS_")}, **to_env(settings)}
    return subprocess.run([sys.executable, "-m", "infra.healthcheck", name], env=env, capture_output=True,
                          text=True, timeout=60)


def test_billing_on_all_interfaces_is_healthy_then_not_when_gone(
    servers: ServerSet, start_service: Callable[..., ServiceProcess]
) -> None:
    settings = servers.make_settings(billing={"host": "0.0.0.0", "port": process.free_port()})
    billing = start_service("billing", settings)
    result = healthcheck(settings, "billing")
    assert result.returncode == 0, result.stderr
    billing.kill()
    result = healthcheck(settings, "billing")
    assert result.returncode == 1
    assert "billing is not ready" in result.stderr
