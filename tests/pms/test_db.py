"""pms.db: Alembic migrations on an empty database, the naming convention, sessions.

Uses a throwaway database created by the test (the application role may CREATE DATABASE)
and a tiny migrations package of its own: the services' real migrations are tested by
their owners.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic import command
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import URL

from pms import db
from pms.embedded import libpq_dsn
from tests.fixtures.servers import ServerSet

pytestmark = pytest.mark.integration

ENV_PY = '''
from pms.db import new_metadata, run_migrations_env

run_migrations_env(new_metadata())
'''

VERSION_1 = '''
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "widget",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("code", sa.String(20), nullable=False, unique=True),
        sa.Column("kind", sa.String(10), nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("widget")
'''

VERSION_2 = '''
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "part",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("widget_id", sa.Integer, sa.ForeignKey("widget.id"), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("part")
'''


@pytest.fixture
def migrations_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A package with a migrations/ folder, registered as the owner of database 'throwaway'."""
    name = f"pms_test_migrations_{uuid.uuid4().hex[:8]}"
    versions = tmp_path / name / "migrations" / "versions"
    versions.mkdir(parents=True)
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / "migrations" / "env.py").write_text(ENV_PY)
    (versions / "0001_widget.py").write_text(VERSION_1)
    (versions / "0002_part.py").write_text(VERSION_2)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(db.MIGRATION_PACKAGES, "throwaway", name)
    yield name
    sys.modules.pop(name, None)


