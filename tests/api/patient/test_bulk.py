"""Bulk paths and query plans: seed, demo data, and index-backed search and duplicate lookups."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date

import pytest
from sqlalchemy import event, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from api.patient import demo as patient_demo
from api.patient import repository as patient_repository
from api.patient import seed as patient_seed
from api.patient import service as patient_service
from pms import db
from pms.settings import Settings
from tests.fixtures.servers import ServerSet

pytestmark = pytest.mark.integration

SEED = 7319
SEEDED = 1500


@pytest.fixture(scope="module")
def bulk_settings(servers: ServerSet) -> Settings:
    settings = servers.make_settings(patient={"seed_demo_data": True})
    db.migrate(settings, "patients")
    return settings


@pytest.fixture(scope="module")
def seeded(bulk_settings: Settings) -> int:
    return patient_seed.run(bulk_settings, patients=SEEDED, seed=SEED, batch_size=400, show_progress=False)


@pytest.fixture
def session(bulk_settings: Settings) -> Iterator[Session]:
    engine = db.make_engine(bulk_settings.database_url_for("patients"), pool_size=1, max_overflow=0)
    with db.session_factory(engine)() as s:
        yield s
    engine.dispose()


def test_seed_is_deterministic_and_goes_through_the_outbox(bulk_settings: Settings, seeded: int,
                                                           session: Session) -> None:
    assert seeded == SEEDED
    a, b, c = patient_seed.PatientFaker(SEED), patient_seed.PatientFaker(SEED), patient_seed.PatientFaker(SEED + 1)
    first = [a.patient(i).model_dump() for i in range(50)]
    assert first == [b.patient(i).model_dump() for i in range(50)]
    assert first != [c.patient(i).model_dump() for i in range(50)]
    # The same seed again adds nobody (same emails).
    assert patient_seed.run(bulk_settings, patients=300, seed=SEED, show_progress=False) == 0
    pattern = f"%.{SEED}.%@example.org"
    counts = session.execute(text(
        "SELECT count(DISTINCT p.id), count(o.id), count(a.id), count(DISTINCT p.mrn), "
        "       bool_and(p.billing_status = 'PENDING' AND p.version = 1 AND p.date_of_birth >= '1900-01-01') "
        "FROM patients p JOIN patient_outbox o ON o.patient_id = p.id "
        "JOIN patient_audit a ON a.patient_id = p.id WHERE p.email LIKE :pattern"), {"pattern": pattern}).one()
    assert tuple(counts) == (SEEDED, SEEDED, SEEDED, SEEDED, True)
    assert patient_seed.run(bulk_settings, patients=0, seed=SEED, show_progress=False) == 0
    with pytest.raises(ValueError):
        patient_seed.run(bulk_settings, patients=-1, seed=SEED, show_progress=False)


def test_demo_patients_are_created_once(bulk_settings: Settings, session: Session) -> None:
    factory = db.session_factory(session.get_bind())  # type: ignore[arg-type]
    patient_demo.seed_once(bulk_settings, factory)  # first call in this database seeds (or someone did)
    assert patient_demo.seed_once(bulk_settings, factory) == 0
    emails = [p.email for p in patient_demo.demo_patients()]
    counts = session.execute(text("SELECT count(*) FROM patients WHERE email = ANY(:e)"), {"e": emails}).scalar()
    assert counts == len(emails) == 10
    disabled = bulk_settings.model_copy(update={"patient": bulk_settings.patient.model_copy(
        update={"seed_demo_data": False})})
    assert patient_demo.seed_once(disabled, factory) == 0


def _plan(session: Session, sql: str, params: dict[str, object], *, hide: tuple[str, ...] = ()) -> str:
    """EXPLAIN with sequential scans off (and some indexes dropped), all rolled back."""
    session.execute(text("SET LOCAL enable_seqscan = off"))
    session.execute(text("SET LOCAL lock_timeout = '5s'"))
    for index in hide:
        session.execute(text(f"DROP INDEX {index}"))
    rows = session.connection().exec_driver_sql("EXPLAIN " + sql, params).scalars().all()
    session.rollback()
    return "\n".join(rows)


def test_search_and_duplicate_lookups_are_index_backed(seeded: int, session: Session) -> None:
    """Index use shown on a modest table; the 1,000,000-row figures belong to bench/."""
    session.execute(text("ANALYZE patients"))
    session.commit()
    condition = patient_repository.search_condition("smith", phone="+12025550142")
    for statement in (patient_repository.count_statement(condition),
                      patient_repository.page_statement(condition, limit=50, offset=0)):
        compiled = statement.compile(dialect=postgresql.psycopg.dialect())
        # On a small table the planner would rather read a whole partial (deleted_at IS NULL)
        # index than combine four; at a million rows that choice reverses. Hide those two to
        # show the combined plan is available (timings at scale: bench item).
        plan = _plan(session, str(compiled), dict(compiled.params),
                     hide=("ix_patients_active_order", "ix_patients_email_active"))
        for index in ("ix_patients_name_trgm", "ix_patients_email_trgm", "ix_patients_phone", "uq_patients_mrn"):
            assert index in plan, plan
        assert "Seq Scan" not in plan, plan

    patient = patient_service.search(session=session, q=f".{SEED}.1@", limit=1, offset=0)[0][0]
    for with_phone in (False, True):
        sql = str(text(patient_repository.duplicate_candidates_sql(with_phone=with_phone)).compile(
            dialect=postgresql.psycopg.dialect()))
        plan = _plan(session, sql, {
            "id": patient.id, "name": patient.name, "dob": date(1970, 1, 1), "phone": "+12025550142",
            "threshold": 0.45, "limit": 10})
        # Both name branches are nearest-neighbour scans of the one GiST index, ordered by distance.
        assert plan.count("Order By: (lower((name)::text) <-> ") == 2, plan
        assert "ix_patients_duplicate_lookup" in plan and "Seq Scan" not in plan, plan
        assert ("ix_patients_phone" in plan) is with_phone


#: The duplicate query before the KNN index (0003_write_path): a scan of every patient of the birth
#: date. The reference the indexed query must agree with, row for row and in order.
_REFERENCE_DUPLICATES = """
    SELECT p.id, p.mrn, p.name, p.date_of_birth, p.phone,
           similarity(lower(p.name), lower(:name)) AS score,
           coalesce(p.phone = :phone, false) AS same_phone,
           (p.date_of_birth = :dob AND similarity(lower(p.name), lower(:name)) >= :threshold) AS similar_name,
           (p.date_of_birth = :dob AND dmetaphone(p.name) = dmetaphone(:name)) AS sounds_alike
    FROM patients p
    WHERE p.deleted_at IS NULL AND p.id <> :id
      AND ((p.date_of_birth = :dob
            AND (similarity(lower(p.name), lower(:name)) >= :threshold
                 OR dmetaphone(p.name) = dmetaphone(:name))) OR p.phone = :phone)
    ORDER BY same_phone DESC, score DESC, p.id
    LIMIT :limit
