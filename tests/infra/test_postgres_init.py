"""Database bootstrap outside embedded mode, on real, fresh PostgreSQL servers.

Compose's Postgres runs docker/postgres/10-pms-databases.sh; on RDS the db-init task runs
``python -m infra.dbinit``. Both must give the services what the embedded server gives them:
the same databases, roles and extensions. Each runs here against its own brand-new cluster
whose built-in bootstrap is switched off, so only the tool under test creates anything, and
the same checks apply to both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pms import process
from pms.embedded import EXTENSIONS, EmbeddedPostgres, PortInUseError, pg_bin
from pms.settings import SERVICE_DATABASES, Settings

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "postgres" / "10-pms-databases.sh"
APP_PASSWORD = "app-pw-'quoted\"-for-the-test"
ANALYST_PASSWORD = "analyst pw; DROP ROLE x"


class BarePostgres(EmbeddedPostgres):
    """The embedded server without pms's own bootstrap, like the postgres image before its init scripts."""

    def bootstrap(self) -> None:
        return None


def _start_bare(tmp_path_factory: pytest.TempPathFactory, label: str) -> BarePostgres:
    data = tmp_path_factory.mktemp(label)
    for attempt in range(3):
        # A free port can be taken by another process before the server binds it: pick again.
        settings = Settings(_env_file=None, data_dir=data,  # type: ignore[call-arg]
                            postgres={"port": process.free_port()})
        server = BarePostgres(settings)
        try:
            server.start(timeout=180)  # initdb + start on a busy 2-core machine
            return server
        except PortInUseError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def bare_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BarePostgres]:
    server = _start_bare(tmp_path_factory, "pg-init-script")
    try:
        yield server
    finally:
        server.stop()


def run_script(server: BarePostgres, **env_overrides: str) -> subprocess.CompletedProcess[str]:
    url = server.superuser_url()
    env = {
        "PATH": f"{pg_bin('psql').parent}:{os.environ['PATH']}",
        "PGHOST": str(url.host),
        "PGPORT": str(url.port),
        "PGPASSWORD": str(url.password),
        "POSTGRES_USER": str(url.username),
        "POSTGRES_DB": "postgres",
        "PMS_DB_APP_PASSWORD": APP_PASSWORD,
        "PMS_DB_ANALYST_PASSWORD": ANALYST_PASSWORD,
        **env_overrides,
    }
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def connect(server: BarePostgres, *, user: str, password: str, dbname: str) -> psycopg.Connection:
    # Keyword arguments, not a URL: the test passwords hold spaces and quotes on purpose.
    return psycopg.connect(
        host=server.host, port=server.port, user=user, password=password, dbname=dbname, connect_timeout=5
    )


def run_dbinit(server: BarePostgres, *, login: tuple[str, str] | None = None,
               **env_overrides: str) -> subprocess.CompletedProcess[str]:
    url = server.superuser_url()
    if login is not None:
        url = url.set(username=login[0], password=login[1])
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PMS_")},
        # The URL form the deploy writes into Secrets Manager (db-master-url).
        "PMS_DBINIT_SUPERUSER_URL": url.set(drivername="postgresql").render_as_string(hide_password=False),
        "PMS_DB_APP_PASSWORD": APP_PASSWORD,
        "PMS_DB_ANALYST_PASSWORD": ANALYST_PASSWORD,
        **env_overrides,
    }
    return subprocess.run([sys.executable, "-m", "infra.dbinit"], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module", params=["compose-script", "ecs-dbinit"])
def initialised(request: pytest.FixtureRequest, bare_postgres: BarePostgres,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[BarePostgres]:
    if request.param == "compose-script":
        result = run_script(bare_postgres)
        assert result.returncode == 0, result.stderr
        yield bare_postgres
        return
    server = _start_bare(tmp_path_factory, "pg-init-dbinit")
    try:
        # Like RDS's master user: CREATEROLE and CREATEDB, but not a superuser.
        with psycopg.connect(host=server.host, port=server.port, user="postgres",
                             password=server.superuser_url().password, dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE ROLE rds_master LOGIN CREATEROLE CREATEDB PASSWORD 'master-pw'")
        result = run_dbinit(server, login=("rds_master", "master-pw"))
        assert result.returncode == 0, result.stderr
        yield server
    finally:
        server.stop()


def test_dbinit_refuses_to_run_without_its_secrets(bare_postgres: BarePostgres) -> None:
    result = run_dbinit(bare_postgres, PMS_DB_ANALYST_PASSWORD="")
    assert result.returncode == 2
    assert "PMS_DB_ANALYST_PASSWORD" in result.stderr


def test_refuses_to_run_without_passwords(bare_postgres: BarePostgres) -> None:
    result = run_script(bare_postgres, PMS_DB_APP_PASSWORD="")
    assert result.returncode != 0
    assert "PMS_DB_APP_PASSWORD" in result.stderr


def test_creates_every_service_database_with_its_extensions(initialised: BarePostgres) -> None:
    for database in SERVICE_DATABASES:
        with connect(initialised, user="pms", password=APP_PASSWORD, dbname=database) as conn:
            installed = {row[0] for row in conn.execute("SELECT extname FROM pg_extension")}
            owner = conn.execute(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
            ).fetchone()
        assert set(EXTENSIONS[database]) <= installed, database
        assert owner == ("pms",)


def test_script_and_embedded_bootstrap_agree_on_databases_and_extensions() -> None:
    text = SCRIPT.read_text()
    assert f"ARRAY[{', '.join(repr(d) for d in SERVICE_DATABASES)}]" in text
    for database, extensions in EXTENSIONS.items():
        assert f'[{database}]="{" ".join(extensions)}"' in text


def test_app_role_can_create_tables_and_analyst_reads_analytics_only(initialised: BarePostgres) -> None:
    with connect(initialised, user="pms", password=APP_PASSWORD, dbname="analytics") as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS init_probe (n int)")
        conn.execute("INSERT INTO init_probe VALUES (1)")
        conn.commit()
    with connect(initialised, user="pms_analyst", password=ANALYST_PASSWORD, dbname="analytics") as conn:
        assert conn.execute("SELECT count(*) FROM init_probe").fetchone() == (1,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO init_probe VALUES (2)")
    for database in ("patients", "auth", "billing"):
        with pytest.raises(psycopg.OperationalError, match="permission denied"):
            connect(initialised, user="pms_analyst", password=ANALYST_PASSWORD, dbname=database)


def test_second_run_changes_nothing_and_keeps_working(initialised: BarePostgres) -> None:
    # Either tool may run on a server the other (or an earlier run) bootstrapped.
    for result in (run_script(initialised), run_dbinit(initialised)):
        assert result.returncode == 0, result.stderr
    with connect(initialised, user="pms", password=APP_PASSWORD, dbname="patients") as conn:
        assert conn.execute("SELECT similarity('abc', 'abd') > 0").fetchone() == (True,)


def test_wrong_password_is_refused(initialised: BarePostgres) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(initialised, user="pms", password="not-the-password", dbname="patients")
