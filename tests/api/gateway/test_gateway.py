"""The gateway end to end: seed tutorial, JWT attacks, role matrix, forwarding, failures, limits."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pms import forwarding, process
from pms.security import encode_token
from pms.settings import Settings
from tests.api.gateway.conftest import PASSWORD, Stack, bearer
from tests.fixtures.servers import ServerSet
from tests.fixtures.services import ServiceProcess

pytestmark = pytest.mark.integration


def error_shape(reply: httpx.Response) -> bool:
    body = reply.json()
    return set(body) == {"message", "errors"} and isinstance(body["message"], str) and body["message"] != ""


# --- the seed tutorial's integration tests -------------------------------------------------------------


def test_seed_tutorial_login_then_list_patients(stack: Stack, gw: httpx.Client) -> None:
    login = gw.post("/auth/login", json={"email": stack.users["STAFF"], "password": PASSWORD})
    assert login.status_code == 200
    token = login.json()["token"]
    assert token and login.json()["tokenType"] == "Bearer"
    patients = gw.get("/api/patients", headers=bearer(token))
    assert patients.status_code == 200
    assert isinstance(patients.json(), list)
    assert "X-Total-Count" in patients.headers


def test_seed_tutorial_invalid_login_is_401(stack: Stack, gw: httpx.Client) -> None:
    reply = gw.post("/auth/login", json={"email": stack.users["STAFF"], "password": "wrong-password-000"})
    assert reply.status_code == 401 and error_shape(reply)


# --- JWT attack table --------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(settings: Settings, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"sub": "intruder@clinic.example.org", "role": "ADMIN", "iat": now, "nbf": now, "exp": now + 600,
              "iss": settings.jwt.issuer, "aud": settings.jwt.audience, "jti": uuid.uuid4().hex}
    claims.update(overrides)
    return claims


def _secret(settings: Settings) -> str:
    assert settings.jwt.secret is not None
    return settings.jwt.secret.get_secret_value()


def _unsigned(settings: Settings) -> str:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(_claims(settings)).encode())}."


def _role_edited(stack: Stack) -> str:
    header, payload, signature = stack.tokens["STAFF"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["role"] = "ADMIN"
    return f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"


def _public_key_as_hmac_secret(settings: Settings) -> str:
    """Algorithm confusion: HS256 signed with an RSA public key, as if it were the shared secret."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}." \
                    f"{_b64(json.dumps(_claims(settings)).encode())}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


