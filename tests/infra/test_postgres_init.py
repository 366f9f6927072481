"""docker/postgres/10-pms-databases.sh on a real, fresh PostgreSQL: what compose's Postgres gets.

The embedded server (pms.embedded) and the container (this script) must give the services the
same databases, roles and extensions; the script is run here with the bundled psql against a
brand-new cluster whose own bootstrap is switched off, so only the script creates anything.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pms import process
from pms.embedded import EXTENSIONS, EmbeddedPostgres, pg_bin
from pms.settings import SERVICE_DATABASES, Settings

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "postgres" / "10-pms-databases.sh"
APP_PASSWORD = "app-pw-'quoted\"-for-the-test"
ANALYST_PASSWORD = "analyst pw; DROP ROLE x"


class BarePostgres(EmbeddedPostgres):
    """The embedded server without pms's own bootstrap, like the postgres image before its init scripts."""

    def bootstrap(self) -> None:
        return None


@pytest.fixture(scope="module")
def bare_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BarePostgres]:
    data = tmp_path_factory.mktemp("pg-init")
    settings = Settings(_env_file=None, data_dir=data, postgres={"port": process.free_port()})  # type: ignore[call-arg]
    server = BarePostgres(settings)
    server.start()
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


@pytest.fixture(scope="module")
def initialised(bare_postgres: BarePostgres) -> BarePostgres:
    result = run_script(bare_postgres)
    assert result.returncode == 0, result.stderr
    return bare_postgres


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
    result = run_script(initialised)
    assert result.returncode == 0, result.stderr
    with connect(initialised, user="pms", password=APP_PASSWORD, dbname="patients") as conn:
        assert conn.execute("SELECT similarity('abc', 'abd') > 0").fetchone() == (True,)


def test_wrong_password_is_refused(initialised: BarePostgres) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(initialised, user="pms", password="not-the-password", dbname="patients")
