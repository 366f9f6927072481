"""A token auth has revoked is refused by the patient and analytics services called directly,
past the gateway (defence in depth: every verifier keeps auth's list, see pms.revocation)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from api.auth import service as auth_service
from pms import process
from pms.settings import Settings
from tests.api.auth.conftest import auth_test_settings
from tests.fixtures.servers import TEST_AUTH_LIMITS, ServerSet
from tests.fixtures.services import ServiceProcess

pytestmark = pytest.mark.integration


@dataclass
class Services:
    settings: Settings
    auth: ServiceProcess
    patient: ServiceProcess
    analytics: ServiceProcess

    def login(self) -> str:
        password = auth_service.admin_password(self.settings)
        assert password is not None
        reply = httpx.post(self.auth.base_url + "/login", json={"email": self.settings.admin_email,
                                                                 "password": password}, timeout=10)
        assert reply.status_code == 200, reply.text
        return reply.json()["token"]


@pytest.fixture(scope="module")
def services(servers: ServerSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    port = process.free_port
    settings = auth_test_settings(
        servers,
        auth={"port": port(), **TEST_AUTH_LIMITS},
        patient={"port": port()},
        analytics={"port": port()},
        jwt=servers.settings.jwt.model_copy(update={"revocation_refresh_s": 0.2}),
    )
    logs = tmp_path_factory.mktemp("revocation")
    started: list[ServiceProcess] = []
    try:
        for name in ("auth", "patient", "analytics"):
            started.append(ServiceProcess(name, settings, logs / f"{name}.log").start(timeout=90))
        yield Services(settings, *started)
    finally:
        for svc in reversed(started):
            svc.stop()


ROUTES = {"patient": "/patients?limit=1", "analytics": "/analytics/summary"}


def _status(svc: ServiceProcess, path: str, token: str) -> httpx.Response:
    return httpx.get(svc.base_url + path, headers={"Authorization": f"Bearer {token}"}, timeout=10)


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_a_logged_out_token_is_refused_when_the_service_is_called_directly(services: Services, name: str) -> None:
    svc: ServiceProcess = getattr(services, name)
    token, other = services.login(), services.login()
    # Accepted before logout (analytics may answer 503 before the pipeline made its tables: not a 401).
    assert _status(svc, ROUTES[name], token).status_code != 401
    logout = httpx.post(services.auth.base_url + "/logout", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert logout.status_code == 204, logout.text

    process.wait_until(lambda: _status(svc, ROUTES[name], token).status_code == 401, timeout=20, interval=0.1,
                       message=f"{name} to refuse the revoked token")
    refused = _status(svc, ROUTES[name], token)
    assert "revoked" in refused.json()["message"]
    assert _status(svc, ROUTES[name], other).status_code != 401  # the user's other session goes on


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_each_service_reports_the_age_of_its_list(services: Services, name: str) -> None:
    svc: ServiceProcess = getattr(services, name)

    def fetched() -> bool:
        metrics = httpx.get(svc.base_url + "/metrics", timeout=10).text
        line = next(row for row in metrics.splitlines() if row.startswith(f"{name}_revocation_list_age_seconds"))
        return 0 <= float(line.split()[-1]) < 60

    process.wait_until(fetched, timeout=30, interval=0.2, message=f"{name}'s first revocation list")
