"""The gateway client against a real HTTP server: error shape -> typed exceptions, no connection -> unavailable."""

from __future__ import annotations

import httpx
import jwt
import pytest

from dashboard import client as gw
from pms import forwarding, process
from tests.dashboard.stub_gateway import PASSWORD, StubGateway


def test_login_returns_session_with_role_and_expiry(stub: StubGateway) -> None:
    auth = gw.GatewayClient(stub.url).login(email=" Admin@PMS.local ", password=PASSWORD)
    assert auth.role == "ADMIN"
    assert auth.email == "admin@pms.local"
    assert not auth.expired
    assert gw.GatewayClient(stub.url, auth.token).me()["role"] == "ADMIN"


@pytest.mark.parametrize(("token", "email"), [
    # The account as auth stores it, whatever the user typed (Python's lower() of "İ" is not PostgreSQL's).
    (jwt.encode({"sub": "\u0130rem@example.org", "role": "STAFF"}, "k" * 32), "\u0130rem@example.org"),
    ("not-a-jwt", "İrem@example.org".lower()),  # unreadable: the typed e-mail, lower-cased
    (jwt.encode({"role": "STAFF"}, "k" * 32), "İrem@example.org".lower()),  # no subject
])
def test_the_session_names_the_account_the_token_was_issued_to(token: str, email: str) -> None:
    def answer(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"token": token, "expiresIn": 60, "role": "STAFF"})

    client = gw.GatewayClient("http://gw.test", transport=httpx.MockTransport(answer))
    assert client.login(email=" İrem@example.org ", password="p").email == email


def test_login_on_behalf_of_a_browser_sends_the_signed_address() -> None:
    sent: list[httpx.Headers] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers)
        return httpx.Response(200, json={"token": "t", "expiresIn": 60, "role": "STAFF"})

    key = forwarding.derive_key("k" * 40)
    client = gw.GatewayClient("http://gw.test", transport=httpx.MockTransport(answer))
    client.login(email="a@b.example", password="p", on_behalf_of="203.0.113.5", forwarding_key=key)
    client.login(email="a@b.example", password="p", on_behalf_of=None, forwarding_key=key)  # localhost: none
    client.login(email="a@b.example", password="p", on_behalf_of="203.0.113.5", forwarding_key=None)
    first, second, third = sent
    assert forwarding.verified_address(key, first[forwarding.ADDRESS_HEADER],
                                       first[forwarding.SIGNATURE_HEADER]) == "203.0.113.5"
    assert forwarding.ADDRESS_HEADER not in second and forwarding.ADDRESS_HEADER not in third


def test_wrong_password_is_not_authenticated_and_then_rate_limited(stub: StubGateway) -> None:
    c = gw.GatewayClient(stub.url)
    for _ in range(5):
        with pytest.raises(gw.NotAuthenticated) as bad:
            c.login(email="staff@pms.local", password="wrong-password-123")
        assert bad.value.status == 401
    with pytest.raises(gw.RateLimited) as limited:
        c.login(email="staff@pms.local", password=PASSWORD)
    assert limited.value.retry_after == 300


def test_field_errors_come_back_per_field(stub: StubGateway) -> None:
    c = gw.GatewayClient(stub.url, stub.token("STAFF"))
    with pytest.raises(gw.InvalidInput) as exc:
        c.create_patient({"name": "", "email": "not-an-email", "address": "1 High St",
                          "dateOfBirth": "2999-01-01", "registeredDate": "2024-01-01", "shoeSize": 9})
    assert exc.value.status == 400
    assert set(exc.value.errors) == {"name", "email", "dateOfBirth", "shoeSize"}
    assert exc.value.errors["shoeSize"] == "Unknown field"


