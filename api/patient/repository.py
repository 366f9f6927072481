"""SQL of the patients database, and nothing else (rules and commits live in service.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from sqlalchemy import Select, and_, delete, exists, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, aliased

from api.patient.models import (
    MRN_SEQUENCE,
    ActiveCountDelta,
    AuditEntry,
    BillingStatus,
    OutboxEvent,
    Patient,
    RelayState,
    ServiceFlag,
)
from pms.db import psycopg_sql

#: Trigram similarity from which two names on the same birth date count as likely duplicates.
DUPLICATE_NAME_SIMILARITY = 0.45
DUPLICATE_LIMIT = 10


def next_mrns(session: Session, count: int) -> list[str]:
    """``count`` fresh medical record numbers (a sequence: unique, never reused)."""
    if count == 1:
        return [f"MRN{session.execute(MRN_SEQUENCE.next_value()).scalar_one()}"]
    rows = session.execute(
        text("SELECT nextval('patient_mrn_seq') FROM generate_series(1, :n)"), {"n": count}
    ).scalars()
    return [f"MRN{n}" for n in rows]


def get_active(session: Session, patient_id: uuid.UUID, *, for_update: bool = False) -> Patient | None:
    stmt = select(Patient).where(Patient.id == patient_id, Patient.deleted_at.is_(None))
    if for_update:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    return session.execute(stmt).scalar_one_or_none()


def exists_any(session: Session, patient_id: uuid.UUID) -> bool:
    """Whether the id ever belonged to a patient (deleted ones included)."""
    return bool(session.execute(select(exists().where(Patient.id == patient_id))).scalar())


def _escape_like(term: str) -> str:
    return term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def search_condition(q: str | None, *, phone: str | None) -> Any:
    """Active patients matching ``q`` in name or email (substring, any case), MRN or phone."""
    condition = Patient.deleted_at.is_(None)
    if not q:
        return condition
    pattern = f"%{_escape_like(q)}%"
    matches = [Patient.name.ilike(pattern), Patient.email.ilike(pattern), Patient.mrn == q.upper()]
    if phone:
        matches.append(Patient.phone == phone)
    return and_(condition, or_(*matches))


def search(session: Session, *, q: str | None, phone: str | None, limit: int, offset: int
           ) -> tuple[Sequence[Patient], int]:
    """One page in the stable order (created_at, id) and the total number of matches.

    With ``q`` the count comes first, with the number of active patients in the same statement, so
    the page query is chosen from exact figures where the planner only has an estimate (see
    :func:`page_statement`), and a page past the end is not queried. The count and the page are two
    statements at READ COMMITTED: a create committed between them can be in one and not the other,
    as between any two requests.
    """
    condition = search_condition(q, phone=phone)
    if not q:
        total = active_count(session)
        return session.execute(page_statement(condition, limit=limit, offset=offset)).scalars().all(), total
    total, active = (int(n) for n in session.execute(_count_with_active(condition)).one())
    if offset >= total:
        return [], total
    page = page_statement(condition, limit=limit, offset=offset, rank_matches=rank_matches(
        matches=total, active=active, rows=offset + limit))
    return session.execute(page).scalars().all(), total


def rank_matches(*, matches: int, active: int, rows: int) -> bool:
    """Whether sorting all ``matches`` is cheaper than walking the order index for the first ``rows``.

    Walking ``ix_patients_active_order`` reads about ``rows * active / matches`` patients before it
    has ``rows`` matches (matches spread over registration time); ranking reads the ``matches``.
    """
    return matches * matches <= active * rows


def _count_with_active(condition: Any) -> Select[tuple[int, int]]:
    return select(func.count(), _ACTIVE_COUNT.scalar_subquery()).select_from(Patient).where(condition)


#: The number of active patients: the sum of the trigger-kept deltas (exact, no scan of patients).
_ACTIVE_COUNT = select(func.coalesce(func.sum(ActiveCountDelta.delta), 0))


def active_count(session: Session) -> int:
    """The number of active patients (:data:`_ACTIVE_COUNT`)."""
    return int(session.execute(_ACTIVE_COUNT).scalar_one())


def count_statement(condition: Any) -> Select[tuple[int]]:
    return select(func.count()).select_from(Patient).where(condition)


def page_statement(condition: Any, *, limit: int, offset: int, rank_matches: bool = False) -> Select[tuple[Patient]]:
    """One page of the patients matching ``condition`` in the stable order (created_at, id).

    ``rank_matches``: find every match first (a MATERIALIZED CTE: the trigram, MRN and phone indexes)
    and sort those, instead of leaving the planner free to walk ``ix_patients_active_order`` and
    filter until a page is full. That walk is right for a common term and ruinous for a rare one,
    and the planner tells them apart by its estimate of an ``ILIKE '%term%'``, which comes from ~100
    histogram entries: one entry containing the term reads as 1% of the table. A 138-match surname
    at 100,000 patients was estimated at 21 or 1,021 rows depending on ANALYZE's sample, and took
    0.6 ms or 56-83 ms (the walk) accordingly. :func:`search` knows the exact count and decides
    (:func:`rank_matches`).
    """
    if not rank_matches:
        return select(Patient).where(condition).order_by(Patient.created_at, Patient.id).limit(limit).offset(offset)
    matches = aliased(Patient, select(Patient).where(condition).cte("matches").prefix_with("MATERIALIZED"))
    return select(matches).order_by(matches.created_at, matches.id).limit(limit).offset(offset)


def duplicate_candidates_sql(*, with_phone: bool) -> str:
    """Likely duplicates: same birth date and a similar or same-sounding name, or the same phone.

    The answer is the top ``:limit`` of those by (same phone, name similarity, id). Each branch
    reads its own top ``:limit`` from an index, so the cost does not grow with the number of
    patients sharing a birth date (the write bench registers thousands with one birth date and
    near-identical names: similarity over all of them cost ~30 ms per create at 2,400):

    - similar names: nearest names on the birth date, a KNN scan of the GiST index
      ``ix_patients_duplicate_lookup`` (date_of_birth, dmetaphone(name), lower(name) trigrams),
      ordered by trigram distance (1 - similarity) and id. Every row of the answer with a similarity at
      or above the threshold ranks among these, so filtering them afterwards loses nothing;
    - same-sounding names: the same index with the dmetaphone code as a condition;
    - same phone: ``ix_patients_phone``.
    """
    phone_branch = """
        UNION
        (SELECT p.id FROM patients p
         WHERE p.phone = :phone AND p.deleted_at IS NULL AND p.id <> :id
         ORDER BY similarity(lower(p.name), lower(:name)) DESC, p.id LIMIT :limit)""" if with_phone else ""
    same_phone = "coalesce(c.phone = :phone, false)" if with_phone else "false"
    # Only constant fragments are interpolated; every value is a bind parameter.
    return f"""
        SELECT c.id, c.mrn, c.name, c.date_of_birth, c.phone, c.score, f.same_phone,
               (c.date_of_birth = :dob AND c.score >= :threshold) AS similar_name,
               (c.date_of_birth = :dob AND c.sounds) AS sounds_alike
        FROM (
            SELECT p.id, p.mrn, p.name, p.date_of_birth, p.phone, similarity(lower(p.name), lower(:name)) AS score,
                   dmetaphone(p.name) = dmetaphone(:name) AS sounds
            FROM patients p
            WHERE p.id = ANY (ARRAY(
                (SELECT p.id FROM patients p
                 WHERE p.date_of_birth = :dob AND p.deleted_at IS NULL AND p.id <> :id
                 ORDER BY lower(p.name) <-> lower(:name), p.id LIMIT :limit)
                UNION
                (SELECT p.id FROM patients p
                 WHERE p.date_of_birth = :dob AND dmetaphone(p.name) = dmetaphone(:name)
                       AND p.deleted_at IS NULL AND p.id <> :id
                 ORDER BY lower(p.name) <-> lower(:name), p.id LIMIT :limit){phone_branch}
            ))
        ) c
        CROSS JOIN LATERAL (SELECT {same_phone} AS same_phone) f
        WHERE f.same_phone OR (c.date_of_birth = :dob AND (c.score >= :threshold OR c.sounds))
        ORDER BY f.same_phone DESC, c.score DESC, c.id
        LIMIT :limit
    """  # noqa: S608


def duplicates_of(session: Session, patient: Patient) -> list[dict[str, Any]]:
    params: dict[str, Any] = {
        "id": patient.id, "name": patient.name, "dob": patient.date_of_birth,
        "threshold": DUPLICATE_NAME_SIMILARITY, "limit": DUPLICATE_LIMIT,
    }
    if patient.phone:
        params["phone"] = patient.phone
    rows = session.execute(text(duplicate_candidates_sql(with_phone=bool(patient.phone))), params).mappings()
    return [dict(row) for row in rows]


def _create_preflight_sql(*, with_phone: bool) -> str:
    """Whether the email is taken (the active-email index) and the likely duplicates, in one statement."""
    return f"""
        SELECT t.email_taken, d.*
        FROM (SELECT EXISTS (SELECT 1 FROM patients
                             WHERE lower(email) = lower(:email) AND deleted_at IS NULL) AS email_taken) t
        LEFT JOIN LATERAL ({duplicate_candidates_sql(with_phone=with_phone)}) d ON NOT t.email_taken
        ORDER BY d.same_phone DESC, d.score DESC, d.id
    """  # noqa: S608 (only constant fragments)


#: The create's two statements as psycopg SQL (the create runs on the async pool, see service.create).
_CREATE_PREFLIGHT_PG = {phone: psycopg_sql(text(_create_preflight_sql(with_phone=phone))) for phone in (False, True)}


async def create_preflight(conn: AsyncConnection, patient: Patient) -> tuple[bool, list[dict[str, Any]]]:
    """Before a create, in one round trip: is ``patient.email`` taken, and ``patient``'s likely duplicates.

    The unique index still decides a race; this only spares billing a call for a taken email.
    """
    params: dict[str, Any] = {
        "email": patient.email, "id": patient.id, "name": patient.name, "dob": patient.date_of_birth,
        "threshold": DUPLICATE_NAME_SIMILARITY, "limit": DUPLICATE_LIMIT,
    }
    if patient.phone:
        params["phone"] = patient.phone
    async with conn.cursor(row_factory=dict_row) as cursor:
        await cursor.execute(_CREATE_PREFLIGHT_PG[bool(patient.phone)], params)
        rows = await cursor.fetchall()
    taken = bool(rows[0]["email_taken"])
    return taken, [row for row in rows if row["id"] is not None]


#: The patient row, its outbox event and its audit entry in ONE statement: one round trip, and
#: atomic on its own (a statement is its own transaction in autocommit mode). The MRN comes
#: from the sequence inside the INSERT.
_INSERT_CREATED_PG = psycopg_sql(text("""
    WITH p AS (
        INSERT INTO patients (id, mrn, name, email, address, city, gender, phone, date_of_birth,
                              registered_date, billing_account_id, billing_status, billing_attempts,
                              billing_next_attempt_at, version, created_at, updated_at)
        VALUES (:id, 'MRN' || nextval('patient_mrn_seq'), :name, :email, :address, :city, :gender, :phone,
                :date_of_birth, :registered_date, :billing_account_id, :billing_status, 0,
                :billing_next_attempt_at, :version, :created_at, :updated_at)
        RETURNING id, mrn
    ), o AS (
        INSERT INTO patient_outbox (event_id, patient_id, version, event_type, payload, occurred_at)
        SELECT CAST(:event_id AS uuid), p.id, :version, CAST(:event_type AS varchar), CAST(:payload AS bytea),
               CAST(:created_at AS timestamptz)
        FROM p
    ), a AS (
        INSERT INTO patient_audit (patient_id, actor, action, fields, version, request_id)
        SELECT p.id, CAST(:actor AS varchar), 'create', CAST(:fields AS text[]), :version,
               CAST(:request_id AS varchar)
        FROM p
    )
    SELECT mrn FROM p
