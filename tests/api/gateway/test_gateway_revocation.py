"""Revoked tokens are refused at the gateway, not only at auth (real auth + real gateway)."""

from __future__ import annotations

import uuid

import httpx
import pytest

from pms import process
from tests.api.gateway.conftest import PASSWORD, Stack, bearer

pytestmark = pytest.mark.integration


def _new_staff(stack: Stack, gw: httpx.Client) -> tuple[str, str, str]:
    """A fresh STAFF user (id, email) and one of its tokens, so no other test's user is revoked."""
    email = f"revoked-{uuid.uuid4().hex[:8]}@clinic.example.org"
    created = gw.post("/auth/users", headers=bearer(stack.tokens["ADMIN"]),
                      json={"email": email, "password": PASSWORD, "role": "STAFF"})
    assert created.status_code == 201, created.text
    login = gw.post("/auth/login", json={"email": email, "password": PASSWORD})
    assert login.status_code == 200, login.text
    return created.json()["id"], email, login.json()["token"]


def _refused_soon(gw: httpx.Client, token: str, stack: Stack) -> None:
    """The gateway refuses ``token`` on a patient route within a few refresh intervals."""
    deadline = 10 * stack.settings.jwt.revocation_refresh_s + 5

    def refused() -> bool:
        return gw.get("/api/patients", headers=bearer(token)).status_code == 401

    process.wait_until(refused, timeout=deadline, interval=0.1, message="gateway to refuse the revoked token")
    reply = gw.get("/api/patients", headers=bearer(token))
    assert reply.status_code == 401 and "revoked" in reply.json()["message"]


def test_logged_out_token_is_refused_and_other_sessions_go_on(stack: Stack, gw: httpx.Client) -> None:
    _id, email, token = _new_staff(stack, gw)
    other = gw.post("/auth/login", json={"email": email, "password": PASSWORD}).json()["token"]
    assert gw.get("/api/patients", headers=bearer(token)).status_code == 200
    assert gw.post("/auth/logout", headers=bearer(token)).status_code == 204
    _refused_soon(gw, token, stack)
    assert gw.get("/api/patients", headers=bearer(other)).status_code == 200


def test_deactivated_users_token_is_refused_at_the_gateway(stack: Stack, gw: httpx.Client) -> None:
    user_id, email, token = _new_staff(stack, gw)
    assert gw.get("/api/patients", headers=bearer(token)).status_code == 200
    reply = gw.patch(f"/auth/users/{user_id}", headers=bearer(stack.tokens["ADMIN"]), json={"active": False})
    assert reply.status_code == 200
    _refused_soon(gw, token, stack)
    assert gw.post("/auth/login", json={"email": email, "password": PASSWORD}).status_code == 401


def test_revocation_list_is_not_exposed_by_the_gateway(stack: Stack, gw: httpx.Client) -> None:
    assert gw.get("/auth/revocations", headers=bearer(stack.tokens["ADMIN"])).status_code == 404


def test_gateway_reports_the_age_of_its_list(gw: httpx.Client) -> None:
    def fetched() -> bool:
        metrics = gw.get("/metrics").text
        line = next(row for row in metrics.splitlines() if row.startswith("gateway_revocation_list_age_seconds"))
        return 0 <= float(line.split()[-1]) < 60

    process.wait_until(fetched, timeout=30, interval=0.2, message="a first revocation list")
