"""Token revocation at auth: logout, and cut-offs on role, active and password changes."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from pms.security import Role, decode_token, encode_token, internal_audience
from pms.settings import Settings
from tests.api.auth.conftest import AuthUser, bearer

pytestmark = pytest.mark.integration


def _login(client: httpx.Client, user: AuthUser, password: str | None = None) -> str:
    reply = client.post("/login", json={"email": user.email, "password": password or user.password})
    assert reply.status_code == 200, reply.text
    return reply.json()["token"]


def _service_token(settings: Settings, role: Role = Role.ADMIN) -> str:
    return encode_token(settings, sub="service:gateway", role=role, ttl_s=60, audience=internal_audience(settings))


def _revocations(client: httpx.Client, settings: Settings) -> dict:
    reply = client.get("/revocations", headers=bearer(_service_token(settings)))
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_logout_revokes_only_that_token(auth_http: httpx.Client, auth_settings: Settings,
                                        user_factory: Callable[..., AuthUser]) -> None:
    user = user_factory("STAFF")
    first, second = _login(auth_http, user), _login(auth_http, user)
    assert auth_http.post("/logout", headers=bearer(first)).status_code == 204
    refused = auth_http.get("/me", headers=bearer(first))
    assert refused.status_code == 401 and "revoked" in refused.json()["message"]
    assert auth_http.post("/logout", headers=bearer(first)).status_code == 401  # already given up
    assert auth_http.get("/me", headers=bearer(second)).status_code == 200
    listed = _revocations(auth_http, auth_settings)
    assert decode_token(auth_settings, first).jti in listed["tokenIds"]
    assert decode_token(auth_settings, second).jti not in listed["tokenIds"]


def test_logout_needs_a_valid_token(auth_http: httpx.Client) -> None:
    assert auth_http.post("/logout").status_code == 401
    assert auth_http.post("/logout", headers=bearer("not-a-token")).status_code == 401


@pytest.mark.parametrize("change", [{"role": "ANALYST"}, {"active": False}])
def test_role_or_active_change_cuts_off_older_tokens(auth_http: httpx.Client, admin_token: str,
                                                     auth_settings: Settings, change: dict,
                                                     user_factory: Callable[..., AuthUser]) -> None:
    user = user_factory("STAFF")
    token = _login(auth_http, user)
    before = time.time()
    reply = auth_http.patch(f"/users/{user.id}", headers=bearer(admin_token), json=change)
    assert reply.status_code == 200
    assert auth_http.get("/me", headers=bearer(token)).status_code == 401
    cutoffs = {entry["sub"]: entry["tokensValidAfter"] for entry in _revocations(auth_http, auth_settings)["users"]}
    assert cutoffs[user.email] >= before - 1
    if "role" in change:  # a new login carries the new role and works at once
        fresh = _login(auth_http, user)
        assert decode_token(auth_settings, fresh).role == Role.ANALYST
        assert auth_http.get("/me", headers=bearer(fresh)).status_code == 200


def test_an_update_that_changes_nothing_keeps_sessions(auth_http: httpx.Client, admin_token: str,
                                                       user_factory: Callable[..., AuthUser]) -> None:
    user = user_factory("STAFF")
    token = _login(auth_http, user)
    assert auth_http.patch(f"/users/{user.id}", headers=bearer(admin_token), json={"role": "STAFF"}).status_code == 200
    assert auth_http.get("/me", headers=bearer(token)).status_code == 200


def test_password_change_signs_out_every_session(auth_http: httpx.Client,
                                                 user_factory: Callable[..., AuthUser]) -> None:
    user = user_factory("STAFF")
    token, other = _login(auth_http, user), _login(auth_http, user)
    new_password = "Entirely-New-Phrase-77"
    reply = auth_http.post("/me/password", headers=bearer(token),
                           json={"currentPassword": user.password, "newPassword": new_password})
    assert reply.status_code == 204
    assert auth_http.get("/me", headers=bearer(token)).status_code == 401
    assert auth_http.get("/me", headers=bearer(other)).status_code == 401
    assert auth_http.get("/me", headers=bearer(_login(auth_http, user, new_password))).status_code == 200


def test_revocation_list_is_for_service_tokens_only(auth_http: httpx.Client, auth_settings: Settings,
                                                    admin_token: str,
                                                    user_factory: Callable[..., AuthUser]) -> None:
    assert auth_http.get("/revocations").status_code == 401
    staff = _login(auth_http, user_factory("STAFF"))
    assert auth_http.get("/revocations", headers=bearer(staff)).status_code == 401
    assert auth_http.get("/revocations", headers=bearer(admin_token)).status_code == 401  # a user, not a service
    assert auth_http.get("/revocations", headers=bearer(_service_token(auth_settings, Role.STAFF))).status_code == 403
    # ...and a service token opens nothing meant for users.
    assert auth_http.get("/me", headers=bearer(_service_token(auth_settings))).status_code == 401
    assert auth_http.get("/users", headers=bearer(_service_token(auth_settings))).status_code == 401
    body = _revocations(auth_http, auth_settings)
    assert abs(body["asOf"] - time.time()) < 60
    assert all(set(entry) == {"sub", "tokensValidAfter"} for entry in body["users"])
