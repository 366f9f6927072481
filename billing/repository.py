"""SQL for billing accounts, and nothing else (no rules, no commits)."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from billing.models import BillingAccount


def insert_if_absent(session: Session, *, patient_id: uuid.UUID) -> BillingAccount | None:
    """Insert an ACTIVE account for ``patient_id``; None when the patient already has one.

    ``ON CONFLICT (patient_id) DO NOTHING`` lets the unique constraint arbitrate between
    concurrent callers: exactly one insert wins, the others wait for it and get no row.
    """
    statement = (
        insert(BillingAccount)
        .values(patient_id=patient_id)
        .on_conflict_do_nothing(index_elements=[BillingAccount.patient_id])
        .returning(BillingAccount)
    )
    return session.execute(statement).scalars().one_or_none()


def get_by_patient_id(session: Session, *, patient_id: uuid.UUID) -> BillingAccount | None:
    """The account of ``patient_id``, if any."""
    return session.execute(
        select(BillingAccount).where(BillingAccount.patient_id == patient_id)
    ).scalar_one_or_none()


def count_for_patient(session: Session, *, patient_id: uuid.UUID) -> int:
    """How many accounts ``patient_id`` has (0 or 1 while the unique constraint holds)."""
    return int(session.execute(
        select(func.count()).select_from(BillingAccount).where(BillingAccount.patient_id == patient_id)
    ).scalar_one())
