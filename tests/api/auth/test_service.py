"""Auth rules: brute-force limits, rehash on login, the first admin, the last admin, password rules."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from argon2 import PasswordHasher
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.auth import service as auth_service
from api.auth.models import User
from api.auth.schemas import UserUpdate, check_password, common_passwords, normalize_email
from pms import db, process
from pms.errors import Conflict
from pms.security import Role, needs_rehash
from pms.settings import Mode, Settings
from tests.api.auth.conftest import STRONG_PASSWORD, AuthUser, auth_test_settings, unique_email
from tests.fixtures.servers import ServerSet
from tests.fixtures.services import ServiceProcess

pytestmark = pytest.mark.integration

WINDOW_S = 2
MAX_FAILED = 3
#: Per client address the limit is higher (a clinic's staff share one address) and set separately.
MAX_PER_ADDRESS = 5


def _login(client: httpx.Client, email: str, password: str, address: str) -> httpx.Response:
    # uvicorn trusts X-Forwarded-For from 127.0.0.1, which is how the gateway passes the caller's address.
    return client.post("/login", json={"email": email, "password": password}, headers={"X-Forwarded-For": address})


@pytest.fixture(scope="module")
def strict_auth(servers: ServerSet, tmp_path_factory: pytest.TempPathFactory) -> ServiceProcess:
    settings = auth_test_settings(servers, auth={"port": process.free_port(), "max_failed_logins": MAX_FAILED,
                                                 "max_failed_logins_per_address": MAX_PER_ADDRESS,
                                                 "failed_login_window_s": WINDOW_S})
    svc = ServiceProcess("auth", settings, tmp_path_factory.mktemp("strict") / "auth.log").start(timeout=60)
    yield svc
    svc.stop()


def test_brute_force_per_account_then_success_after_the_window(
    strict_auth: ServiceProcess, user_factory: Callable[..., AuthUser]
) -> None:
    user = user_factory("STAFF")
    with httpx.Client(base_url=strict_auth.base_url, timeout=10) as client:
        # Failures from different addresses still count against the one account.
        for i in range(MAX_FAILED):
            assert _login(client, user.email, "wrong-password-123", f"10.1.0.{i + 1}").status_code == 401
        locked = _login(client, user.email, "wrong-password-123", "10.1.0.99")
        assert locked.status_code == 429
        assert locked.json()["message"] and set(locked.json()) == {"message", "errors"}
        assert 1 <= int(locked.headers["Retry-After"]) <= WINDOW_S + 1
        # While locked even the right password is refused: guessing cannot continue.
        assert _login(client, user.email, user.password, "10.1.0.100").status_code == 429
        process.wait_until(
            lambda: _login(client, user.email, user.password, "10.1.0.101").status_code == 200,
            timeout=WINDOW_S + 10, interval=0.25, message="login to be allowed again",
        )


def test_every_spelling_the_database_folds_to_an_account_shares_its_counter(
    strict_auth: ServiceProcess, user_factory: Callable[..., AuthUser]
) -> None:
    """PostgreSQL folds U+0130 to "i" (citext finds the user), Python to "i" + a combining dot: a counter
    keyed in Python gave every such spelling a full set of guesses at one account."""
    user = user_factory("STAFF")
    assert "i" in user.email
    variants = [user.email.replace("i", "\u0130", 1), user.email.upper(), user.email.replace("i", "I")]
    with httpx.Client(base_url=strict_auth.base_url, timeout=10) as client:
        for i, variant in enumerate(variants[:MAX_FAILED]):
            assert _login(client, variant, "wrong-password-123", f"10.4.0.{i + 1}").status_code == 401
        assert _login(client, user.email, user.password, "10.4.0.99").status_code == 429
        assert _login(client, variants[0], user.password, "10.4.0.98").status_code == 429


def test_wrong_current_passwords_count_against_the_account(
    strict_auth: ServiceProcess, user_factory: Callable[..., AuthUser]
) -> None:
    """A held token (a stolen session) cannot guess the current password at the request rate."""
    user = user_factory("STAFF")
    new = {"newPassword": "Brand-New-Phrase-77"}
    with httpx.Client(base_url=strict_auth.base_url, timeout=10) as client:
        token = _login(client, user.email, user.password, "10.5.0.1").json()["token"]
        headers = {"Authorization": f"Bearer {token}"}
        for i in range(MAX_FAILED):
            wrong = client.post("/me/password", headers=headers, json={"currentPassword": f"guess-{i}-xyz!", **new})
            assert wrong.status_code == 400 and "currentPassword" in wrong.json()["errors"]
        locked = client.post("/me/password", headers=headers, json={"currentPassword": user.password, **new})
        assert locked.status_code == 429 and 1 <= int(locked.headers["Retry-After"]) <= WINDOW_S + 1
        assert _login(client, user.email, user.password, "10.5.0.2").status_code == 429  # one counter
        process.wait_until(
            lambda: client.post("/me/password", headers=headers,
                                json={"currentPassword": user.password, **new}).status_code == 204,
            timeout=WINDOW_S + 10, interval=0.25, message="the password change to be allowed again")
        assert _login(client, user.email, "Brand-New-Phrase-77", "10.5.0.3").status_code == 200


def test_parallel_guesses_cannot_exceed_the_limit(
    strict_auth: ServiceProcess, user_factory: Callable[..., AuthUser]
) -> None:
    user = user_factory("STAFF")
    attempts = 8

    def guess(i: int) -> int:
        with httpx.Client(base_url=strict_auth.base_url, timeout=30) as client:
            return _login(client, user.email, f"wrong-guess-{i:06d}", f"10.4.0.{i + 1}").status_code

    with ThreadPoolExecutor(max_workers=attempts) as pool:
        codes = sorted(pool.map(guess, range(attempts)))
    assert codes == [401] * MAX_FAILED + [429] * (attempts - MAX_FAILED)


def test_brute_force_per_client_address(strict_auth: ServiceProcess) -> None:
    address = f"10.2.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"
    with httpx.Client(base_url=strict_auth.base_url, timeout=10) as client:
        for _ in range(MAX_PER_ADDRESS):
            assert _login(client, unique_email("spray"), STRONG_PASSWORD, address).status_code == 401
        # A fresh account from the same address is refused: password spraying is limited too.
        reply = _login(client, unique_email("spray"), STRONG_PASSWORD, address)
        assert reply.status_code == 429 and "Retry-After" in reply.headers
        other = _login(client, unique_email("spray"), STRONG_PASSWORD, "10.3.0.1")
        assert other.status_code == 401


def test_login_upgrades_an_outdated_hash(auth_http: httpx.Client, auth_settings: Settings) -> None:
    old_hash = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash(STRONG_PASSWORD)
    assert needs_rehash(old_hash)
    email = unique_email("legacy")
    factory = db.session_factory(db.engine_for(auth_settings, "auth"))
    with db.session_scope(factory) as session:
        session.add(User(id=uuid.uuid4(), email=email, password_hash=old_hash, role="STAFF", active=True))
    assert auth_http.post("/login", json={"email": email, "password": STRONG_PASSWORD}).status_code == 200
    with factory() as session:
        stored = session.scalars(select(User.password_hash).where(User.email == email)).one()
    assert stored != old_hash and not needs_rehash(stored)


def test_embedded_first_admin_password_is_generated_once_and_private(
    auth_proc: ServiceProcess, auth_settings: Settings, auth_http: httpx.Client
) -> None:
    if auth_settings.mode is not Mode.EMBEDDED:
        pytest.skip("the generated admin password exists only in embedded mode")
    assert auth_settings.admin_password is None
    path: Path = auth_settings.secrets_dir / auth_service.ADMIN_PASSWORD_FILE
    assert path.exists() and (os.stat(path).st_mode & 0o077) == 0
    password = path.read_text().strip()
    assert len(password) >= 20 and auth_service.admin_password(auth_settings) == password
    reply = auth_http.post("/login", json={"email": auth_settings.admin_email, "password": password})
    assert reply.status_code == 200 and reply.json()["role"] == "ADMIN"


def _external(settings: Settings, **overrides: object) -> Settings:
    url = settings.server_url().render_as_string(hide_password=False)
    return Settings(_env_file=None, **{**settings.model_dump(), "database_url": SecretStr(url), **overrides})


def test_external_mode_without_admin_password_creates_no_admin(
    rollback_session: Session, auth_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    external = _external(auth_settings, admin_email=unique_email("admin"))
    assert external.mode is Mode.EXTERNAL
    with caplog.at_level(logging.WARNING, logger="api.auth.service"):
        assert auth_service.ensure_admin(session=rollback_session, settings=external) is False
    assert "PMS_ADMIN_PASSWORD" in caplog.text
    assert rollback_session.scalars(select(User).where(User.email == external.admin_email)).first() is None


def test_configured_admin_is_created_once(rollback_session: Session, auth_settings: Settings) -> None:
    external = _external(auth_settings, admin_email=unique_email("boss"),
                         admin_password=SecretStr("A-Configured-Pass-77"))
    assert auth_service.ensure_admin(session=rollback_session, settings=external) is True
    assert auth_service.ensure_admin(session=rollback_session, settings=external) is False
    admin = rollback_session.scalars(select(User).where(User.email == external.admin_email)).one()
    assert admin.role == "ADMIN" and admin.active


def test_weak_configured_admin_password_is_refused(rollback_session: Session, auth_settings: Settings) -> None:
    external = _external(auth_settings, admin_email=unique_email("boss"), admin_password=SecretStr("admin"))
    with pytest.raises(ValueError, match="at least 12"):
        auth_service.ensure_admin(session=rollback_session, settings=external)


def test_last_active_admin_cannot_be_demoted_or_deactivated(rollback_session: Session) -> None:
    admins = rollback_session.scalars(select(User).where(User.role == "ADMIN", User.active.is_(True))).all()
    last, others = admins[0], admins[1:]
    for other in others:
        other.active = False
    rollback_session.flush()
    for change in ({"role": Role.STAFF}, {"active": False}):
        with pytest.raises(Conflict):
            auth_service.update(session=rollback_session, user=last, data=UserUpdate(**change))


@pytest.mark.parametrize("password", ["Correct-Horse-Battery-9", "zw8 vq3 lk2 pp9 mm1", "é" * 6 + "ß1Xy-9Q"])
def test_acceptable_passwords(password: str) -> None:
    assert check_password(password) == password


@pytest.mark.parametrize("password", ["", "short", "eleven-char", "password1234", "QWERTY123456",
                                      "administrator", "abababababababab", "x" * 129])
def test_refused_passwords(password: str) -> None:
    with pytest.raises(ValueError):
        check_password(password)


def test_common_list_is_loaded() -> None:
    assert len(common_passwords()) > 1000 and "password1234" in common_passwords()


@pytest.mark.parametrize(("raw", "normal"), [
    ("admin@pms.local", "admin@pms.local"),
    ("  Nurse.Joy@Clinic.EXAMPLE.org ", "Nurse.Joy@clinic.example.org"),
    ("it@ward.internal", "it@ward.internal"),
])
def test_email_normalization(raw: str, normal: str) -> None:
    assert normalize_email(raw) == normal


@pytest.mark.parametrize("raw", ["", "no-at-sign", "a@", "@b.org", "a b@c.org", "a@localhost", "x@-bad-.local"])
def test_invalid_emails(raw: str) -> None:
    with pytest.raises(ValueError):
        normalize_email(raw)
