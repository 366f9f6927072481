"""Database access shared by every service: engines, sessions, the naming convention, migrations.

Each service owns one database (``auth``, ``patients``, ``billing``, ``analytics``) and
migrates it itself with Alembic on start (:func:`migrate`); nobody reads another
service's database.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import psycopg
from alembic import command
from alembic.config import Config
from fastapi import Depends, Request
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import ClauseElement, Engine, MetaData, create_engine, text
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from pms.settings import Settings

#: Index and constraint names come from here, so Alembic migrations are deterministic.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Service database -> the package holding its Alembic ``migrations/`` folder.
MIGRATION_PACKAGES = {
    "auth": "api.auth",
    "patients": "api.patient",
    "billing": "billing",
    "analytics": "stream_processing",
}

#: Arbitrary constant for pg_advisory_lock: two processes of one service never migrate at once.
_MIGRATION_LOCK_ID = 7_310_042


def new_metadata() -> MetaData:
    """A MetaData with the project's naming convention, one per service ``Base``."""
    return MetaData(naming_convention=NAMING_CONVENTION)


def make_engine(url: URL | str, *, pool_size: int = 10, max_overflow: int = 20, pre_ping: bool = True,
                **kwargs: object) -> Engine:
    """An engine with pre-ping, so a restarted PostgreSQL costs one retry, not an error storm.

    ``pre_ping=False`` for a hot path whose callers retry anyway (billing): the ping is a round
    trip per checkout. Without it the first statement on a connection broken by a restart fails
    (and SQLAlchemy then invalidates the whole pool, so it happens once, not per connection).
    """
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        **kwargs,  # type: ignore[arg-type]
    )


@lru_cache(maxsize=16)
def _engine_cache(url: str) -> Engine:
    return make_engine(url)


def engine_for(settings: Settings, database: str) -> Engine:
    """The process-wide engine of one service database."""
    return _engine_cache(settings.database_url_for(database).render_as_string(hide_password=False))


