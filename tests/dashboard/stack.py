"""The real platform behind the gateway, started once per test session for the dashboard tests.

Every service runs as a real ``pms serve`` process on the session's PostgreSQL and broker.
Services whose code has not landed yet are reported, so a test can skip with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from pms import process
from pms.registry import by_name, serve_command
from pms.settings import Settings, child_env
from tests.fixtures.servers import TEST_AUTH_LIMITS, ServerSet
from tests.fixtures.services import ServiceProcess

#: Its own admin: other modules share the session's auth database and already created
#: admin@pms.local with their own password (the auth service only creates a missing admin).
ADMIN_EMAIL = "dashboard-admin@pms.local"
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
        auth={"port": port(), **TEST_AUTH_LIMITS},
        gateway={"port": port()},
        analytics={"port": port()},
        billing={"port": port(), "metrics_port": port()},
        dashboard={"port": port()},
        pipeline={"port": port()},
    )


#: Start waves: each wave's services start together (their imports dominate start-up time on a
#: busy 2-core box); a wave waits for the previous one to be ready (analytics reads the tables the
#: pipeline migrates; patient, analytics and the gateway want their upstreams).
WAVES = (("billing", "auth", "pipeline"), ("patient", "analytics", "gateway"))


@contextmanager
def running_stack(servers: ServerSet, log_dir: Path) -> Iterator[Stack]:
    """Start every available service, wave by wave; stop them all together at the end."""
    stack = Stack(stack_settings(servers))
    wanted = set(CORE) | (set() if missing_services(ANALYTICS) else set(ANALYTICS))
    try:
        for wave in WAVES:
            started = []
            for name in wave:
                if name in wanted:
                    svc = ServiceProcess(name, stack.settings, log_dir / f"{name}.log")
                    svc.proc = process.spawn(serve_command(by_name(name)),
                                             log_path=svc.log_path, env=child_env(stack.settings))
                    stack.services[name] = svc
                    started.append(svc)
            for svc in started:
                _wait_ready(svc)
        yield stack
    finally:
        running = [svc for svc in stack.services.values() if svc.proc is not None and svc.proc.poll() is None]
        for svc in running:  # signal everyone first, so they shut down in parallel
            try:
                os.killpg(svc.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]
            except ProcessLookupError:
                pass
        for svc in reversed(list(stack.services.values())):
            svc.stop()


def _wait_ready(svc: ServiceProcess, timeout: float = 120.0) -> None:
    try:
        process.wait_until(svc.is_ready, timeout=timeout, interval=0.1, message=f"{svc.name} to be ready",
                           alive=lambda: svc.proc is not None and svc.proc.poll() is None)
    except (TimeoutError, RuntimeError) as exc:
        raise RuntimeError(f"{exc}\n--- {svc.log_path} ---\n{svc.log_tail()}") from exc