"""


def test_indexed_duplicate_lookup_equals_the_full_scan(bulk_settings: Settings, session: Session) -> None:
    """Ties, same-sounding but dissimilar names, phones, deleted rows and more than ``limit`` matches."""
    import uuid

    from api.patient.schemas import PatientCreate

    dob = date(1903, 2, 28)  # nobody else in this database is born that day
    phone = "+12025550199"
    names = ([f"Bench Patient c16{i:03d}" for i in range(40)]  # many near-identical names: ties
             + [f"Wrench Patient c16{i:03d}" for i in range(15)]  # similar, but they sound different
             + ["Katherine Pemberton", "Catherine Pemberton", "Kathryn Pembertonne", "K. Pemberton",
                "Smith John", "Smyth Jon", "Schmidt Johann", "Zed Quux"])
    items = [PatientCreate.model_validate({
        "name": name, "email": f"dup.{uuid.uuid4().hex[:10]}@example.org", "address": "1 Road",
        "dateOfBirth": dob.isoformat(), "registeredDate": "2024-01-01",
        "phone": phone if i % 7 == 0 else None,
    }) for i, name in enumerate(names)]
    # Same phone on another birth date: found through the phone branch only.
    items += [PatientCreate.model_validate({
        "name": f"Other Person {i}", "email": f"dup.{uuid.uuid4().hex[:10]}@example.org", "address": "1 Road",
        "dateOfBirth": "1950-06-01", "registeredDate": "2024-01-01", "phone": phone}) for i in range(12)]
    assert patient_service.create_many(session=session, items=items, actor="test") == len(items)
    # A deleted near-twin must never be offered.
    session.execute(text("UPDATE patients SET deleted_at = now() WHERE date_of_birth = :dob AND name = :n"),
                    {"dob": dob, "n": "Bench Patient c16005"})
    session.commit()

    probes = [("Bench Patient c16999", None), ("Bench Patient c16999", phone), ("Catherine Pemberton", None),
              ("Trench Patient c16999", None),  # sounds like none of them: the similarity branch alone
              ("Jon Smith", None), ("Smith", phone), ("Nobody Alike", None), ("Nobody Alike", phone)]
    sizes = []
    try:
        for name, probe_phone in probes:
            params = {"id": uuid.uuid4(), "name": name, "dob": dob, "phone": probe_phone,
                      "threshold": patient_repository.DUPLICATE_NAME_SIMILARITY,
                      "limit": patient_repository.DUPLICATE_LIMIT}
            expected = [dict(r) for r in session.execute(text(_REFERENCE_DUPLICATES), params).mappings()]
            actual = [dict(r) for r in session.execute(
                text(patient_repository.duplicate_candidates_sql(with_phone=probe_phone is not None)),
                params).mappings()]
            assert actual == expected, (name, probe_phone)
            assert all(r["name"] != "Bench Patient c16005" for r in actual)
            sizes.append(len(actual))
        # The probes covered an empty answer, partial ones and answers cut at the limit.
        assert 0 in sizes and patient_repository.DUPLICATE_LIMIT in sizes, sizes
    finally:
        session.rollback()  # soft-delete: other modules share this database; rows and history stay
        session.execute(text("UPDATE patients SET deleted_at = now() "
                             "WHERE deleted_at IS NULL AND email LIKE 'dup.%@example.org'"))
        session.commit()


@pytest.mark.parametrize(("matches", "active", "rows", "ranked"), [
    (138, 100_000, 50, True),        # a surname at 100k: the walk would read ~36,000 patients
    (4_669, 1_000_000, 50, True),    # a surname at 1M: ~10,700 for the walk, 4,669 to sort
    (10_546, 100_000, 50, False),    # 'son' at 100k: the walk finds a page after ~470
    (9_000, 30_000, 50, False),      # a common term in a small clinic
    (2_000, 100_000, 5_050, True),   # the same term on a deep page: the walk would read it all
    (0, 0, 50, True),
])
def test_ranking_is_chosen_where_it_reads_fewer_patients_than_the_walk(matches: int, active: int, rows: int,
                                                                          ranked: bool) -> None:
    assert patient_repository.rank_matches(matches=matches, active=active, rows=rows) is ranked


@contextmanager
def _statements(session: Session) -> Iterator[list[str]]:
    """The SQL the session sends inside the block."""
    sent: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        sent.append(statement)

    event.listen(session.get_bind(), "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(session.get_bind(), "before_cursor_execute", record)


def test_a_search_with_few_matches_ranks_them_all_and_pages_like_the_plain_query(
        seeded: int, session: Session) -> None:
    """The ranked form gives the plain form's pages; where walking is cheaper the plain form stays;
    a page past the end is not queried at all."""
    term = "son"  # common in Faker names: enough matches for several pages
    condition = patient_repository.search_condition(term, phone=None)
    total = session.execute(patient_repository.count_statement(condition)).scalar_one()
    assert total > 120, total
    for offset in (0, 50, 100):
        plain = session.execute(patient_repository.page_statement(condition, limit=50, offset=offset)).scalars().all()
        with _statements(session) as sent:
            rows, counted = patient_repository.search(session, q=term, phone=None, limit=50, offset=offset)
        assert counted == total
        assert rows and [p.id for p in rows] == [p.id for p in plain]
        assert len(sent) == 2 and "AS MATERIALIZED" in sent[1], sent

    # One row of a common term: the walk reads ~active/total patients, fewer than the matches.
    plain = session.execute(patient_repository.page_statement(condition, limit=1, offset=0)).scalars().all()
    with _statements(session) as sent:
        rows, _ = patient_repository.search(session, q=term, phone=None, limit=1, offset=0)
    assert [p.id for p in rows] == [p.id for p in plain] and "MATERIALIZED" not in sent[1], sent

    with _statements(session) as sent:
        rows, counted = patient_repository.search(session, q=term, phone=None, limit=50, offset=total)
    assert (list(rows), counted) == ([], total)
    assert len(sent) == 1, sent  # the count only


def test_the_ranked_page_cannot_walk_the_order_index_whatever_the_estimates(seeded: int, session: Session) -> None:
    """The plan that made a rare surname take 56-83 ms at 100,000 patients (its match count estimated
    at 1% of the table from one histogram entry): walk ``ix_patients_active_order`` and filter until a
    page is full. Sorting made prohibitively expensive pushes the plain query onto that walk; the
    ranked form has to find every match first and sort them itself."""
    session.execute(text("ANALYZE patients"))
    session.commit()
    condition = patient_repository.search_condition("son", phone=None)
    plans = {}
    for ranked in (False, True):
        compiled = patient_repository.page_statement(condition, limit=50, offset=0, rank_matches=ranked).compile(
            dialect=postgresql.psycopg.dialect())
        session.execute(text("SET LOCAL enable_sort = off"))
        plans[ranked] = "\n".join(session.connection().exec_driver_sql(
            "EXPLAIN " + str(compiled), dict(compiled.params)).scalars().all())
        session.rollback()
    assert "ix_patients_active_order" in plans[False], plans[False]  # the hazard, shown
    assert "ix_patients_active_order" not in plans[True], plans[True]
    assert "CTE Scan on matches" in plans[True] and "Sort" in plans[True], plans[True]
