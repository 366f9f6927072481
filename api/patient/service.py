"""The rules of patient records; every function here owns its transaction.

Each change writes the patient row, its audit entry and its PatientEvent (the outbox) in
one transaction, so an event exists exactly for the changes that were committed.
"""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.patient import events as patient_events
from api.patient import repository as patient_repository
from api.patient.models import EMAIL_INDEX, AuditEntry, BillingStatus, Patient
from api.patient.outbox_wake import mark_outbox_written
from api.patient.schemas import DuplicateCandidate, PatientCreate, PatientUpdate, normalize_phone
from pms.errors import BadRequest, Conflict, NotFound
from pms.settings import Settings

if TYPE_CHECKING:
    from api.patient.billing_sync import BillingGateway

#: Patient attributes a client may set, with their API (camelCase) names for audit entries.
EDITABLE_FIELDS = {
    "name": "name", "email": "email", "address": "address", "city": "city", "gender": "gender",
    "phone": "phone", "date_of_birth": "dateOfBirth", "registered_date": "registeredDate",
}
EMAIL_TAKEN = Conflict("Email already used", errors={"email": "Already used by another patient"})


def parse_id(raw: str | uuid.UUID) -> uuid.UUID | None:
    if isinstance(raw, uuid.UUID):
        return raw
    try:
        return uuid.UUID(raw)
    except (ValueError, AttributeError, TypeError):
        return None


def get_or_raise(*, session: Session, patient_id: str | uuid.UUID, for_update: bool = False) -> Patient:
    """Return the active patient (row-locked with ``for_update``) or raise NotFound.

    Malformed and deleted ids read as 404 too.
    """
    parsed = parse_id(patient_id)
    patient = None if parsed is None else patient_repository.get_active(session, parsed, for_update=for_update)
    if patient is None:
        raise NotFound("Patient not found")
    return patient


def search(*, session: Session, q: str | None, limit: int, offset: int) -> tuple[Sequence[Patient], int]:
    """Return one page of active patients matching ``q`` (name, email, MRN or phone) and the total."""
    term = unicodedata.normalize("NFC", (q or "").strip()) or None  # as names are stored (schemas)
    if term and any(ord(ch) < 32 or ord(ch) == 127 for ch in term):
        # PostgreSQL text cannot hold NUL; no name, email, MRN or phone holds control characters.
        raise BadRequest("Validation failed", errors={"q": "Must not contain control characters"})
    phone = None
    if term and any(ch.isdigit() for ch in term):
        try:
            phone = normalize_phone(term)
        except ValueError:
            phone = None
    return patient_repository.search(session, q=term, phone=phone, limit=limit, offset=offset)


def _is_email_conflict(exc: IntegrityError) -> bool:
    return EMAIL_INDEX in str(exc.orig)


def _write_or_conflict(write: Callable[[], None], session: Session) -> None:
    """Run ``session.flush`` or ``session.commit``; a taken email (the unique index) answers 409."""
    try:
        write()
    except IntegrityError as exc:
        session.rollback()
        if _is_email_conflict(exc):
            raise EMAIL_TAKEN from None
        raise


@dataclass(slots=True)
class Registration:
    """A created patient and the likely duplicates found when it was registered."""

    patient: Patient
    duplicates: list[DuplicateCandidate]


async def create(
    *,
    pool: AsyncConnectionPool,
    data: PatientCreate,
    actor: str,
    request_id: str | None = None,
    billing: BillingGateway | None = None,
    settings: Settings | None = None,
    outbox_written: Callable[[], None] | None = None,
) -> Registration:
    """Register a patient, open its billing account if billing answers in time, and queue its event.

    The create is two statements on the async AUTOCOMMIT ``pool`` and no open transaction.
    First one read (is the email taken? likely duplicates), then billing is called with its
    deadline while nothing is held (the patient id is made here, and billing is idempotent
    on it), then ONE statement writes the patient with its final billing status, its outbox
    event and its audit entry atomically. A create that fails after billing answered (the
    email was taken meanwhile, the database went away) leaves an account for a patient id
    that never exists: harmless, nothing refers to it and no patient can ever get that id.

    Async end to end: under load a create costs no threadpool hop and no thread switches.

    Raises:
        Conflict: another active patient already uses the email (also under concurrency:
            the unique index decides).
    """
    now = datetime.now(UTC)
    patient = Patient(
        id=uuid.uuid4(),
        **data.model_dump(include=set(EDITABLE_FIELDS)),
        billing_account_id=None,
        billing_status=BillingStatus.PENDING,
        billing_next_attempt_at=now,
        version=1,
        created_at=now,
        updated_at=now,
    )
    try:
        taken, rows = await _preflight(pool, patient)
        if taken:
            raise EMAIL_TAKEN
        account = None
        if billing is not None:
            account = await billing.open_account_in_request(patient_id=patient.id, name=patient.name,
                                                            email=patient.email)
        if account is not None:
            patient.billing_account_id = account.account_id
            patient.billing_status = account.status
            patient.billing_next_attempt_at = None
        else:
            # Every PENDING patient has a due time: the retry worker's queue is that index.
            patient.billing_next_attempt_at = now + (backoff(settings, 0) if settings is not None else timedelta(0))
        provided = [api for field, api in EDITABLE_FIELDS.items() if getattr(patient, field) is not None]
        outbox = patient_events.outbox_row(patient, event_type=patient_events.CREATED, occurred_at=now)
        async with pool.connection() as conn:
            patient.mrn = await patient_repository.insert_created(conn, patient, outbox=outbox, actor=actor,
                                                                  fields=provided, request_id=request_id)
            if outbox_written is not None:
                outbox_written()  # committed (autocommit): the relay may publish it now
    except psycopg.errors.UniqueViolation as exc:
        if exc.diag.constraint_name == EMAIL_INDEX:
            raise EMAIL_TAKEN from None
        raise
    return Registration(patient=patient, duplicates=[_candidate(row) for row in rows])


