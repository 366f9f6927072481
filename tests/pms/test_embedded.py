"""The embedded servers: databases, roles and extensions exist; restart keeps data."""

from __future__ import annotations

import psycopg
import pytest

from pms.embedded import broker_ready, libpq_dsn
from pms.settings import SERVICE_DATABASES
from tests.fixtures.servers import ServerSet

pytestmark = pytest.mark.integration


def test_every_service_database_exists_with_its_extensions(servers: ServerSet) -> None:
    settings = servers.settings
    for database in SERVICE_DATABASES:
        with psycopg.connect(libpq_dsn(settings.database_url_for(database))) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (database,)
    with psycopg.connect(libpq_dsn(settings.database_url_for("patients"))) as conn:
        names = {row[0] for row in conn.execute("SELECT extname FROM pg_extension")}
    assert {"pg_trgm", "fuzzystrmatch", "citext"} <= names


def test_analyst_role_reads_analytics_only(servers: ServerSet) -> None:
    analyst = servers.settings.analyst_url()
    with psycopg.connect(libpq_dsn(analyst)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("CREATE TABLE nope (id int)")
    with pytest.raises(psycopg.OperationalError, match="permission denied"):
        psycopg.connect(libpq_dsn(analyst.set(database="patients")))


def test_broker_answers(servers: ServerSet) -> None:
    assert broker_ready(servers.settings.bootstrap_servers)