"""))


async def insert_created(conn: AsyncConnection, patient: Patient, *, outbox: OutboxEvent, actor: str,
                         fields: list[str], request_id: str | None) -> str:
    """Insert a new patient with its outbox row and audit entry in one statement; return its MRN.

    Raises:
        psycopg.errors.UniqueViolation: the email is taken by an active patient (``ix_patients_email_active``).
    """
    params = {column: getattr(patient, column) for column in (
        "id", "name", "email", "address", "city", "gender", "phone", "date_of_birth", "registered_date",
        "billing_account_id", "billing_status", "billing_next_attempt_at", "version", "created_at", "updated_at")}
    params.update(event_id=outbox.event_id, event_type=outbox.event_type, payload=outbox.payload,
                  actor=actor[:254], fields=fields, request_id=request_id)
    cursor = await conn.execute(_INSERT_CREATED_PG, params)
    row = await cursor.fetchone()
    assert row is not None  # the INSERT ... RETURNING either returns the row or raises
    return str(row[0])


def add_audit(session: Session, *, patient: Patient, actor: str, action: str, fields: list[str],
              request_id: str | None) -> None:
    session.add(AuditEntry(patient_id=patient.id, actor=actor[:254], action=action, fields=fields,
                           version=patient.version, request_id=request_id))


def audit_trail(session: Session, patient_id: uuid.UUID) -> Sequence[AuditEntry]:
    return session.execute(
        select(AuditEntry).where(AuditEntry.patient_id == patient_id).order_by(AuditEntry.id)
    ).scalars().all()


# -- bulk (seed) ------------------------------------------------------------------------

PATIENT_COPY_COLUMNS = (
    "id", "mrn", "name", "email", "address", "city", "gender", "phone", "date_of_birth", "registered_date",
    "billing_status", "billing_next_attempt_at", "version", "created_at", "updated_at",
)
OUTBOX_COPY_COLUMNS = ("event_id", "patient_id", "version", "event_type", "payload", "occurred_at")
AUDIT_COPY_COLUMNS = ("patient_id", "actor", "action", "fields", "version", "at")


def bulk_insert_patients(session: Session, rows: list[tuple[Any, ...]]) -> set[uuid.UUID]:
    """COPY ``rows`` into a staging table, insert those whose email is free; return inserted ids."""
    conn = session.connection().connection.driver_connection
    assert conn is not None
    cols = ", ".join(PATIENT_COPY_COLUMNS)
    with conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS patient_seed_stage "
                    "(LIKE patients INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
        with cur.copy(f"COPY patient_seed_stage ({cols}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        cur.execute(
            f"INSERT INTO patients ({cols}) SELECT {cols} FROM patient_seed_stage "  # noqa: S608 (constant columns)
            "ON CONFLICT (lower(email)) WHERE deleted_at IS NULL DO NOTHING RETURNING id"
        )
        inserted = {row[0] for row in cur.fetchall()}
        cur.execute("DELETE FROM patient_seed_stage")
    return inserted


def copy_rows(session: Session, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
    conn = session.connection().connection.driver_connection
    assert conn is not None
    with conn.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


# -- billing retry queue ----------------------------------------------------------------

def pending_billing(session: Session, *, now: datetime, limit: int) -> list[tuple[uuid.UUID, str, str]]:
    """Active patients still without a billing account whose next attempt is due (most overdue first).

    Reads the partial index ``ix_patients_billing_pending`` in order, so a round costs the
    same with ten or a million patients waiting.
    """
    rows = session.execute(
        select(Patient.id, Patient.name, Patient.email)
        .where(Patient.billing_status == BillingStatus.PENDING, Patient.deleted_at.is_(None),
               Patient.billing_next_attempt_at <= now)
        .order_by(Patient.billing_next_attempt_at)
        .limit(limit)
    ).all()
    return [(r[0], r[1], r[2]) for r in rows]


def lock_pending_billing(session: Session, patient_ids: list[uuid.UUID]) -> Sequence[Patient]:
    """Lock the still PENDING, active patients among ``patient_ids`` (in id order: no deadlocks)."""
    if not patient_ids:
        return []
    return session.execute(
        select(Patient)
        .where(Patient.id.in_(patient_ids), Patient.billing_status == BillingStatus.PENDING,
               Patient.deleted_at.is_(None))
        .order_by(Patient.id).with_for_update().execution_options(populate_existing=True)
    ).scalars().all()


#: One statement, so the attempt count it doubles is the one it increments (no read, then write), and
#: only for patients still PENDING: a retry worker of another replica that opened the account meanwhile
#: is not undone by a due time on an ACTIVE patient. Mirrors :func:`api.patient.service.backoff`.
_POSTPONE_BILLING = text("""
    UPDATE patients
    SET billing_attempts = billing_attempts + 1,
        billing_next_attempt_at = CAST(:now AS timestamptz) + make_interval(
            secs => least(CAST(:max_s AS double precision),
                          CAST(:initial_s AS double precision) * power(2, least(billing_attempts + 1, 30))))
    WHERE id = ANY(CAST(:ids AS uuid[])) AND billing_status = :pending