async def _preflight(pool: AsyncConnectionPool, patient: Patient) -> tuple[bool, list[dict[str, Any]]]:
    """The create's read, tried once more on a fresh connection when its pooled one was broken.

    The pool does not ping on checkout (a round trip per statement), so after a database restart
    its idle connections are dead: the first read finds out, :meth:`AsyncConnectionPool.check`
    drops them all, and the read (which changes nothing, so retrying is safe) goes again.
    """
    try:
        async with pool.connection() as conn:
            return await patient_repository.create_preflight(conn, patient)
    except PoolTimeout:
        raise  # no connection to be had within the pool's timeout (the database is down): a 503 now
    except psycopg.OperationalError:
        await pool.check()
    async with pool.connection() as conn:
        return await patient_repository.create_preflight(conn, patient)


def backoff(settings: Settings, attempts: int) -> timedelta:
    """Delay before billing attempt ``attempts + 1``: doubling from the initial delay, capped."""
    initial = settings.patient.billing_retry_initial_s
    delay = min(settings.patient.billing_retry_max_s, initial * (2 ** min(attempts, 30)))
    return timedelta(seconds=delay)


def _check_version(patient: Patient, expected_version: int | None) -> None:
    if expected_version is not None and expected_version != patient.version:
        raise Conflict(
            "Version conflict: the patient was changed by someone else",
            errors={"version": f"Expected {expected_version}, current is {patient.version}"},
            headers={"ETag": f'"{patient.version}"'},
        )


def update(
    *,
    session: Session,
    patient_id: str | uuid.UUID,
    data: PatientUpdate,
    expected_version: int | None,
    actor: str,
    request_id: str | None = None,
) -> Patient:
    """Apply an update; the version goes up by one when anything changed.

    Fields of the seed's payload are always replaced; newer optional fields keep their
    value when omitted and are cleared by an explicit null.

    Raises:
        NotFound: unknown, malformed or deleted id.
        Conflict: stale ``expected_version`` (If-Match) or an email used by another patient.
    """
    patient = get_or_raise(session=session, patient_id=patient_id, for_update=True)
    _check_version(patient, expected_version)
    values: dict[str, Any] = data.model_dump(include=set(EDITABLE_FIELDS) & data.model_fields_set)
    for required in ("name", "email", "address", "date_of_birth"):
        values[required] = getattr(data, required)
    if values.get("registered_date", patient.registered_date) is None:
        values.pop("registered_date")
    registered = values.get("registered_date", patient.registered_date)
    if registered is not None and registered < values["date_of_birth"]:  # the body may omit registeredDate
        raise BadRequest("Validation failed", errors={"dateOfBirth": "Must not be after the registration date "
                                                                     f"({registered.isoformat()})"})
    changed = [field for field, value in values.items() if getattr(patient, field) != value]
    if not changed:
        session.commit()  # nothing to write: just release the row lock
        return patient
    for field in changed:
        setattr(patient, field, values[field])
    now = datetime.now(UTC)
    patient.version += 1
    patient.updated_at = now
    _write_or_conflict(session.flush, session)
    session.add(patient_events.outbox_row(patient, event_type=patient_events.UPDATED, occurred_at=now))
    patient_repository.add_audit(session, patient=patient, actor=actor, action="update",
                                 fields=[EDITABLE_FIELDS[f] for f in changed], request_id=request_id)
    _write_or_conflict(session.commit, session)
    return patient


def delete(
    *,
    session: Session,
    patient_id: str | uuid.UUID,
    expected_version: int | None,
    actor: str,
    request_id: str | None = None,
) -> None:
    """Soft-delete a patient: it leaves lists and reads, its row and history stay.

    Raises:
        NotFound: unknown, malformed or already deleted id.
        Conflict: stale ``expected_version``.
    """
    patient = get_or_raise(session=session, patient_id=patient_id, for_update=True)
    _check_version(patient, expected_version)
    now = datetime.now(UTC)
    patient.deleted_at = now
    patient.updated_at = now
    patient.version += 1
    session.add(patient_events.outbox_row(patient, event_type=patient_events.DELETED, occurred_at=now))
    patient_repository.add_audit(session, patient=patient, actor=actor, action="delete", fields=[],
                                 request_id=request_id)
    session.commit()


