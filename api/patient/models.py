"""Tables of the patients database (Alembic owns their DDL: see migrations/versions)."""

from __future__ import annotations

import uuid
from datetime import date, datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    Identity,
    Index,
    Integer,
    LargeBinary,
    Sequence,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pms.db import new_metadata

#: MRNs come from a sequence: unique and never reused, even after a rollback or a delete.
MRN_SEQUENCE = Sequence("patient_mrn_seq", start=100001)


class Base(DeclarativeBase):
    metadata = new_metadata()


class BillingStatus:
    PENDING = "PENDING"
    ACTIVE = "ACTIVE"


#: The unique index of active patients' emails: a violation of it means "email already used" (409).
EMAIL_INDEX = "ix_patients_email_active"


class Patient(Base):
    """One patient; soft-deleted rows keep their history (``deleted_at`` set)."""

    __tablename__ = "patients"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    mrn: Mapped[str] = mapped_column(String(20), nullable=False, unique=True)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    email: Mapped[str] = mapped_column(String(254), nullable=False)
    address: Mapped[str] = mapped_column(String(255), nullable=False)
    city: Mapped[str | None] = mapped_column(String(100))
    gender: Mapped[str | None] = mapped_column(String(10))
    phone: Mapped[str | None] = mapped_column(String(20))
    date_of_birth: Mapped[date] = mapped_column(Date, nullable=False)
    registered_date: Mapped[date] = mapped_column(Date, nullable=False)
    billing_account_id: Mapped[str | None] = mapped_column(String(64))
    billing_status: Mapped[str] = mapped_column(String(16), nullable=False, server_default=BillingStatus.PENDING)
    billing_attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    billing_next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    version: Mapped[int] = mapped_column(Integer, nullable=False, server_default="1")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        # Unique email among active patients, case-insensitively: the database decides races.
        Index(EMAIL_INDEX, func.lower(text("email")), unique=True,
              postgresql_where=text("deleted_at IS NULL")),
        # Trigram GIN indexes back `q` substring search (ILIKE) and similarity matching.
        Index("ix_patients_name_trgm", "name", postgresql_using="gin", postgresql_ops={"name": "gin_trgm_ops"}),
        Index("ix_patients_email_trgm", "email", postgresql_using="gin",
              postgresql_ops={"email": "gin_trgm_ops"}),
        Index("ix_patients_phone", "phone"),
        Index("ix_patients_date_of_birth", "date_of_birth"),
        # Likely-duplicate lookup: nearest lower(name) per birth date (migration 0003_write_path).
        Index("ix_patients_duplicate_lookup", "date_of_birth", func.dmetaphone(text("name")),
              text("lower(name) gist_trgm_ops"), postgresql_using="gist"),
        # The list's stable order (created_at, id) over active rows.
        Index("ix_patients_active_order", "created_at", "id", postgresql_where=text("deleted_at IS NULL")),
        # Every PENDING patient has a due time, so the retry worker's queue (below) misses nobody.
        CheckConstraint("billing_status <> 'PENDING' OR billing_next_attempt_at IS NOT NULL",
                        name="pending_has_due_time"),
        # The billing retry worker's queue.
        Index("ix_patients_billing_pending", "billing_next_attempt_at",
              postgresql_where=text("billing_status = 'PENDING' AND deleted_at IS NULL")),
    )


class OutboxEvent(Base):
    """A serialized PatientEvent written in the same transaction as the change it describes."""

    __tablename__ = "patient_outbox"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    event_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False, unique=True)
    patient_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    event_type: Mapped[str] = mapped_column(String(32), nullable=False)
    payload: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_patient_outbox_unsent", "id", postgresql_where=text("sent_at IS NULL")),
        Index("ix_patient_outbox_occurred_at", "occurred_at"),
        Index("ix_patient_outbox_patient_id_version", "patient_id", "version", unique=True),
    )


class ActiveCountDelta(Base):
    """One statement's change of the number of active patients, written by triggers on ``patients``
    (migration ``0004_active_count``); their sum is the exact count, folded now and then."""

    __tablename__ = "patient_active_count_deltas"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    delta: Mapped[int] = mapped_column(BigInteger, nullable=False)


class AuditEntry(Base):
    """Who changed which fields of a patient, and when (field names only, never values)."""

    __tablename__ = "patient_audit"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    patient_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False, index=True)
    actor: Mapped[str] = mapped_column(String(254), nullable=False)
    action: Mapped[str] = mapped_column(String(16), nullable=False)
    fields: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    request_id: Mapped[str | None] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class RelayState(Base):
    """The high watermark per partition the relay last saw after publishing.

    A broker that forgot its topics (the embedded broker keeps them in memory) answers
    with lower watermarks or no topic at all; the relay then republishes the outbox.
    """

    __tablename__ = "patient_relay_state"

    topic: Mapped[str] = mapped_column(String(249), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    high_watermark: Mapped[int] = mapped_column(BigInteger, nullable=False)


class ServiceFlag(Base):
    """One-time facts of this database (e.g. ``demo_seeded``), so start-up work runs once."""

    __tablename__ = "patient_service_flags"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    set_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
