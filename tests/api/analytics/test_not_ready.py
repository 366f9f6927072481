"""Before the pipeline has created the analytics tables the API answers 503, never 500."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql
from pydantic import SecretStr
from sqlalchemy.engine import URL

from api.analytics.main import create_app
from pms import db
from pms.embedded import libpq_dsn
from pms.security import Role, encode_token
from pms.settings import Settings
from tests.fixtures.servers import ServerSet

pytestmark = pytest.mark.integration

ROUTES = ("summary", "registrations", "demographics", "geography", "billing", "freshness")
NOT_READY = {"message": "analytics tables not created yet: is the pipeline running?", "errors": {}}


@pytest.fixture
def empty_analytics(servers: ServerSet) -> Iterator[tuple[URL, Settings]]:
    """A fresh empty database set up like ``analytics`` (the analyst may connect and reads new tables),
    and settings whose analyst login points at it. Dropped afterwards."""
    name = f"analytics_empty_{uuid.uuid4().hex[:8]}"
    owner = servers.settings.database_url_for("analytics")
    analyst = servers.settings.analyst_url()
    maintenance = libpq_dsn(owner.set(database="postgres"))
    with psycopg.connect(maintenance, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with psycopg.connect(libpq_dsn(owner.set(database=name)), autocommit=True) as conn:
            conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(name), sql.Identifier(str(analyst.username))))
            conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {}").format(
                sql.Identifier(str(analyst.username))))
        settings = servers.make_settings(analyst_database_url=SecretStr(
            analyst.set(database=name).render_as_string(hide_password=False)))
        yield owner.set(database=name), settings
    finally:
        with psycopg.connect(maintenance, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _headers(settings: Settings, role: Role) -> dict[str, str]:
    return {"Authorization": f"Bearer {encode_token(settings, sub='someone@pms.local', role=role)}"}


def test_every_route_answers_503_until_the_pipeline_has_migrated(empty_analytics: tuple[URL, Settings]) -> None:
    url, settings = empty_analytics
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for role in (Role.ANALYST, Role.ADMIN):
            for route in ROUTES:
                response = client.get(f"/analytics/{route}", headers=_headers(settings, role))
                assert response.status_code == 503, (route, response.text)
                assert response.json() == NOT_READY
                assert response.headers["Retry-After"] == "5"
        # What does not need the tables is decided first, as before: auth, then the parameters.
        assert client.get("/analytics/summary").status_code == 401
        bad = client.get("/analytics/geography?top=0", headers=_headers(settings, Role.STAFF))
        assert bad.status_code == 400 and "top" in bad.json()["errors"]
        # The database itself is reachable: the service is up, the pipeline is what is missing.
        assert client.get("/ready").status_code == 200

        db.migrate(settings, "analytics", url=url)  # what the pipeline does when it starts
        for route in ROUTES:
            response = client.get(f"/analytics/{route}", headers=_headers(settings, Role.ANALYST))
            assert response.status_code == 200, (route, response.text)
        assert client.get("/analytics/summary", headers=_headers(settings, Role.ANALYST)).json()[
            "activePatients"] == {"value": 0, "suppressed": False}


def test_an_api_newer_than_the_analytics_tables_answers_without_the_pipeline_state(
    empty_analytics: tuple[URL, Settings],
) -> None:
    """A rolling upgrade: tables the pipeline has not migrated to the heartbeat yet still give every answer."""
    url, settings = empty_analytics
    db.migrate(settings, "analytics", url=url, revision="0002_dead_letter_privacy")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for route in ROUTES:
            response = client.get(f"/analytics/{route}", headers=_headers(settings, Role.ANALYST))
            assert response.status_code == 200, (route, response.text)
        for route in ("summary", "freshness"):
            body = client.get(f"/analytics/{route}", headers=_headers(settings, Role.ANALYST)).json()
            assert body["pipeline"] is None
        db.migrate(settings, "analytics", url=url)
        for route in ("summary", "freshness"):
            body = client.get(f"/analytics/{route}", headers=_headers(settings, Role.ANALYST)).json()
            assert body["pipeline"] == {"running": False, "heartbeatAt": None}


def test_other_sql_errors_are_not_disguised_as_not_ready(empty_analytics: tuple[URL, Settings]) -> None:
    """Only a missing table means "wait for the pipeline": a refused privilege stays a 500 (a misconfiguration)."""
    url, settings = empty_analytics
    db.migrate(settings, "analytics", url=url)
    with psycopg.connect(libpq_dsn(url), autocommit=True) as conn:
        conn.execute(sql.SQL("REVOKE SELECT ON geography FROM {}").format(
            sql.Identifier(str(settings.analyst_url().username))))
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.get("/analytics/geography", headers=_headers(settings, Role.STAFF))
        assert response.status_code == 500
        assert response.json() == {"message": "Internal error", "errors": {}}
        assert client.get("/analytics/billing", headers=_headers(settings, Role.STAFF)).status_code == 200
