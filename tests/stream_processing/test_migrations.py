"""Alembic owns the analytics DDL: the migrated database matches the models the code reads."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from psycopg import sql
from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import URL

from pms import db
from pms.embedded import libpq_dsn
from stream_processing import models
from tests.fixtures.servers import ServerSet

pytestmark = pytest.mark.integration


def test_migrated_schema_equals_the_models(analytics_engine: Engine) -> None:
    with analytics_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), models.metadata)
    assert diff == []


def test_no_analytics_table_has_a_pii_column(analytics_engine: Engine) -> None:
    inspector = inspect(analytics_engine)
    columns = {c["name"] for t in inspector.get_table_names() for c in inspector.get_columns(t)}
    assert not columns & {"name", "email", "phone", "address", "first_name", "last_name"}
    assert set(models.metadata.tables) <= set(inspector.get_table_names())


# -- 0002_dead_letter_privacy: the analyst reads every dead-letter column but the raw bytes ----------------

DEAD_LETTER_READABLE = "id, topic, partition, kafka_offset, reason, raw_digest, received_at"


@pytest.fixture
def one_dead_letter(analytics_engine: Engine) -> Iterator[None]:
    """Exactly one dead letter (raw bytes that look like patient data) for the test, none afterwards."""
    with analytics_engine.begin() as conn:
        conn.execute(text("TRUNCATE dead_letters"))
        conn.execute(text("INSERT INTO dead_letters (topic, partition, kafka_offset, reason, raw, raw_digest) "
                          "VALUES ('patient', 0, 7, 'not a PatientEvent', :raw, 'd1')"), {"raw": b"name=Jane Doe"})
    yield
    with analytics_engine.begin() as conn:
        conn.execute(text("TRUNCATE dead_letters"))


def _assert_analyst_cannot_read_raw(servers: ServerSet) -> None:
    with psycopg.connect(libpq_dsn(servers.settings.analyst_url())) as conn:
        for query in ("SELECT raw FROM dead_letters", "SELECT * FROM dead_letters",
                      "SELECT id FROM dead_letters WHERE raw IS NOT NULL"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                conn.execute(query)
            conn.rollback()
        rows = conn.execute(f"SELECT {DEAD_LETTER_READABLE} FROM dead_letters").fetchall()
        assert [(r[1], r[2], r[3], r[4], r[5]) for r in rows] == [("patient", 0, 7, "not a PatientEvent", "d1")]
        assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (1,)
        # Every other analytics table stays wholly readable.
        for table in sorted(set(models.metadata.tables) - {"dead_letters"}):
            conn.execute(f'SELECT * FROM "{table}" LIMIT 1')


@pytest.mark.usefixtures("one_dead_letter")
def test_the_analyst_role_reads_dead_letters_but_not_their_raw_bytes(servers: ServerSet) -> None:
    _assert_analyst_cannot_read_raw(servers)


@pytest.mark.usefixtures("one_dead_letter")
def test_a_later_bootstrap_does_not_grant_the_raw_bytes_back(servers: ServerSet) -> None:
    """``pms up`` grants the analyst every table on each start; a narrowed table must stay narrowed."""
    if servers.postgres is None:
        pytest.skip("needs the embedded server's superuser")
    servers.postgres.bootstrap()
    _assert_analyst_cannot_read_raw(servers)


@pytest.mark.usefixtures("one_dead_letter")
def test_bootstrap_narrows_a_table_widened_again_as_pms_restore_does(servers: ServerSet,
                                                                      analytics_engine: Engine) -> None:
    """``pms restore`` recreates dead_letters under the default privileges (a table-wide SELECT for the analyst)
    and then replays only its column grants; the bootstrap it runs afterwards must take the table-wide one back."""
    if servers.postgres is None:
        pytest.skip("needs the embedded server's superuser")
    try:
        with analytics_engine.begin() as conn:
            conn.execute(text("GRANT SELECT ON dead_letters TO pms_analyst"))
        with psycopg.connect(libpq_dsn(servers.settings.analyst_url())) as conn:
            assert conn.execute("SELECT raw FROM dead_letters").fetchone() == (b"name=Jane Doe",)  # widened
        servers.postgres.bootstrap()
        _assert_analyst_cannot_read_raw(servers)
    finally:
        with analytics_engine.begin() as conn:
            conn.execute(text("REVOKE SELECT ON dead_letters FROM pms_analyst"))
            conn.execute(text(f"GRANT SELECT ({DEAD_LETTER_READABLE}) ON dead_letters TO pms_analyst"))


@pytest.fixture
def scratch_analytics(servers: ServerSet) -> Iterator[URL]:
    """An empty database shaped like ``analytics`` (the analyst reads new tables by default), dropped after."""
    name = f"analytics_scratch_{uuid.uuid4().hex[:8]}"
    maintenance = libpq_dsn(servers.settings.database_url_for("analytics").set(database="postgres"))
    with psycopg.connect(maintenance, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = servers.settings.database_url_for("analytics").set(database=name)
    try:
        with psycopg.connect(libpq_dsn(url), autocommit=True) as conn:
            conn.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO pms_analyst")
        yield url
    finally:
        with psycopg.connect(maintenance, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _raw_readable(url: URL) -> dict[str, tuple[bool, bool]]:
    """Per role: (may read ``raw``, may read ``reason``)."""
    with psycopg.connect(libpq_dsn(url)) as conn:
        return {role: conn.execute(
            "SELECT has_column_privilege(%s, 'dead_letters', 'raw', 'SELECT'), "
            "has_column_privilege(%s, 'dead_letters', 'reason', 'SELECT')", (role, role)).fetchone()
            for role in ("pms_analyst", "public")}


def test_the_privacy_migration_narrows_every_reader_and_downgrades_cleanly(servers: ServerSet,
                                                                           scratch_analytics: URL) -> None:
    settings = servers.settings
    db.migrate(settings, "analytics", url=scratch_analytics, revision="0001_analytics_tables")
    with psycopg.connect(libpq_dsn(scratch_analytics), autocommit=True) as conn:
        conn.execute("GRANT SELECT ON dead_letters TO PUBLIC")  # a careless grant made by hand
    assert _raw_readable(scratch_analytics) == {"pms_analyst": (True, True), "public": (True, True)}

    db.migrate(settings, "analytics", url=scratch_analytics, revision="0002_dead_letter_privacy")
    assert _raw_readable(scratch_analytics) == {"pms_analyst": (False, True), "public": (False, True)}

    command.downgrade(db.alembic_config(settings, "analytics", url=scratch_analytics), "0001_analytics_tables")
    assert _raw_readable(scratch_analytics)["pms_analyst"] == (True, True)
    db.migrate(settings, "analytics", url=scratch_analytics)  # head, whatever later revisions add
    assert _raw_readable(scratch_analytics)["pms_analyst"] == (False, True)