""")


def postpone_billing(session: Session, patient_ids: list[uuid.UUID], *, now: datetime, initial_s: float,
                     max_s: float) -> None:
    """Count a failed billing attempt for each PENDING patient and push its next one back by its own backoff."""
    session.execute(_POSTPONE_BILLING, {"ids": patient_ids, "now": now, "initial_s": initial_s, "max_s": max_s,
                                        "pending": BillingStatus.PENDING})


# -- outbox -----------------------------------------------------------------------------

#: The relay's statements are fixed text (one plan each, prepared by psycopg after a few rounds): built
#: with the ORM, a different batch size or partition count compiled a new statement every round
#: (a third of the relay's CPU under the write bench, py-spy).
_UNSENT_EVENTS = text(
    "SELECT id, patient_id, payload FROM patient_outbox WHERE sent_at IS NULL ORDER BY id LIMIT :limit")
_MARK_SENT = text("""
    WITH sent AS (UPDATE patient_outbox SET sent_at = :sent_at WHERE id = ANY(CAST(:ids AS bigint[])))
    INSERT INTO patient_relay_state (topic, partition, high_watermark)
    SELECT :topic, w.partition, w.high_watermark
    FROM unnest(CAST(:partitions AS integer[]), CAST(:watermarks AS bigint[])) AS w(partition, high_watermark)
    ON CONFLICT (topic, partition)
    DO UPDATE SET high_watermark = greatest(patient_relay_state.high_watermark, excluded.high_watermark)
