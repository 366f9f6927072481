"""The one error layer maps database failures for every service: outage -> 503, refused value -> 400."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import exc as sa_exc

from pms.settings import Settings
from pms.web import create_service_app


class _DriverError(Exception):
    pass


@pytest.fixture
def client(tmp_path) -> TestClient:
    app = create_service_app(name="probe", settings=Settings(_env_file=None, data_dir=tmp_path),  # type: ignore[call-arg]
                             title="probe")

    @app.get("/data-error")
    def data_error() -> None:
        raise sa_exc.DataError("INSERT ...", {"name": "Jane Doe"}, _DriverError("NUL byte"))

    @app.get("/outage")
    def outage() -> None:
        raise sa_exc.OperationalError("SELECT 1", {}, _DriverError("connection refused"))

    @app.get("/pool")
    def pool() -> None:
        raise sa_exc.TimeoutError("QueuePool limit reached")

    @app.get("/integrity")
    def integrity() -> None:
        raise sa_exc.IntegrityError("INSERT ...", {}, _DriverError("unique violation"))

    return TestClient(app, raise_server_exceptions=False)


def test_a_value_the_database_refuses_is_a_400(client: TestClient) -> None:
    reply = client.get("/data-error")
    assert reply.status_code == 400
    assert set(reply.json()) == {"message", "errors"} and "Jane" not in reply.text


@pytest.mark.parametrize("path", ["/outage", "/pool"])
def test_an_outage_is_a_503_with_retry_after(client: TestClient, path: str) -> None:
    reply = client.get(path)
    assert reply.status_code == 503 and reply.headers["Retry-After"] == "1"


def test_other_database_errors_stay_a_bare_500(client: TestClient) -> None:
    reply = client.get("/integrity")
    assert reply.status_code == 500 and reply.json() == {"message": "Internal error", "errors": {}}


def test_logs_name_the_route_not_the_values(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    client.get("/outage")
    client.get("/data-error")
    assert "Jane" not in caplog.text and "/outage" in caplog.text
