"""The auth service over real HTTP: login, validate, me, admin user management, direct calls."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
import jwt
import pytest

from api.auth.service import LOGIN_FAILED
from pms.security import decode_token
from pms.settings import Settings
from tests.api.auth.conftest import STRONG_PASSWORD, AuthUser, bearer, unique_email

pytestmark = pytest.mark.integration


def login(client: httpx.Client, email: str, password: str, **headers: str) -> httpx.Response:
    return client.post("/login", json={"email": email, "password": password}, headers=headers)


def test_admin_login_returns_a_complete_token(auth_http: httpx.Client, admin_token: str,
                                              auth_settings: Settings) -> None:
    principal = decode_token(auth_settings, admin_token)
    assert principal.role == "ADMIN"
    assert principal.sub == auth_settings.admin_email
    claims = jwt.decode(admin_token, options={"verify_signature": False})
    assert {"sub", "role", "iat", "exp", "iss", "aud", "jti"} <= claims.keys()
    assert claims["exp"] - int(claims["iat"]) == auth_settings.jwt.ttl_s  # iat keeps its fraction of a second
    assert jwt.get_unverified_header(admin_token)["alg"] == "HS256"


def test_login_body_shape(auth_http: httpx.Client, user_factory: Callable[..., AuthUser],
                          auth_settings: Settings) -> None:
    user = user_factory("ANALYST")
    reply = login(auth_http, user.email.upper(), user.password)  # email is case-insensitive
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body.keys() == {"token", "tokenType", "expiresIn", "role"}
    assert body["tokenType"] == "Bearer" and body["role"] == "ANALYST"
    assert body["expiresIn"] == auth_settings.jwt.ttl_s


def test_every_bad_pair_is_the_same_401(auth_http: httpx.Client, user_factory: Callable[..., AuthUser]) -> None:
    inactive = user_factory("STAFF", active=False)
    active = user_factory("STAFF")
    replies = [
        login(auth_http, unique_email("nobody"), STRONG_PASSWORD),  # unknown user
        login(auth_http, active.email, STRONG_PASSWORD + "x"),  # wrong password
        login(auth_http, inactive.email, inactive.password),  # right password, inactive user
    ]
    for reply in replies:
        assert reply.status_code == 401, reply.text
        assert reply.json() == {"message": LOGIN_FAILED, "errors": {}}
    assert login(auth_http, active.email, active.password).status_code == 200


@pytest.mark.parametrize("body", [
    {},
    {"email": "a@b.example"},
    {"email": "", "password": "x"},
    {"email": "a@b.example", "password": "x", "extra": 1},
    {"email": ["a"], "password": "x"},
])
def test_malformed_login_is_400_in_the_error_shape(auth_http: httpx.Client, body: dict[str, object]) -> None:
    reply = auth_http.post("/login", json=body)
    assert reply.status_code == 400
    assert set(reply.json()) == {"message", "errors"} and reply.json()["errors"]


def test_malformed_json_is_400(auth_http: httpx.Client) -> None:
    reply = auth_http.post("/login", content=b"{not json", headers={"Content-Type": "application/json"})
    assert reply.status_code == 400
    assert reply.json()["message"] == "Malformed JSON"


def test_validate_and_me(auth_http: httpx.Client, user_factory: Callable[..., AuthUser]) -> None:
    user = user_factory("STAFF")
    token = login(auth_http, user.email, user.password).json()["token"]
    reply = auth_http.get("/validate", headers=bearer(token))
    assert reply.status_code == 200
    assert reply.json()["sub"] == user.email and reply.json()["role"] == "STAFF"
    me = auth_http.get("/me", headers=bearer(token)).json()
    assert me["id"] == user.id and me["email"] == user.email and me["active"] is True
    assert "passwordHash" not in me and "password_hash" not in me
    assert auth_http.get("/validate").status_code == 401
    assert auth_http.get("/validate", headers=bearer(token + "x")).status_code == 401


def test_deactivated_users_token_stops_working_at_auth(auth_http: httpx.Client, admin_token: str,
                                                       user_factory: Callable[..., AuthUser]) -> None:
    user = user_factory("STAFF")
    token = login(auth_http, user.email, user.password).json()["token"]
    reply = auth_http.patch(f"/users/{user.id}", headers=bearer(admin_token), json={"active": False})
    assert reply.status_code == 200 and reply.json()["active"] is False
    assert auth_http.get("/validate", headers=bearer(token)).status_code == 401
    assert auth_http.get("/me", headers=bearer(token)).status_code == 401
    assert login(auth_http, user.email, user.password).status_code == 401


def test_change_own_password(auth_http: httpx.Client, user_factory: Callable[..., AuthUser]) -> None:
    user = user_factory("STAFF")
    token = login(auth_http, user.email, user.password).json()["token"]
    new_password = "Another-Long-Phrase-42"
    wrong = auth_http.post("/me/password", headers=bearer(token),
                           json={"currentPassword": "not-it-at-all-1", "newPassword": new_password})
    assert wrong.status_code == 400 and "currentPassword" in wrong.json()["errors"]
    weak = auth_http.post("/me/password", headers=bearer(token),
                          json={"currentPassword": user.password, "newPassword": "password1234"})
    assert weak.status_code == 400 and "newPassword" in weak.json()["errors"]
    ok = auth_http.post("/me/password", headers=bearer(token),
                        json={"currentPassword": user.password, "newPassword": new_password})
    assert ok.status_code == 204
    assert login(auth_http, user.email, user.password).status_code == 401
    assert login(auth_http, user.email, new_password).status_code == 200
    assert auth_http.post("/me/password", json={"currentPassword": "a", "newPassword": new_password}
                          ).status_code == 401


def test_admin_creates_lists_reads_and_updates_users(auth_http: httpx.Client, admin_token: str) -> None:
    email = unique_email("new")
    created = auth_http.post("/users", headers=bearer(admin_token),
                             json={"email": email, "password": STRONG_PASSWORD, "role": "ANALYST"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert created.headers["Location"] == f"/users/{body['id']}"
    assert body["email"] == email and body["role"] == "ANALYST" and body["active"] is True
    assert auth_http.get(f"/users/{body['id']}", headers=bearer(admin_token)).json() == body

    page = auth_http.get("/users", headers=bearer(admin_token), params={"limit": 500})
    assert page.status_code == 200
    assert int(page.headers["X-Total-Count"]) >= len(page.json()) >= 2
    assert email in {u["email"] for u in page.json()}
    assert len(auth_http.get("/users", headers=bearer(admin_token), params={"limit": 1}).json()) == 1

    updated = auth_http.patch(f"/users/{body['id']}", headers=bearer(admin_token), json={"role": "STAFF"})
    assert updated.status_code == 200 and updated.json()["role"] == "STAFF"
    assert login(auth_http, email, STRONG_PASSWORD).json()["role"] == "STAFF"


def test_duplicate_email_in_any_case_is_409(auth_http: httpx.Client, admin_token: str,
                                            user_factory: Callable[..., AuthUser]) -> None:
    user = user_factory("STAFF")
    reply = auth_http.post("/users", headers=bearer(admin_token),
                           json={"email": user.email.upper(), "password": STRONG_PASSWORD, "role": "STAFF"})
    assert reply.status_code == 409
    assert reply.json()["errors"] == {"email": "Email already used"}


@pytest.mark.parametrize(("body", "field"), [
    ({"email": "not-an-email", "password": STRONG_PASSWORD}, "email"),
    ({"email": "x@" + "a" * 260 + ".org", "password": STRONG_PASSWORD}, "email"),
    ({"email": "{unique}", "password": "short-1"}, "password"),
    ({"email": "{unique}", "password": "Password1234"}, "password"),  # on the common list, any case
    ({"email": "{unique}", "password": "aaaaaaaaaaaaaaaaaaaa"}, "password"),
    ({"email": "{unique}", "password": "x" * 129}, "password"),
    ({"email": "{unique}", "password": STRONG_PASSWORD, "role": "ROOT"}, "role"),
    ({"email": "{unique}", "password": STRONG_PASSWORD, "isAdmin": True}, "isAdmin"),
    ({"password": STRONG_PASSWORD}, "email"),
    ({"email": "{unique}", "password": STRONG_PASSWORD, "active": "no"}, "active"),
])
def test_invalid_new_user_is_400_with_the_field(auth_http: httpx.Client, admin_token: str,
                                                body: dict[str, object], field: str) -> None:
    body = {k: (unique_email() if v == "{unique}" else v) for k, v in body.items()}
    reply = auth_http.post("/users", headers=bearer(admin_token), json=body)
    assert reply.status_code == 400, reply.text
    assert field in reply.json()["errors"]


@pytest.mark.parametrize("body", [{}, {"role": None}, {"active": "maybe"}, {"active": "yes"}, {"active": "no"},
                                  {"active": 1}, {"role": "GOD"}, {"email": "x@y.org"}])
def test_invalid_update_is_400(auth_http: httpx.Client, admin_token: str,
                               user_factory: Callable[..., AuthUser], body: dict[str, object]) -> None:
    user = user_factory("STAFF")
    reply = auth_http.patch(f"/users/{user.id}", headers=bearer(admin_token), json=body)
    assert reply.status_code == 400, reply.text


def test_a_users_page_past_any_real_offset_is_a_400_not_a_database_error(auth_http: httpx.Client,
                                                                         admin_token: str) -> None:
    reply = auth_http.get("/users", headers=bearer(admin_token), params={"offset": "99999999999999999999"})
    assert reply.status_code == 400 and "offset" in reply.json()["errors"], reply.text


def test_unknown_or_malformed_user_id(auth_http: httpx.Client, admin_token: str) -> None:
    assert auth_http.get(f"/users/{uuid.uuid4()}", headers=bearer(admin_token)).status_code == 404
    assert auth_http.patch(f"/users/{uuid.uuid4()}", headers=bearer(admin_token),
                           json={"active": False}).status_code == 404
    assert auth_http.get("/users/not-a-uuid", headers=bearer(admin_token)).status_code == 400


@pytest.mark.parametrize("role", ["STAFF", "ANALYST"])
def test_user_management_is_admin_only(auth_http: httpx.Client, user_factory: Callable[..., AuthUser],
                                       role: str) -> None:
    user = user_factory(role)
    token = login(auth_http, user.email, user.password).json()["token"]
    assert auth_http.get("/users", headers=bearer(token)).status_code == 403
    assert auth_http.get(f"/users/{user.id}", headers=bearer(token)).status_code == 403
    assert auth_http.post("/users", headers=bearer(token),
                          json={"email": unique_email(), "password": STRONG_PASSWORD}).status_code == 403
    assert auth_http.patch(f"/users/{user.id}", headers=bearer(token), json={"role": "ADMIN"}).status_code == 403


def test_direct_call_without_a_valid_token_is_refused(auth_http: httpx.Client, auth_settings: Settings,
                                                      user_factory: Callable[..., AuthUser]) -> None:
    """Defence in depth: bypassing the gateway does not bypass the token check."""
    no_token = auth_http.get("/users")
    assert no_token.status_code == 401
    assert no_token.json() == {"message": "Missing bearer token", "errors": {}}
    assert no_token.headers["WWW-Authenticate"] == "Bearer"
    forged = jwt.encode({"sub": auth_settings.admin_email, "role": "ADMIN"}, "k" * 40, algorithm="HS256")
    assert auth_http.get("/users", headers=bearer(forged)).status_code == 401
    assert auth_http.post("/users", json={"email": unique_email(), "password": STRONG_PASSWORD}).status_code == 401


def test_demoted_admin_loses_admin_rights_before_token_expiry(
    auth_http: httpx.Client, admin_token: str, user_factory: Callable[..., AuthUser]
) -> None:
    other_admin = user_factory("ADMIN")
    token = login(auth_http, other_admin.email, other_admin.password).json()["token"]
    assert auth_http.get("/users", headers=bearer(token)).status_code == 200
    demote = auth_http.patch(f"/users/{other_admin.id}", headers=bearer(admin_token), json={"role": "STAFF"})
    assert demote.status_code == 200
    # The token still says ADMIN, but it was issued before the role changed: refused outright.
    refused = auth_http.get("/users", headers=bearer(token))
    assert refused.status_code == 401 and "revoked" in refused.json()["message"]
    fresh = login(auth_http, other_admin.email, other_admin.password).json()["token"]
    assert auth_http.get("/users", headers=bearer(fresh)).status_code == 403


def test_ops_endpoints(auth_http: httpx.Client) -> None:
    assert auth_http.get("/health").json()["status"] == "UP"
    ready = auth_http.get("/ready")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": True}
    assert "http_requests_total" in auth_http.get("/metrics").text
    assert "/login" in auth_http.get("/openapi.json").json()["paths"]


def test_failed_logins_cost_the_same_whether_or_not_the_user_exists(
    auth_http: httpx.Client, user_factory: Callable[..., AuthUser]
) -> None:
    """No user enumeration by timing: unknown, wrong-password and inactive all pay one argon2 verify.

    Medians of interleaved rounds, with a wide band: without the dummy verification an unknown
    user answers several times faster than a wrong password, which this catches.
    """
    import statistics
    import time

    active = user_factory("STAFF")
    inactive = user_factory("STAFF", active=False)
    cases = {
        "unknown": (unique_email("ghost"), STRONG_PASSWORD),
        "wrong": (active.email, STRONG_PASSWORD + "!"),
        "inactive": (inactive.email, inactive.password),
    }
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for round_no in range(7):
        for name, (email, password) in cases.items():
            started = time.perf_counter()
            reply = login(auth_http, email, password, **{"X-Forwarded-For": f"10.77.{round_no}.{len(name)}"})
            timings[name].append(time.perf_counter() - started)
            assert reply.status_code == 401
    medians = {name: statistics.median(values) for name, values in timings.items()}
    for name in ("unknown", "inactive"):
        assert 0.5 < medians[name] / medians["wrong"] < 2.0, medians