""")


def unsent_events(session: Session, *, limit: int) -> list[tuple[int, uuid.UUID, bytes]]:
    rows = session.execute(_UNSENT_EVENTS, {"limit": limit}).all()
    return [(r[0], r[1], r[2]) for r in rows]


def mark_sent(session: Session, ids: list[int], *, sent_at: datetime, topic: str,
              watermarks: dict[int, int]) -> None:
    """Mark ``ids`` sent and save ``topic``'s ``watermarks`` in ONE statement (the UPDATE as a
    data-modifying CTE of the upsert): one round trip, atomic even on the relay's autocommit
    connection. A stored watermark never goes down: had a reset topic already taken new events
    when they are saved, lower values would overwrite the evidence (a reset clears the rows
    with ``clear_relay_state`` first).
    """
    partitions = sorted(watermarks)
    session.execute(_MARK_SENT, {"sent_at": sent_at, "ids": ids, "topic": topic, "partitions": partitions,
                                 "watermarks": [watermarks[p] for p in partitions]})


def any_sent(session: Session) -> bool:
    return bool(session.execute(select(exists().where(OutboxEvent.sent_at.is_not(None)))).scalar())


def mark_all_unsent(session: Session) -> int:
    result = session.execute(update(OutboxEvent).where(OutboxEvent.sent_at.is_not(None)).values(sent_at=None))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def relay_state(session: Session, topic: str) -> dict[int, int]:
    rows = session.execute(select(RelayState.partition, RelayState.high_watermark).where(RelayState.topic == topic))
    return {int(p): int(hw) for p, hw in rows}


def clear_relay_state(session: Session, topic: str) -> None:
    session.execute(delete(RelayState).where(RelayState.topic == topic))


def outbox_history(session: Session, *, since: datetime | None, batch: int) -> Iterator[tuple[uuid.UUID, bytes]]:
    """Stream (patient_id, payload) of every outbox row in publish order, ``batch`` rows at a time."""
    stmt = select(OutboxEvent.patient_id, OutboxEvent.payload).order_by(OutboxEvent.id)
    if since is not None:
        stmt = stmt.where(OutboxEvent.occurred_at >= since)
    for row in session.execute(stmt.execution_options(yield_per=batch)):
        yield row[0], row[1]


def outbox_count(session: Session, *, since: datetime | None) -> int:
    stmt = select(func.count()).select_from(OutboxEvent)
    if since is not None:
        stmt = stmt.where(OutboxEvent.occurred_at >= since)
    return int(session.execute(stmt).scalar_one())


# -- one-time flags ---------------------------------------------------------------------

def claim_flag(session: Session, key: str) -> bool:
    """Set flag ``key``; True only for the one caller that set it first."""
    stmt = pg_insert(ServiceFlag).values(key=key).on_conflict_do_nothing().returning(ServiceFlag.key)
    return session.execute(stmt).first() is not None