ATTACKS: dict[str, Callable[[Stack], dict[str, str]]] = {
    "no token": lambda s: {},
    "not bearer": lambda s: {"Authorization": f"Basic {s.tokens['ADMIN']}"},
    "garbage": lambda s: bearer("not.a.jwt"),
    "alg none": lambda s: bearer(_unsigned(s.settings)),
    "wrong key": lambda s: bearer(jwt.encode(_claims(s.settings), "another-key-" + "k" * 40, algorithm="HS256")),
    "expired": lambda s: bearer(encode_token(s.settings, sub="a@b.example", role="ADMIN", ttl_s=-60)),
    "wrong iss": lambda s: bearer(jwt.encode(_claims(s.settings, iss="evil"), _secret(s.settings), "HS256")),
    "wrong aud": lambda s: bearer(jwt.encode(_claims(s.settings, aud="other-app"), _secret(s.settings), "HS256")),
    "role edited": lambda s: bearer(_role_edited(s)),
    "public key as hmac secret": lambda s: bearer(_public_key_as_hmac_secret(s.settings)),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("path", ["/api/patients", "/api/analytics/summary", "/auth/users"])
def test_jwt_attacks_are_401(stack: Stack, gw: httpx.Client, attack: str, path: str) -> None:
    rid = uuid.uuid4().hex
    reply = gw.get(path, headers={**ATTACKS[attack](stack), "X-Request-ID": rid})
    assert reply.status_code == 401, (attack, reply.text)
    assert error_shape(reply) and reply.headers["WWW-Authenticate"] == "Bearer"
    assert rid not in stack.patient_seen.request_ids() | stack.analytics_seen.request_ids()


def test_role_edited_token_is_still_a_valid_jwt_shape(stack: Stack) -> None:
    """Guard for the table: the edited token differs only in its payload, so a 401 proves the signature check."""
    edited = _role_edited(stack)
    assert edited.split(".")[2] == stack.tokens["STAFF"].split(".")[2]
    assert jwt.decode(edited, options={"verify_signature": False})["role"] == "ADMIN"


# --- role matrix ---------------------------------------------------------------------------------


def _matrix_request(stack: Stack, gw: httpx.Client, method: str, path: str, token: str | None) -> httpx.Response:
    headers = {"X-Request-ID": uuid.uuid4().hex, **(bearer(token) if token else {})}
    body: dict[str, Any] | None = None
    if path == "/auth/users" and method == "POST":
        body = {"email": f"m-{uuid.uuid4().hex[:8]}@clinic.example.org", "password": PASSWORD, "role": "STAFF"}
    elif path.startswith("/auth/users/"):
        body = {"active": True}
    elif method in ("POST", "PUT"):
        body = {"name": "Matrix Patient"}
    return gw.request(method, path, headers=headers, json=body)


ROUTES = [
    ("GET", "/api/patients", {"ADMIN", "STAFF"}),
    ("POST", "/api/patients", {"ADMIN", "STAFF"}),
    ("GET", "/api/patients/{pid}", {"ADMIN", "STAFF"}),
    ("PUT", "/api/patients/{pid}", {"ADMIN", "STAFF"}),
    ("DELETE", "/api/patients/{missing}", {"ADMIN", "STAFF"}),
    ("GET", "/api/analytics/summary", {"ADMIN", "STAFF", "ANALYST"}),
    ("GET", "/api/analytics/registrations", {"ADMIN", "STAFF", "ANALYST"}),
    ("GET", "/api/analytics/demographics", {"ADMIN", "STAFF", "ANALYST"}),
    ("GET", "/api/analytics/geography", {"ADMIN", "STAFF", "ANALYST"}),
    ("GET", "/api/analytics/freshness", {"ADMIN", "STAFF", "ANALYST"}),
    ("GET", "/auth/users", {"ADMIN"}),
    ("POST", "/auth/users", {"ADMIN"}),
    ("GET", "/auth/users/{uid}", {"ADMIN"}),
    ("PATCH", "/auth/users/{uid}", {"ADMIN"}),
    ("GET", "/auth/me", {"ADMIN", "STAFF", "ANALYST"}),
    ("GET", "/auth/validate", {"ADMIN", "STAFF", "ANALYST"}),
]


@pytest.mark.parametrize(("method", "template", "allowed"), ROUTES,
                         ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_role_matrix(stack: Stack, gw: httpx.Client, method: str, template: str, allowed: set[str]) -> None:
    created = gw.post("/api/patients", headers=bearer(stack.tokens["STAFF"]), json={"name": "Matrix Patient"})
    users = gw.get("/auth/users", headers=bearer(stack.tokens["ADMIN"]), params={"limit": 1}).json()
    path = template.format(pid=created.json()["id"], missing=uuid.uuid4(), uid=users[0]["id"])
    for role in ("ADMIN", "STAFF", "ANALYST", None):
        reply = _matrix_request(stack, gw, method, path, stack.tokens[role] if role else None)
        if role in allowed:
            expected = 404 if "{missing}" in template else None
            assert (reply.status_code == expected) if expected else reply.status_code < 300, (role, reply.text)
        elif role is None:
            assert reply.status_code == 401, reply.text
        else:
            assert reply.status_code == 403, (role, reply.text)
            assert reply.json() == {"message": "Not allowed for your role", "errors": {}}


@pytest.mark.parametrize("path", ["/api/analytics/summary", "/api/patients"])
def test_head_answers_as_get_without_a_body(stack: Stack, gw: httpx.Client, path: str) -> None:
    """Exploratory testing: HEAD was a 405 from the services (FastAPI routes answer GET only)."""
    admin = bearer(stack.tokens["ADMIN"])
    get, head = gw.get(path, headers=admin), gw.head(path, headers=admin)
    assert (head.status_code, get.status_code) == (200, 200), head.text
    assert head.content == b""
    for name in ("content-type", "x-total-count"):
        assert head.headers.get(name) == get.headers.get(name)


def test_analytics_is_read_only_and_unknown_paths_are_not_routed(stack: Stack, gw: httpx.Client) -> None:
    admin = bearer(stack.tokens["ADMIN"])
    assert gw.post("/api/analytics/summary", headers=admin, json={}).status_code == 405
    for path in ("/auth/health", "/auth/metrics", "/auth/openapi.json", "/auth//users", "/api/other",
                 "/api/patientsX"):
        reply = gw.get(path, headers=admin)
        assert reply.status_code == 404, (path, reply.text)
        assert error_shape(reply)


@pytest.mark.parametrize("raw_path", ["/auth/me/../users", "/auth/me/%2e%2e/users", "/auth/me/%2E%2E/users",
                                      "/auth/validate/../users", "/api/patients/../../auth/users"])
def test_dot_segments_cannot_dodge_the_rules(stack: Stack, raw_path: str) -> None:
    """Sent raw (httpx would normalise them away), as an attacker's client would."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.settings.gateway.port, timeout=10)
    try:
        conn.request("GET", raw_path, headers=bearer(stack.tokens["STAFF"]))
        reply = conn.getresponse()
        status, body = reply.status, reply.read()
    finally:
        conn.close()
    assert status in (403, 404), (raw_path, status, body)
    assert b"email" not in body


# --- forwarding -------------------------------------------------------------------------------------


def test_forwards_request_id_identity_address_and_query(stack: Stack, gw: httpx.Client) -> None:
    rid = uuid.uuid4().hex
    reply = gw.get("/api/patients/echo", params={"q": "smith", "limit": 5},
                   headers={**bearer(stack.tokens["STAFF"]), "X-Request-ID": rid, "X-Forwarded-For": "203.0.113.9",
                            "X-User-Role": "ADMIN", "X-User-Sub": "someone-else", "Cookie": "session=1"})
    assert reply.status_code == 200
    seen = reply.json()
    assert reply.headers["X-Request-ID"] == rid
    assert seen["headers"]["x-request-id"] == rid
    assert seen["headers"]["x-user-sub"] == stack.users["STAFF"]
    assert seen["headers"]["x-user-role"] == "STAFF"  # the client's own X-User-Role is not passed on
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"  # the peer, not the address the client claimed
    assert "cookie" not in seen["headers"]
    assert seen["headers"]["authorization"] == f"Bearer {stack.tokens['STAFF']}"
    assert seen["path"] == "/patients/echo" and seen["query"] == "q=smith&limit=5"


def test_the_address_the_dashboard_vouches_for_is_the_one_forwarded(stack: Stack, gw: httpx.Client) -> None:
    assert stack.settings.jwt.secret is not None
    key = forwarding.derive_key(stack.settings.jwt.secret.get_secret_value())
    signed = gw.get("/api/patients/echo",
                    headers={**bearer(stack.tokens["STAFF"]), **forwarding.sign(key, "198.51.100.4")})
    assert signed.json()["headers"]["x-forwarded-for"] == "198.51.100.4"
    assert not any(name.startswith("x-pms-client") for name in signed.json()["headers"])  # not passed on
    unsigned = gw.get("/api/patients/echo", headers={**bearer(stack.tokens["STAFF"]),
                                                      forwarding.ADDRESS_HEADER: "198.51.100.4"})
    assert unsigned.json()["headers"]["x-forwarded-for"] == "127.0.0.1"


def test_request_id_generated_when_absent(stack: Stack, gw: httpx.Client) -> None:
    reply = gw.get("/api/patients/echo", headers=bearer(stack.tokens["STAFF"]))
    generated = reply.headers["X-Request-ID"]
    assert len(generated) >= 16 and reply.json()["headers"]["x-request-id"] == generated


def test_copies_status_body_and_headers(stack: Stack, gw: httpx.Client) -> None:
    staff = bearer(stack.tokens["STAFF"])
    created = gw.post("/api/patients", headers=staff, json={"name": "Copy Check"})
    assert created.status_code == 201
    pid = created.json()["id"]
    assert created.headers["Location"] == f"/api/patients/{pid}"  # upstream's absolute URL, rewritten
    one = gw.get(f"/api/patients/{pid}", headers=staff)
    assert one.status_code == 200 and one.headers["ETag"] == '"1"' and one.json()["name"] == "Copy Check"
    updated = gw.put(f"/api/patients/{pid}", headers={**staff, "If-Match": '"1"'}, json={"name": "Changed"})
    assert updated.status_code == 200 and updated.json()["version"] == 2
    assert stack.patient_seen.requests[-1]["headers"]["if-match"] == '"1"'
    listing = gw.get("/api/patients", headers=staff)
    assert int(listing.headers["X-Total-Count"]) == len(listing.json()) >= 1
    deleted = gw.delete(f"/api/patients/{pid}", headers=staff)
    assert deleted.status_code == 204 and deleted.content == b""
    missing = gw.get(f"/api/patients/{pid}", headers=staff)
    assert missing.status_code == 404 and missing.json() == {"message": "Patient not found", "errors": {}}


def test_auth_location_is_rewritten_into_the_gateway(stack: Stack, gw: httpx.Client) -> None:
    reply = gw.post("/auth/users", headers=bearer(stack.tokens["ADMIN"]),
                    json={"email": f"loc-{uuid.uuid4().hex[:8]}@clinic.example.org", "password": PASSWORD})
    assert reply.status_code == 201
    assert reply.headers["Location"] == f"/auth/users/{reply.json()['id']}"
    assert gw.get(reply.headers["Location"], headers=bearer(stack.tokens["ADMIN"])).status_code == 200


def test_api_docs_per_service(stack: Stack, gw: httpx.Client) -> None:
    for name, path in (("auth", "/login"), ("patients", "/patients"), ("analytics", "/analytics/{name}")):
        reply = gw.get(f"/api-docs/{name}")
        assert reply.status_code == 200, name
        assert path in reply.json()["paths"]
    assert gw.get("/api-docs/billing").status_code == 404
    own = gw.get("/openapi.json").json()
    assert "/api/patients" in own["paths"] and gw.get("/docs").status_code == 200


def test_body_limit_cors_and_security_headers(stack: Stack, gw: httpx.Client) -> None:
    staff = bearer(stack.tokens["STAFF"])
    too_big = gw.post("/api/patients", headers={**staff, "Content-Type": "application/json"},
                      content=b'{"name": "' + b"x" * 9000 + b'"}')
    assert too_big.status_code == 413 and error_shape(too_big)
    # Sent in chunks (no Content-Length): the limit is met while reading, still a 413, not a 500.
    for path, headers in (("/api/patients", staff), ("/auth/login", {})):
        chunked = gw.post(path, headers={**headers, "Content-Type": "application/json"},
                          content=iter([b'{"name": "', b"x" * 9000, b'"}']))
        assert chunked.status_code == 413 and error_shape(chunked), (path, chunked.text)
    dashboard = stack.settings.dashboard.base_url
    preflight = gw.options("/api/patients", headers={"Origin": dashboard, "Access-Control-Request-Method": "GET",
                                                     "Access-Control-Request-Headers": "Authorization"})
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == dashboard
    foreign = gw.options("/api/patients", headers={"Origin": "https://evil.example",
                                                   "Access-Control-Request-Method": "GET"})
    assert "Access-Control-Allow-Origin" not in foreign.headers
    reply = gw.get("/api/patients", headers={**staff, "Origin": dashboard})
    assert reply.headers["Access-Control-Allow-Origin"] == dashboard
    assert "X-Total-Count" in reply.headers["Access-Control-Expose-Headers"]
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    assert reply.headers["X-Frame-Options"] == "DENY"
    assert reply.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in reply.headers["Content-Security-Policy"]


def test_ops_endpoints(gw: httpx.Client) -> None:
    assert gw.get("/health").json() == {"status": "UP", "service": "gateway"}
    assert gw.get("/ready").status_code == 200
    assert 'route="/api/patients"' in gw.get("/metrics").text


def test_access_log_has_no_patient_data(stack: Stack, gw: httpx.Client) -> None:
    marker = f"Zebedee{uuid.uuid4().hex[:6]}"
    rid = uuid.uuid4().hex
    gw.get("/api/patients", params={"q": marker}, headers={**bearer(stack.tokens["STAFF"]), "X-Request-ID": rid})
    log_path = stack.gateway.log_path
    process.wait_until(lambda: rid in log_path.read_text(), timeout=10, message="access log line")
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if rid in line]
    assert lines and lines[0]["route"] == "/api/patients" and lines[0]["status"] == 200
    text = log_path.read_text()
    assert marker not in text and stack.users["STAFF"] not in text and PASSWORD not in text


# --- failures ---------------------------------------------------------------------------------------


def test_slow_upstream_is_504(stack: Stack, gw: httpx.Client) -> None:
    started = time.monotonic()
    reply = gw.get("/api/patients/slow", headers=bearer(stack.tokens["STAFF"]))
    assert reply.status_code == 504 and error_shape(reply)
    assert time.monotonic() - started < 4


def test_upstream_stopped_is_502_fast_and_recovers(stack: Stack, gw: httpx.Client) -> None:
    staff = bearer(stack.tokens["STAFF"])
    assert gw.get("/api/patients", headers=staff).status_code == 200  # warm a pooled connection
    stack.patient.stop()
    try:
        started = time.monotonic()
        reply = gw.get("/api/patients", headers=staff)
        elapsed = time.monotonic() - started
        assert reply.status_code == 502, reply.text
        assert reply.json() == {"message": "The patient service is unavailable", "errors": {}}
        assert elapsed < 1.0  # refused at once, well before the 1 s upstream timeout
        assert gw.get("/api/analytics/summary", headers=staff).status_code == 200  # others unaffected
        assert 'gateway_upstream_errors_total{kind="unavailable",upstream="patient"}' in gw.get("/metrics").text
    finally:
        stack.patient.start()
    process.wait_until(lambda: gw.get("/api/patients", headers=staff).status_code == 200,
                       timeout=10, message="gateway to reach the restarted patient service")


def test_auth_stopped_is_502_for_login(stack: Stack, gw: httpx.Client) -> None:
    stack.auth.stop()
    try:
        reply = gw.post("/auth/login", json={"email": "a@b.example", "password": "whatever-12345"})
        assert reply.status_code == 502 and error_shape(reply)
        # Tokens are checked locally, so patient calls keep working while auth is down.
        assert gw.get("/api/patients", headers=bearer(stack.tokens["STAFF"])).status_code == 200
    finally:
        stack.auth.start(timeout=60)
    login = gw.post("/auth/login", json={"email": stack.users["STAFF"], "password": PASSWORD})
    assert login.status_code == 200


# --- rate limit -------------------------------------------------------------------------------------


def test_rate_limit_per_caller(servers: ServerSet, stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> None:
    limit = 5
    settings = servers.make_settings(
        **{k: getattr(stack.settings, k).model_dump() for k in ("auth", "patient", "analytics")},
        gateway={"port": process.free_port(), "rate_limit_per_minute": limit},
    )
    gateway = ServiceProcess("gateway", settings, tmp_path_factory.mktemp("limited") / "gateway.log").start()
    try:
        with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
            staff, analyst = bearer(stack.tokens["STAFF"]), bearer(stack.tokens["ANALYST"])
            for _ in range(limit):
                assert client.get("/api/patients", headers=staff).status_code == 200
            limited = client.get("/api/patients", headers=staff)
            assert limited.status_code == 429 and error_shape(limited)
            assert 1 <= int(limited.headers["Retry-After"]) <= 60
            # Another caller has its own budget; the probes are never limited.
            assert client.get("/api/analytics/summary", headers=analyst).status_code == 200
            assert client.get("/health").status_code == 200
            # Anonymous callers are counted by address: the one they connect from, not one they write into
            # X-Forwarded-For (the gateway is the edge here, so it believes no such header).
            codes = [client.post("/auth/login", json={"email": "x@y.example", "password": "p" * 12},
                                 headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code for i in range(limit + 1)]
            assert codes[:limit] == [401] * limit and codes[limit] == 429
            # The dashboard vouches for its users' addresses (pms.forwarding): each browser has its own budget,
            # so one person's wrong passwords cannot lock every member of staff out of the dashboard.
            assert settings.jwt.secret is not None
            key = forwarding.derive_key(settings.jwt.secret.get_secret_value())

            def login_as(address: str, headers: dict[str, str]) -> int:
                return client.post("/auth/login", json={"email": "x@y.example", "password": "p" * 12},
                                   headers=headers).status_code

            browser = [login_as("203.0.113.1", forwarding.sign(key, "203.0.113.1")) for _ in range(limit + 1)]
            assert browser[:limit] == [401] * limit and browser[limit] == 429
            assert login_as("203.0.113.2", forwarding.sign(key, "203.0.113.2")) == 401  # another browser
            # A signature made with anything but the key vouches for nothing: the connection's budget (spent).
            forged = forwarding.sign(forwarding.derive_key("not the key" * 4), "203.0.113.3")
            assert login_as("203.0.113.3", forged) == 429
    finally:
        gateway.stop()
