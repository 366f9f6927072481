"""The trigger-kept active count (migration 0004): the unfiltered list's X-Total-Count without a scan.

Every test compares the sum of ``patient_active_count_deltas`` with ``count(*)`` of the active
patients, on a database of its own, after bulk inserts (``create_many``), soft deletes and
restores, updates of other columns, hard deletes, TRUNCATE, folds, concurrent writers and the
backfill of a database that already had patients when it was upgraded. The single-statement
create of the API is covered by ``test_api.py::test_the_unfiltered_total_is_exact``.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Iterator
from datetime import date

import psycopg
import pytest
from alembic import command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from sqlalchemy.engine import URL

from api.patient import repository as patient_repository
from api.patient import service as patient_service
from api.patient.schemas import PatientCreate
from pms import db, process
from pms.embedded import EXTENSIONS, libpq_dsn
from tests.fixtures.servers import ServerSet

pytestmark = pytest.mark.integration

BEFORE = "0003_write_path"


@pytest.fixture(scope="module")
def patients_db(servers: ServerSet) -> Iterator[URL]:
    """A patients database of this module's own, with its extensions, not yet migrated."""
    server = servers.settings.server_url()
    name = f"patients_count_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq_dsn(server), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = server.set(database=name, drivername="postgresql+psycopg")
    with psycopg.connect(libpq_dsn(url), autocommit=True) as conn:
        for extension in EXTENSIONS["patients"]:
            conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(extension)))
    try:
        yield url
    finally:
        with psycopg.connect(libpq_dsn(server), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def _counts(url: URL) -> tuple[int, int]:
    """(kept count, counted count) in one snapshot."""
    with psycopg.connect(libpq_dsn(url)) as conn:
        row = conn.execute("SELECT (SELECT coalesce(sum(delta), 0) FROM patient_active_count_deltas),"
                           "       (SELECT count(*) FROM patients WHERE deleted_at IS NULL)").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _create(url: URL, count: int) -> None:
    """``count`` patients through the service's bulk path (COPY to a staging table, one INSERT)."""
    items = [PatientCreate.model_validate({
        "name": f"Count Person {i}", "email": f"count.{uuid.uuid4().hex[:12]}@example.org", "address": "1 Road",
        "dateOfBirth": date(1960 + i % 40, 1 + i % 12, 1 + i % 28).isoformat(), "registeredDate": "2024-01-01",
    }) for i in range(count)]
    engine = db.make_engine(url, pool_size=1, max_overflow=0)
    try:
        with db.session_factory(engine)() as session:
            assert patient_service.create_many(session=session, items=items, actor="test") == count
    finally:
        engine.dispose()


def _migrate(servers: ServerSet, url: URL, revision: str = "head") -> None:
    db.migrate(servers.settings, "patients", url=url, revision=revision)


def test_the_upgrade_counts_the_patients_already_there_and_the_downgrade_removes_it(
        servers: ServerSet, patients_db: URL) -> None:
    _migrate(servers, patients_db, BEFORE)
    _create(patients_db, 25)
    with psycopg.connect(libpq_dsn(patients_db), autocommit=True) as conn:
        conn.execute("UPDATE patients SET deleted_at = now() WHERE id IN (SELECT id FROM patients LIMIT 4)")
    _migrate(servers, patients_db)
    assert _counts(patients_db) == (21, 21)

    command.downgrade(db.alembic_config(servers.settings, "patients", url=patients_db), BEFORE)
    with psycopg.connect(libpq_dsn(patients_db)) as conn:
        assert conn.execute("SELECT to_regclass('patient_active_count_deltas')").fetchone() == (None,)
        triggers = conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'patient_active_count%'")
        assert triggers.fetchone() == (0,)
    _create(patients_db, 3)  # no trigger: nothing is counted until the upgrade backfills again
    _migrate(servers, patients_db)
    assert _counts(patients_db) == (24, 24)


_OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("insert"), st.integers(1, 30)),
    st.tuples(st.just("soft-delete"), st.integers(0, 10)),
    st.tuples(st.just("restore"), st.integers(0, 10)),
    st.tuples(st.just("edit"), st.integers(0, 10)),  # an update of other columns: no change
    st.tuples(st.just("hard-delete"), st.integers(0, 5)),
    st.tuples(st.just("fold"), st.just(0)),
    st.tuples(st.just("rolled back"), st.just(0)),
    st.tuples(st.just("truncate"), st.just(0)),
), min_size=1, max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=_OPERATIONS)
def test_the_kept_count_equals_the_counted_one_after_any_changes(servers: ServerSet, patients_db: URL,
                                                                  operations: list[tuple[str, int]]) -> None:
    _migrate(servers, patients_db)
    for operation, n in operations:
        with psycopg.connect(libpq_dsn(patients_db), autocommit=True) as conn:
            pick = "SELECT id FROM patients WHERE deleted_at {} NULL ORDER BY random() LIMIT %s"
            if operation == "insert":
                _create(patients_db, n)
            elif operation == "soft-delete":
                conn.execute(f"UPDATE patients SET deleted_at = now() WHERE id IN ({pick.format('IS')})", (n,))
            elif operation == "restore":
                conn.execute(f"UPDATE patients SET deleted_at = NULL WHERE id IN ({pick.format('IS NOT')})", (n,))
            elif operation == "edit":
                conn.execute("UPDATE patients SET version = version + 1 WHERE id IN "
                             "(SELECT id FROM patients ORDER BY random() LIMIT %s)", (n,))
            elif operation == "hard-delete":
                conn.execute("DELETE FROM patients WHERE id IN (SELECT id FROM patients ORDER BY random() LIMIT %s)",
                             (n,))
            elif operation == "fold":
                conn.execute("SELECT patient_active_count_compact()")
                assert conn.execute("SELECT count(*) <= 1 FROM patient_active_count_deltas").fetchone() == (True,)
            elif operation == "rolled back":
                with pytest.raises(RuntimeError), conn.transaction():
                    conn.execute("UPDATE patients SET deleted_at = now() WHERE deleted_at IS NULL")
                    raise RuntimeError("rolled back")
            else:
                conn.execute("TRUNCATE patients, patient_outbox, patient_audit")
        kept, counted = _counts(patients_db)
        assert kept == counted, (operation, n)


