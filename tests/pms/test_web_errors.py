"""The one error layer maps database failures for every service: outage -> 503, refused value -> 400."""

from __future__ import annotations

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg_pool import PoolTimeout
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

    # The async hot paths raise psycopg's own errors (pms.db.async_pool): the same answers.
    @app.get("/pg-data-error")
    async def pg_data_error() -> None:
        raise psycopg.errors.CharacterNotInRepertoire("invalid byte sequence for encoding UTF8: Jane")

    @app.get("/pg-outage")
    async def pg_outage() -> None:
        raise psycopg.OperationalError("connection refused")

    @app.get("/pg-pool")
    async def pg_pool() -> None:
        raise PoolTimeout("couldn't get a connection after 5.00 sec")

    @app.get("/pg-integrity")
    async def pg_integrity() -> None:
        raise psycopg.errors.ForeignKeyViolation("violates foreign key constraint")

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("path", ["/data-error", "/pg-data-error"])
def test_a_value_the_database_refuses_is_a_400(client: TestClient, path: str) -> None:
    reply = client.get(path)
    assert reply.status_code == 400
    assert set(reply.json()) == {"message", "errors"} and "Jane" not in reply.text


@pytest.mark.parametrize("path", ["/outage", "/pool", "/pg-outage", "/pg-pool"])
def test_an_outage_is_a_503_with_retry_after(client: TestClient, path: str) -> None:
    reply = client.get(path)
    assert reply.status_code == 503 and reply.headers["Retry-After"] == "1"


@pytest.mark.parametrize("path", ["/integrity", "/pg-integrity"])
def test_other_database_errors_stay_a_bare_500(client: TestClient, path: str) -> None:
    reply = client.get(path)
    assert reply.status_code == 500 and reply.json() == {"message": "Internal error", "errors": {}}


def test_logs_name_the_route_not_the_values(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    for path in ("/outage", "/data-error", "/pg-data-error", "/pg-outage"):
        client.get(path)
    assert "Jane" not in caplog.text and "/outage" in caplog.text and "/pg-outage" in caplog.text


def test_a_quiet_routes_successful_calls_are_logged_at_debug_and_its_failures_at_info(
        tmp_path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    app = create_service_app(name="probe", settings=Settings(_env_file=None, data_dir=tmp_path),  # type: ignore[call-arg]
                             title="probe", quiet_routes=frozenset({"/polled/{key}"}))

    @app.get("/polled/{key}")
    def polled(key: str) -> dict[str, str]:
        if key == "bad":
            raise sa_exc.OperationalError("SELECT 1", {}, _DriverError("connection refused"))
        return {"key": key}

    @app.get("/other")
    def other() -> dict[str, str]:
        return {}

    caplog.set_level("DEBUG", logger="pms.access")
    with TestClient(app) as client:
        client.get("/polled/ok")
        client.get("/polled/bad")
        client.get("/other")
    levels = {(r.fields["route"], r.fields["status"]): r.levelname  # type: ignore[attr-defined]
              for r in caplog.records if r.getMessage() == "request"}
    assert levels == {("/polled/{key}", 200): "DEBUG", ("/polled/{key}", 503): "INFO", ("/other", 200): "INFO"}