@pytest.fixture
def empty_database(servers: ServerSet) -> Iterator[URL]:
    server = servers.settings.server_url()
    name = f"throwaway_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(libpq_dsn(server), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield server.set(database=name, drivername="postgresql+psycopg")
    finally:
        with psycopg.connect(libpq_dsn(server), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def _constraints(url: URL) -> set[str]:
    with psycopg.connect(libpq_dsn(url)) as conn:
        rows = conn.execute(
            "SELECT conname FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
            "WHERE n.nspname = 'public' UNION SELECT indexname FROM pg_indexes WHERE schemaname = 'public'"
        ).fetchall()
    return {row[0] for row in rows}


def _version(url: URL) -> str | None:
    with psycopg.connect(libpq_dsn(url)) as conn:
        exists = conn.execute("SELECT to_regclass('alembic_version')").fetchone()
        if exists is None or exists[0] is None:
            return None
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return row[0] if row else None


def test_migrate_an_empty_database_to_head_with_convention_names(
    servers: ServerSet, migrations_package: str, empty_database: URL
) -> None:
    assert _version(empty_database) is None
    db.migrate(servers.settings, "throwaway", url=empty_database)
    assert _version(empty_database) == "0002"
    assert {"pk_widget", "uq_widget_code", "ix_widget_kind", "pk_part", "fk_part_widget_id_widget"} <= (
        _constraints(empty_database))

    db.migrate(servers.settings, "throwaway", url=empty_database)  # every start runs it again: no-op
    assert _version(empty_database) == "0002"

    command.downgrade(db.alembic_config(servers.settings, "throwaway", url=empty_database), "0001")
    assert _version(empty_database) == "0001"
    assert "pk_part" not in _constraints(empty_database)


def test_a_failing_migration_leaves_the_database_unchanged(
    servers: ServerSet, migrations_package: str, empty_database: URL, tmp_path: Path
) -> None:
    versions = tmp_path / migrations_package / "migrations" / "versions"
    (versions / "0003_broken.py").write_text(
        'from alembic import op\nrevision = "0003"\ndown_revision = "0002"\n'
        'def upgrade():\n    op.execute("CREATE TABLE half (id int)")\n    op.execute("SELECT no_such_function()")\n'
        'def downgrade():\n    pass\n'
    )
    with pytest.raises(Exception, match="no_such_function"):
        db.migrate(servers.settings, "throwaway", url=empty_database)
    # Postgres DDL is transactional: nothing of the failed run stays, not even 0001/0002.
    assert _version(empty_database) is None
    assert "pk_widget" not in _constraints(empty_database)


def test_session_scope_commits_or_rolls_back(
    servers: ServerSet, migrations_package: str, empty_database: URL
) -> None:
    db.migrate(servers.settings, "throwaway", url=empty_database)
    engine = db.make_engine(empty_database, pool_size=1, max_overflow=0)
    try:
        factory = db.session_factory(engine)
        with db.session_scope(factory) as session:
            session.execute(text("INSERT INTO widget (id, code, kind) VALUES (1, 'a', 'k')"))
        with pytest.raises(RuntimeError), db.session_scope(factory) as session:
            session.execute(text("INSERT INTO widget (id, code, kind) VALUES (2, 'b', 'k')"))
            raise RuntimeError("rolled back")
        with db.session_scope(factory) as session:
            assert session.execute(text("SELECT array_agg(id ORDER BY id) FROM widget")).scalar_one() == [1]
        assert db.database_reachable(engine)
    finally:
        engine.dispose()
    assert not db.database_reachable(db.make_engine(empty_database.set(port=1)))


def test_engine_for_is_shared_per_database(servers: ServerSet) -> None:
    assert db.engine_for(servers.settings, "auth") is db.engine_for(servers.settings, "auth")
    assert db.engine_for(servers.settings, "auth") is not db.engine_for(servers.settings, "billing")
    assert db.database_reachable(db.engine_for(servers.settings, "billing"))


def test_driver_connection_runs_in_autocommit_and_hands_the_connection_back_as_it_was(
    empty_database: URL,
) -> None:
    """The hot path's plain psycopg connection: autocommit for the call, the pool's own setting after."""
    engine = db.make_engine(empty_database, pool_size=1, max_overflow=0)
    try:
        with db.driver_connection(engine) as conn:
            assert conn.autocommit
            conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
            conn.execute("INSERT INTO t VALUES (1)")  # committed by itself: no transaction is left open
        with engine.connect() as sa_conn:  # the same pooled connection (pool of one), as SQLAlchemy expects it
            assert sa_conn.connection.driver_connection is conn
            assert not conn.autocommit
            assert sa_conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 1
        with pytest.raises(psycopg.errors.UniqueViolation), db.driver_connection(engine) as again:
            again.execute("INSERT INTO t VALUES (1)")
        with engine.connect() as sa_conn:  # a refused statement leaves the connection usable and in the pool
            assert sa_conn.connection.driver_connection is conn and not conn.autocommit
    finally:
        engine.dispose()


def test_driver_connection_drops_the_whole_pool_when_the_server_ends_a_connection(
    servers: ServerSet, empty_database: URL,
) -> None:
    """After a restart every pooled connection is dead: one call fails, the next ones get new connections."""
    engine = db.make_engine(empty_database, pool_size=3, max_overflow=0, pre_ping=False)
    try:
        held = [engine.raw_connection() for _ in range(3)]
        pids = {fairy.driver_connection.info.backend_pid for fairy in held}
        for fairy in held:
            fairy.close()
        with psycopg.connect(libpq_dsn(servers.settings.server_url()), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (list(pids),))
        with pytest.raises(psycopg.OperationalError), db.driver_connection(engine) as conn:
            conn.execute("SELECT 1")
        for _ in range(3):
            with db.driver_connection(engine) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
                assert conn.info.backend_pid not in pids
    finally:
        engine.dispose()


def test_driver_connection_keeps_the_pool_after_a_statement_timeout(empty_database: URL) -> None:
    """A timeout is an OperationalError too, but the connection is fine: dropping the pool would make
    every worker reconnect exactly when the database is slow."""
    engine = db.make_engine(empty_database, pool_size=1, max_overflow=0, pre_ping=False)
    try:
        with db.driver_connection(engine) as conn:
            pid = conn.info.backend_pid
        with pytest.raises(psycopg.errors.QueryCanceled), db.driver_connection(engine) as conn:
            conn.execute("SET statement_timeout = '50ms'")
            conn.execute("SELECT pg_sleep(5)")
        with db.driver_connection(engine) as conn:
            assert conn.info.backend_pid == pid
            conn.execute("RESET statement_timeout")
    finally:
        engine.dispose()
