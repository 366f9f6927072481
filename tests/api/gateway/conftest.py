"""Gateway test stack: the real auth service, stand-in patient/analytics upstreams, a real gateway."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from api.auth import service as auth_service
from pms import process
from pms.settings import Settings
from tests.api.auth.conftest import auth_test_settings
from tests.api.gateway.standins import Seen, ThreadServer, analytics_app, patient_app
from tests.fixtures.servers import TEST_AUTH_LIMITS, ServerSet
from tests.fixtures.services import ServiceProcess

PASSWORD = "Gateway-Test-Phrase-31"
UPSTREAM_TIMEOUT_S = 1.0


@dataclass
class Stack:
    settings: Settings
    auth: ServiceProcess
    gateway: ServiceProcess
    patient: ThreadServer
    analytics: ThreadServer
    patient_seen: Seen
    analytics_seen: Seen
    tokens: dict[str, str]
    users: dict[str, str]  # role -> email

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.gateway.base_url, timeout=10)


@pytest.fixture(scope="module")
def stack(servers: ServerSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    port = process.free_port
    settings = auth_test_settings(
        servers,
        auth={"port": port(), **TEST_AUTH_LIMITS},
        patient={"port": port()},
        analytics={"port": port()},
        gateway={"port": port(), "upstream_timeout_s": UPSTREAM_TIMEOUT_S, "max_body_bytes": 8 * 1024},
    )
    logs = tmp_path_factory.mktemp("gateway")
    patient_seen, analytics_seen = Seen(), Seen()
    patient = ThreadServer(patient_app(settings, patient_seen, settings.patient.base_url),
                           settings.patient.port).start()
    analytics = ThreadServer(analytics_app(settings, analytics_seen), settings.analytics.port).start()
    auth = ServiceProcess("auth", settings, logs / "auth.log").start(timeout=60)
    gateway = ServiceProcess("gateway", settings, logs / "gateway.log").start(timeout=60)
    try:
        tokens, users = _login_every_role(settings, gateway.base_url)
        yield Stack(settings, auth, gateway, patient, analytics, patient_seen, analytics_seen, tokens, users)
    finally:
        gateway.stop()
        auth.stop()
        patient.stop()
        analytics.stop()


def _login_every_role(settings: Settings, gateway_url: str) -> tuple[dict[str, str], dict[str, str]]:
    """Log the admin in through the gateway, create a STAFF and an ANALYST user, log them in too."""
    admin_password = auth_service.admin_password(settings)
    assert admin_password is not None
    users = {"ADMIN": settings.admin_email}
    with httpx.Client(base_url=gateway_url, timeout=10) as client:
        reply = client.post("/auth/login", json={"email": settings.admin_email, "password": admin_password})
        assert reply.status_code == 200, reply.text
        tokens = {"ADMIN": reply.json()["token"]}
        for role in ("STAFF", "ANALYST"):
            email = f"{role.lower()}-{uuid.uuid4().hex[:8]}@clinic.example.org"
            created = client.post("/auth/users", headers=bearer(tokens["ADMIN"]),
                                  json={"email": email, "password": PASSWORD, "role": role})
            assert created.status_code == 201, created.text
            login = client.post("/auth/login", json={"email": email, "password": PASSWORD})
            assert login.status_code == 200, login.text
            tokens[role] = login.json()["token"]
            users[role] = email
    return tokens, users


@pytest.fixture
def gw(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client() as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def request_id() -> Callable[[], str]:
    return lambda: uuid.uuid4().hex
