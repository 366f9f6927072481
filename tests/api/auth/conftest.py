"""Auth test fixtures: one real auth process per module, admin login, a user factory."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.orm import Session

from api.auth import service as auth_service
from pms import db, process
from pms.settings import Mode, Settings
from tests.fixtures.servers import TEST_AUTH_LIMITS, ServerSet
from tests.fixtures.services import ServiceProcess

#: Long enough for the rules, not on any list; reused so tests pay for few argon2 hashes.
STRONG_PASSWORD = "Correct-Horse-Battery-9"


@dataclass
class AuthUser:
    id: str
    email: str
    password: str
    role: str


#: Only used where the servers are external (docker/external backends): embedded mode generates its own.
EXTERNAL_ADMIN_PASSWORD = "External-Test-Admin-Phrase-5"


def auth_test_settings(servers: ServerSet, **overrides: object) -> Settings:
    """Settings for an auth process; outside embedded mode they carry an admin password, so an admin exists."""
    settings = servers.make_settings(**overrides)
    if settings.mode is not Mode.EMBEDDED and settings.admin_password is None:
        settings = servers.make_settings(admin_password=SecretStr(EXTERNAL_ADMIN_PASSWORD), **overrides)
    return settings


@pytest.fixture(scope="module")
def auth_settings(servers: ServerSet) -> Settings:
    return auth_test_settings(servers, auth={"port": process.free_port(), **TEST_AUTH_LIMITS})


@pytest.fixture(scope="module")
def auth_proc(auth_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    svc = ServiceProcess("auth", auth_settings, tmp_path_factory.mktemp("auth") / "auth.log").start(timeout=60)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def auth_http(auth_proc: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=auth_proc.base_url, timeout=10) as client:
        yield client


def admin_credentials(settings: Settings) -> tuple[str, str]:
    password = auth_service.admin_password(settings)
    assert password is not None
    return settings.admin_email, password


@pytest.fixture(scope="module")
def admin_token(auth_http: httpx.Client, auth_settings: Settings) -> str:
    email, password = admin_credentials(auth_settings)
    reply = auth_http.post("/login", json={"email": email, "password": password})
    assert reply.status_code == 200, reply.text
    return reply.json()["token"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}@clinic.example.org"


@pytest.fixture(scope="module")
def user_factory(auth_http: httpx.Client, admin_token: str) -> Callable[..., AuthUser]:
    """Create a user through the admin API (a real request, the way an admin would)."""

    def _make(role: str = "STAFF", *, active: bool = True, password: str = STRONG_PASSWORD) -> AuthUser:
        email = unique_email(role.lower())
        reply = auth_http.post("/users", headers=bearer(admin_token),
                               json={"email": email, "password": password, "role": role, "active": active})
        assert reply.status_code == 201, reply.text
        return AuthUser(reply.json()["id"], email, password, role)

    return _make


@pytest.fixture
def rollback_session(auth_settings: Settings, auth_proc: ServiceProcess) -> Iterator[Session]:
    """A session whose commits only release savepoints: everything is rolled back at the end."""
    engine = db.engine_for(auth_settings, "auth")
    with engine.connect() as connection:
        outer = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
        try:
            yield session
        finally:
            session.close()
            outer.rollback()
