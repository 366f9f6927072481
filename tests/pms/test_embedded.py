"""The embedded servers: databases, roles and extensions exist; stop/restart/crash keep data."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from pms import process
from pms.embedded import EmbeddedBroker, EmbeddedPostgres, PortInUseError, broker_ready, libpq_dsn
from pms.settings import SERVICE_DATABASES, KafkaSettings, PostgresSettings, Settings
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
    for database in ("patients", "auth", "billing", "postgres", "template1"):
        with pytest.raises(psycopg.OperationalError, match="permission denied"):
            psycopg.connect(libpq_dsn(analyst.set(database=database)))


def test_broker_answers(servers: ServerSet) -> None:
    assert broker_ready(servers.settings.bootstrap_servers)


# -- lifecycle of servers of our own (the session's are shared by every test) -------------------


@pytest.fixture
def own_settings(data_dir: Path) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=data_dir,
        postgres=PostgresSettings(port=process.free_port()),
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{process.free_port()}"),
    )


def _server_pids(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]


def _gone(procs: list[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)


@pytest.mark.slow
def test_postgres_start_stop_restart_and_crash_keep_data(own_settings: Settings) -> None:
    postgres = EmbeddedPostgres(own_settings)
    assert postgres.initialise() is True
    assert postgres.initialise() is False  # an existing cluster is reused, never re-created
    proc = postgres.start()
    tree = _server_pids(proc)
    dsn = libpq_dsn(own_settings.database_url_for("patients"))
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (id int PRIMARY KEY)")
            conn.execute("INSERT INTO kept VALUES (1)")
        with pytest.raises(PortInUseError, match="PMS_POSTGRES__PORT"):
            EmbeddedPostgres(own_settings).start()

        postgres.stop()
        assert postgres.proc is None
        assert _gone(tree)
        assert not process.port_in_use("127.0.0.1", own_settings.postgres.port)

        postgres.start()
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT id FROM kept").fetchall() == [(1,)]
            conn.execute("INSERT INTO kept VALUES (2)")  # committed, then the server is killed

        postgres.kill()  # crash: PostgreSQL recovers from its WAL on the next start
        postgres.start()
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT id FROM kept ORDER BY id").fetchall() == [(1,), (2,)]
        assert postgres.is_ready()
    finally:
        postgres.stop()
    assert not postgres.is_ready()


@pytest.mark.slow
def test_a_server_killed_under_a_long_query_restarts(own_settings: Settings) -> None:
    """Its busy backend outlives it and holds the shared memory; the next start ends that backend."""
    postgres = EmbeddedPostgres(own_settings)
    postgres.start()
    dsn = libpq_dsn(own_settings.database_url_for("analytics"))
    busy = psycopg.connect(dsn, autocommit=True)
    try:
        backend = busy.info.backend_pid
        worker = threading.Thread(target=lambda: _ignore_errors(
            # CPU only (generate_series would spill its rows to temp files): it never checks on its server.
            busy.execute, "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 1e10)"
                          " SELECT count(*) FROM t"), daemon=True)
        worker.start()
        process.wait_until(lambda: _running_query(own_settings, backend), timeout=10, interval=0.05,
                           message="the long query to run")
        postgres.kill()
        assert psutil.pid_exists(backend), "the backend should outlive its server (what this test is about)"
        postgres.start()
        assert not psutil.pid_exists(backend) or psutil.Process(backend).status() == psutil.STATUS_ZOMBIE
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        postgres.stop()
        busy.close()


def _ignore_errors(call: Any, *args: Any) -> None:
    try:
        call(*args)
    except psycopg.Error:
        pass  # the server (and then the backend) is killed under it


def _running_query(settings: Settings, backend: int) -> bool:
    with psycopg.connect(libpq_dsn(settings.database_url_for("patients")), autocommit=True) as conn:
        row = conn.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (backend,)).fetchone()
    return row is not None and row[0] == "active"


@pytest.mark.slow
def test_broker_restart_forgets_topics(own_settings: Settings) -> None:
    """Tansu keeps topics in memory: why the outbox, not the broker, is the durable history."""
    from confluent_kafka.admin import AdminClient, NewTopic

    broker = EmbeddedBroker(own_settings)
    proc = broker.start()
    try:
        with pytest.raises(PortInUseError, match="PMS_KAFKA__BOOTSTRAP_SERVERS"):
            EmbeddedBroker(own_settings).start()
        admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
        for future in admin.create_topics([NewTopic("remember-me", num_partitions=1)]).values():
            future.result(timeout=10)
        assert "remember-me" in admin.list_topics(timeout=10).topics

        tree = _server_pids(proc)
        broker.stop()
        assert _gone(tree)
        assert not broker_ready(broker.bootstrap_servers)

        broker.start()
        admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
        assert "remember-me" not in admin.list_topics(timeout=10).topics
    finally:
        broker.stop()