def test_the_unfiltered_list_total_is_the_kept_count(servers: ServerSet, patients_db: URL) -> None:
    _migrate(servers, patients_db)
    _create(patients_db, 5)
    engine = db.make_engine(patients_db, pool_size=1, max_overflow=0)
    try:
        with db.session_factory(engine)() as session:
            _, total = patient_repository.search(session, q=None, phone=None, limit=1, offset=0)
        kept, counted = _counts(patients_db)
        assert total == kept == counted
        with psycopg.connect(libpq_dsn(patients_db), autocommit=True) as conn:
            # The list really reads the deltas: a wrong one shows (it can only come from outside the triggers).
            conn.execute("INSERT INTO patient_active_count_deltas (delta) VALUES (1000)")
            try:
                with db.session_factory(engine)() as session:
                    assert patient_repository.search(session, q=None, phone=None, limit=1, offset=0)[1] == total + 1000
            finally:
                conn.execute("DELETE FROM patient_active_count_deltas WHERE delta = 1000")
    finally:
        engine.dispose()


def test_concurrent_writers_and_folds_stay_exact(servers: ServerSet, patients_db: URL) -> None:
    """Writers append without waiting for each other; folds run beside them (one at a time, by
    try-lock) and never lose or double a delta committed meanwhile."""
    _migrate(servers, patients_db)
    _create(patients_db, 40)
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(libpq_dsn(patients_db), autocommit=True) as conn:
                for _ in range(40):
                    choice = rng.random()
                    if choice < 0.4:
                        _create(patients_db, rng.randint(1, 3))
                    elif choice < 0.6:
                        conn.execute("UPDATE patients SET deleted_at = now() WHERE id IN (SELECT id FROM patients "
                                     "WHERE deleted_at IS NULL ORDER BY random() LIMIT 1)")
                    elif choice < 0.75:
                        conn.execute("UPDATE patients SET deleted_at = NULL WHERE id IN (SELECT id FROM patients "
                                     "WHERE deleted_at IS NOT NULL ORDER BY random() LIMIT 1)")
                    else:
                        conn.execute("SELECT patient_active_count_compact()")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads), "a writer is still running"
    assert not errors, errors
    kept, counted = _counts(patients_db)
    assert kept == counted