def duplicates(*, session: Session, patient: Patient) -> list[DuplicateCandidate]:
    """Return likely duplicates of ``patient`` (same birth date + similar name, or same phone)."""
    return [_candidate(row) for row in patient_repository.duplicates_of(session, patient)]


def _candidate(row: dict[str, Any]) -> DuplicateCandidate:
    reasons = [reason for reason in ("same_phone", "similar_name", "sounds_alike") if row[reason]]
    return DuplicateCandidate(
        id=row["id"], mrn=row["mrn"], name=row["name"], date_of_birth=row["date_of_birth"],
        phone=row["phone"], reasons=reasons, score=round(float(row["score"]), 3),
    )


def audit(*, session: Session, patient_id: str | uuid.UUID) -> Sequence[AuditEntry]:
    """Return the audit trail of a patient, deleted ones included.

    Raises:
        NotFound: the id never belonged to a patient.
    """
    parsed = parse_id(patient_id)
    if parsed is None or not patient_repository.exists_any(session, parsed):
        raise NotFound("Patient not found")
    return patient_repository.audit_trail(session, parsed)


# -- billing outcomes (the retry worker) --------------------------------------------------

def billing_opened(*, session: Session, accounts: dict[uuid.UUID, tuple[str, str]], actor: str) -> int:
    """Record opened billing accounts (patient id -> (account id, status)) in one transaction.

    Opening an account is a change of the patient: version + 1, an event and an audit entry.
    Patients deleted or already billed meanwhile are left alone. Returns how many changed.
    """
    now = datetime.now(UTC)
    changed = 0
    for patient in patient_repository.lock_pending_billing(session, list(accounts)):
        patient.billing_account_id, patient.billing_status = accounts[patient.id]
        patient.billing_next_attempt_at = None
        patient.version += 1
        patient.updated_at = now
        session.add(patient_events.outbox_row(patient, event_type=patient_events.UPDATED, occurred_at=now))
        patient_repository.add_audit(session, patient=patient, actor=actor, action="update",
                                     fields=["billingAccountId", "billingStatus"], request_id=None)
        changed += 1
    session.commit()
    return changed


def billing_failed(*, session: Session, patient_ids: list[uuid.UUID], settings: Settings) -> None:
    """Push these patients' next billing attempt back, each by its own doubling backoff (:func:`backoff`)."""
    patient_repository.postpone_billing(session, patient_ids, now=datetime.now(UTC),
                                        initial_s=settings.patient.billing_retry_initial_s,
                                        max_s=settings.patient.billing_retry_max_s)
    session.commit()


@dataclass(slots=True)
class _BulkPatient:
    """Plain values of one bulk-created patient (ORM objects cost ~10x more per row)."""

    id: uuid.UUID
    mrn: str
    name: str
    email: str
    address: str
    city: str | None
    gender: str | None
    phone: str | None
    date_of_birth: date
    registered_date: date
    billing_status: str
    billing_next_attempt_at: datetime
    version: int
    created_at: datetime
    updated_at: datetime


def create_many(*, session: Session, items: Sequence[PatientCreate], actor: str) -> int:
    """Register many patients in one transaction through the bulk path (COPY), with outbox and audit.

    Same rules as :func:`create` except billing (all start PENDING; the retry worker opens
    the accounts) and duplicate emails, which are skipped instead of failing the batch.
    Returns how many were inserted.
    """
    if not items:
        return 0
    now = datetime.now(UTC)
    mrns = patient_repository.next_mrns(session, len(items))
    patients: dict[uuid.UUID, _BulkPatient] = {}
    rows = []
    for item, mrn in zip(items, mrns, strict=True):
        patient = _BulkPatient(
            id=uuid.uuid4(), mrn=mrn, name=item.name, email=item.email, address=item.address, city=item.city,
            gender=item.gender, phone=item.phone, date_of_birth=item.date_of_birth,
            registered_date=item.registered_date, billing_status=BillingStatus.PENDING,
            billing_next_attempt_at=now, version=1, created_at=now, updated_at=now,
        )
        patients[patient.id] = patient
        rows.append(tuple(getattr(patient, column) for column in patient_repository.PATIENT_COPY_COLUMNS))
    inserted = patient_repository.bulk_insert_patients(session, rows)
    outbox, audit_rows = [], []
    for patient_id in (pid for pid in patients if pid in inserted):
        patient = patients[patient_id]
        event = patient_events.build_event(patient, event_type=patient_events.CREATED, occurred_at=now)
        outbox.append((event.event_id, patient_id, 1, patient_events.CREATED, event.SerializeToString(), now))
        fields = [api for field, api in EDITABLE_FIELDS.items() if getattr(patient, field) is not None]
        audit_rows.append((patient_id, actor, "create", fields, 1, now))
    patient_repository.copy_rows(session, "patient_outbox", patient_repository.OUTBOX_COPY_COLUMNS, outbox)
    mark_outbox_written(session)  # COPY: the ORM does not see these rows
    patient_repository.copy_rows(session, "patient_audit", patient_repository.AUDIT_COPY_COLUMNS, audit_rows)
    session.commit()
    return len(inserted)
