"""The real platform behind the gateway, started once per test session for the dashboard tests.

Every service runs as a real ``pms serve`` process on the session's PostgreSQL and broker.
Services whose code has not landed yet are reported, so a test can skip with the reason.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from pms import process
from pms.registry import by_name
from pms.settings import Settings
from tests.fixtures.servers import ServerSet
from tests.fixtures.services import ServiceProcess

ADMIN_EMAIL = "admin@pms.local"
ADMIN_PASSWORD = "dashboard-e2e-admin-password"
#: Write path and login: enough for the login, register and search tests.
CORE = ("billing", "auth", "patient", "gateway")
#: Needed in addition for the analytics tiles.
ANALYTICS = ("pipeline", "analytics")


def missing_services(names: tuple[str, ...]) -> list[str]:
    """Registered services whose target module cannot be imported yet."""
    missing = []
    for name in names:
        module = by_name(name).target.partition(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


@dataclass
class Stack:
    settings: Settings
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    @property
    def gateway_url(self) -> str:
        return self.settings.gateway.base_url

    @property
    def has_analytics(self) -> bool:
        return all(name in self.services for name in ANALYTICS)


def stack_settings(servers: ServerSet) -> Settings:
    port = process.free_port
    return servers.make_settings(
        admin_email=ADMIN_EMAIL,
        admin_password=SecretStr(ADMIN_PASSWORD),
        patient={"port": port(), "seed_demo_data": False},
        auth={"port": port()},
        gateway={"port": port()},
        analytics={"port": port()},
        billing={"port": port()},
        dashboard={"port": port()},
        pipeline={"port": port()},
    )


@contextmanager
def running_stack(servers: ServerSet, log_dir: Path) -> Iterator[Stack]:
    """Start every available service in dependency order; stop them in reverse."""
    stack = Stack(stack_settings(servers))
    with_analytics = not missing_services(ANALYTICS)
    order = ("billing", "auth", "patient", *(ANALYTICS if with_analytics else ()), "gateway")
    try:
        for name in order:
            svc = ServiceProcess(name, stack.settings, log_dir / f"{name}.log")
            stack.services[name] = svc
            svc.start(timeout=90)
        yield stack
    finally:
        for svc in reversed(list(stack.services.values())):
            svc.stop()