def test_a_fold_inside_a_repeatable_read_transaction_does_nothing(servers: ServerSet, patients_db: URL) -> None:
    """At REPEATABLE READ a fold could hit a row another fold deleted (a serialization error in a
    writer's transaction); it is skipped there, and the count stays exact."""
    _migrate(servers, patients_db)
    _create(patients_db, 2)
    with psycopg.connect(libpq_dsn(patients_db), autocommit=True) as conn:
        conn.execute("INSERT INTO patient_active_count_deltas (delta) VALUES (5), (-5)")  # two rows, sum 0
    with psycopg.connect(libpq_dsn(patients_db)) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        before = conn.execute("SELECT count(*) FROM patient_active_count_deltas").fetchone()
        assert before is not None and before[0] >= 2
        conn.execute("SELECT patient_active_count_compact()")
        assert conn.execute("SELECT count(*) FROM patient_active_count_deltas").fetchone() == before
        conn.commit()
    kept, counted = _counts(patients_db)
    assert kept == counted


def test_truncate_outside_read_committed_is_refused(servers: ServerSet, patients_db: URL) -> None:
    """Its DELETE of the deltas would miss those committed after its snapshot (kept 2, counted 0)."""
    _migrate(servers, patients_db)
    with psycopg.connect(libpq_dsn(patients_db)) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.execute("SELECT 1")  # the snapshot is taken here
        _create(patients_db, 2)  # committed after it
        with pytest.raises(psycopg.errors.RaiseException, match="needs READ COMMITTED"):
            conn.execute("TRUNCATE patients, patient_outbox, patient_audit")
        conn.rollback()
    kept, counted = _counts(patients_db)
    assert kept == counted > 0


def test_truncate_waits_for_a_fold_in_progress(servers: ServerSet, patients_db: URL) -> None:
    """A fold called directly holds no lock on patients: TRUNCATE must wait for it, or it would
    skip the fold's folded row and leave a count for an empty table."""
    _migrate(servers, patients_db)
    _create(patients_db, 3)
    _create(patients_db, 4)
    errors: list[BaseException] = []
    with psycopg.connect(libpq_dsn(patients_db)) as folder:
        folder.execute("SELECT patient_active_count_compact()")  # uncommitted: holds the fold lock
        with psycopg.connect(libpq_dsn(patients_db), autocommit=True) as truncater:
            pid = truncater.info.backend_pid

            def truncate() -> None:
                try:
                    truncater.execute("TRUNCATE patients, patient_outbox, patient_audit")
                except BaseException as exc:  # surfaced below
                    errors.append(exc)

            thread = threading.Thread(target=truncate)
            thread.start()
            waiting = "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s"
            with psycopg.connect(libpq_dsn(patients_db), autocommit=True) as watcher:
                process.wait_until(lambda: watcher.execute(waiting, (pid,)).fetchone() == (True,),
                                   timeout=30, message="TRUNCATE waiting for the fold")
            folder.commit()
            thread.join(30)
            assert not thread.is_alive() and not errors, errors
    assert _counts(patients_db) == (0, 0)