def test_crud_conflicts_and_roles(stub: StubGateway) -> None:
    staff = gw.GatewayClient(stub.url, stub.token("STAFF"))
    created = staff.create_patient({"name": "Ann Lee", "email": "ann@example.com", "address": "1 High St",
                                    "dateOfBirth": "1980-02-03", "registeredDate": "2024-01-01"})
    pid = created.patient["id"]
    assert created.patient["mrn"] and created.possible_duplicates == []
    page = staff.list_patients(q="ann", limit=10, offset=0)
    assert page.total == 1 and page.items[0]["id"] == pid
    with pytest.raises(gw.Conflict):
        staff.create_patient({"name": "Other", "email": "ANN@example.com", "address": "x",
                              "dateOfBirth": "1980-02-03", "registeredDate": "2024-01-01"})
    again = staff.create_patient({"name": "ann lee", "email": "ann2@example.com", "address": "2 High St",
                                  "dateOfBirth": "1980-02-03", "registeredDate": "2024-01-01"})
    assert [d["id"] for d in again.possible_duplicates] == [pid]
    body = {"name": "Ann Lee", "email": "ann@example.com", "address": "3 Low St", "dateOfBirth": "1980-02-03"}
    assert staff.update_patient(pid, body, version=1)["version"] == 2
    with pytest.raises(gw.Conflict):
        staff.update_patient(pid, body, version=1)
    with pytest.raises(gw.PermissionDenied):
        staff.patient_audit(pid)
    assert b'"resourceType":"Patient"' in staff.patient_fhir(pid)
    staff.delete_patient(pid)
    with pytest.raises(gw.NotFound):
        staff.get_patient(pid)
    with pytest.raises(gw.PermissionDenied):
        gw.GatewayClient(stub.url, stub.token("ANALYST")).list_patients()


def test_no_token_and_expired_token_are_not_authenticated(stub: StubGateway) -> None:
    with pytest.raises(gw.NotAuthenticated):
        gw.GatewayClient(stub.url).list_patients()
    with pytest.raises(gw.NotAuthenticated):
        gw.GatewayClient(stub.url, stub.token("STAFF", ttl_s=-60)).list_patients()


def test_upstream_down_and_unreachable_gateway_are_unavailable(stub: StubGateway) -> None:
    stub.state.down = True
    with pytest.raises(gw.GatewayUnavailable) as down:
        gw.GatewayClient(stub.url, stub.token("STAFF")).list_patients()
    assert down.value.status == 502
    with pytest.raises(gw.GatewayUnavailable) as refused:
        gw.GatewayClient(f"http://127.0.0.1:{process.free_port()}").login(email="a@b.c", password="x")
    assert refused.value.status == 503
    assert not gw.GatewayClient(f"http://127.0.0.1:{process.free_port()}").health()


def test_slow_gateway_is_a_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(gw.GatewayUnavailable) as exc:
        gw.GatewayClient("http://gateway", transport=httpx.MockTransport(handler)).analytics("summary")
    assert exc.value.status == 504


@pytest.mark.parametrize(
    ("status", "body", "expected", "message"),
    [
        (400, {"message": "Validation failed", "errors": {"name": "Required"}}, gw.InvalidInput, "Validation failed"),
        (403, {"message": "Not allowed for your role", "errors": {}}, gw.PermissionDenied, "Not allowed for your role"),
        (404, {"message": "Not found"}, gw.NotFound, "Not found"),
        (413, {"message": "Request body too large", "errors": {}}, gw.GatewayError, "Request body too large"),
        (500, "<html>oops</html>", gw.ServerError, "Request failed (500)"),
        (500, {"message": "Internal error", "errors": {}}, gw.ServerError, "Internal error"),
        (504, {"message": "Upstream service timed out", "errors": {}}, gw.GatewayUnavailable,
         "Upstream service timed out"),
    ],
)
def test_error_shape_maps_to_exception(status: int, body: object, expected: type, message: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    with pytest.raises(expected) as exc:
        gw.GatewayClient("http://gateway", "t", transport=httpx.MockTransport(handler)).get_patient("x")
    assert type(exc.value) is expected
    assert exc.value.message == message
    assert exc.value.status == status


def test_unknown_analytics_view_is_refused_before_any_call() -> None:
    with pytest.raises(ValueError, match="unknown analytics view"):
        gw.GatewayClient("http://gateway").analytics("patients")


def test_the_users_list_is_read_page_by_page_to_the_end() -> None:
    """Exploratory testing: the Users page asked for one page of 500 and counted only those."""
    accounts = [{"id": str(n), "email": f"u{n}@pms.local", "role": "STAFF", "active": True} for n in range(1203)]
    asked: list[tuple[int, int]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        limit, offset = int(request.url.params["limit"]), int(request.url.params["offset"])
        asked.append((limit, offset))
        return httpx.Response(200, json=accounts[offset:offset + limit], headers={"X-Total-Count": str(len(accounts))})

    users = gw.GatewayClient("http://gw.test", "t", transport=httpx.MockTransport(answer)).list_users()
    assert [u["id"] for u in users] == [a["id"] for a in accounts]
    assert asked == [(500, 0), (500, 500), (500, 1000)]