def async_pool(url: URL, *, max_size: int, timeout_s: float = 5.0, name: str | None = None) -> AsyncConnectionPool:
    """An unopened pool of AUTOCOMMIT psycopg connections for an async hot path (``await pool.open()``).

    For requests whose work is one or two single statements (the patient create): no threadpool
    hop, no ORM, no BEGIN/COMMIT. There is no ping per checkout; a connection broken by a
    database restart fails its request with ``OperationalError`` (a 503, see :mod:`pms.errors`) and
    the pool drops it; a caller that can retry (the create's read) runs ``pool.check()`` first to
    drop the other dead ones. While the database is down, a
    caller waits ``timeout_s`` for a connection (the pool reconnects in the background) and then
    gets ``PoolTimeout``, also a 503: keep it short. Connecting, each statement and a silent
    network are bounded too (connect timeout, statement timeout, TCP keepalives), so a hung
    server cannot hold a request for ever.

    Reconnection gives up after ``timeout_s``, as the waiting requests do (psycopg_pool's own backoff
    has no cap: after an 8 s outage its next attempt came seconds after the database was back); the
    next request then grows the emptied pool at once. Limits: a connect that hangs stretches one
    reconnection to ~7 s, and a request already waiting when a reconnection gives up gets its 503.
    """
    from pms.embedded import libpq_dsn

    connection = {"autocommit": True, **bounded_connection(connect_timeout_s=3, statement_timeout_ms=5000),
                  "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
    return AsyncConnectionPool(libpq_dsn(url), min_size=min(4, max_size), max_size=max_size, timeout=timeout_s,
                               reconnect_timeout=timeout_s, kwargs=connection, open=False, name=name)


def bounded_connection(*, connect_timeout_s: int, statement_timeout_ms: int) -> dict[str, Any]:
    """libpq connection parameters that bound connecting and every statement: a hung PostgreSQL
    becomes an error (a 503 / UNAVAILABLE), not a request or worker thread stuck for ever."""
    return {"connect_timeout": connect_timeout_s, "options": f"-c statement_timeout={statement_timeout_ms}"}


def psycopg_sql(statement: ClauseElement) -> str:
    """A ``text()`` or Core statement (``:name`` parameters) as psycopg SQL (``%(name)s``): one source for both."""
    return str(statement.compile(dialect=psycopg_dialect.dialect()))


@contextmanager
def driver_connection(engine: Engine) -> Iterator[psycopg.Connection[Any]]:
    """One of ``engine``'s pooled connections as plain psycopg, in autocommit: for one-statement hot paths.

    An ORM session costs billing ~0.3 ms of CPU per CreateBillingAccount and Core's execution
    machinery ~0.25 ms; this ~0.15 ms (in-process, 2,800 calls each). What they did that matters
    is kept: the connection comes from the engine's pool and goes back to it, and an error that
    SQLAlchemy's dialect calls a disconnect (PostgreSQL restarted) is handled the way a Core
    connection handles it: this connection is dropped and every one opened before it is replaced
    at its next checkout, so one call fails rather than one per pooled connection. Any other error
    (a statement timeout, a lock timeout, a refused value) leaves the pool alone. Autocommit is set
    for the call and put back.
    """
    fairy = engine.raw_connection()
    try:
        conn: psycopg.Connection[Any] = fairy.driver_connection  # type: ignore[assignment]
        was_autocommit = conn.autocommit
        if not was_autocommit:
            conn.autocommit = True  # idle connection: an attribute, no round trip
        try:
            yield conn
        except psycopg.Error as exc:
            if engine.dialect.is_disconnect(exc, conn, None):
                engine.pool._invalidate(fairy, exc)  # private, but exactly what Connection does on a disconnect
            raise
        finally:
            if not was_autocommit and not conn.closed:
                try:
                    conn.autocommit = False
                except psycopg.Error as exc:  # cannot hand it back as it was: do not hand it back at all
                    fairy.invalidate(exc)
    finally:
        fairy.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session committed on success and rolled back on any error (for workers and scripts)."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def request_session(request: Request) -> Iterator[Session]:
    """FastAPI dependency: one session per request from ``app.state.session_factory``.

    The service layer commits; this only closes, which rolls back whatever is left (for a read-only
    service, the end of its snapshot). When the database has already dropped the connection that
    rollback fails too; the answer (a 503) is on its way by then, so the error must not escape here.
    """
    session = request.app.state.session_factory()
    try:
        yield session
    finally:
        with suppress(DBAPIError):
            session.close()


#: A request's database session (see :func:`request_session`).
SessionDep = Annotated[Session, Depends(request_session)]


def alembic_config(settings: Settings, database: str, *, url: URL | None = None) -> Config:
    """The Alembic config of one service database (its package's ``migrations/`` folder)."""
    package = MIGRATION_PACKAGES[database]
    location = resources.files(package) / "migrations"
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(str(location))))
    db_url = url or settings.database_url_for(database)
    cfg.attributes["sqlalchemy_url"] = db_url
    # Migrations that grant to a role named in the settings (the analyst) read it from here.
    cfg.attributes["settings"] = settings
    return cfg


def migrate(settings: Settings, database: str, *, url: URL | None = None, revision: str = "head") -> None:
    """Upgrade one service database to ``revision`` (runs on every service start; idempotent)."""
    command.upgrade(alembic_config(settings, database, url=url), revision)


def run_migrations_env(target_metadata: MetaData) -> None:
    """Body of every service's ``migrations/env.py``: online migrations under an advisory lock."""
    from alembic import context

    cfg = context.config
    url = cfg.attributes.get("sqlalchemy_url") or cfg.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("no database URL given to Alembic")
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
            connection.commit()
            try:
                context.configure(connection=connection, target_metadata=target_metadata)
                with context.begin_transaction():
                    context.run_migrations()
                connection.commit()
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _MIGRATION_LOCK_ID})
                connection.commit()
    finally:
        engine.dispose()


def database_reachable(engine: Engine) -> bool:
    """For ``/ready``: can we run a trivial query right now?"""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
