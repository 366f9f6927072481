"""SQL for billing accounts, and nothing else (no rules, no commits).

The two statements of the gRPC calls run on a plain psycopg connection
(:func:`pms.db.driver_connection`): built once from the model as Core statements, compiled
to psycopg's SQL, prepared by the server on first use. Only the bound patient id changes.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from sqlalchemy import bindparam, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from billing.models import BillingAccount
from pms.db import psycopg_sql


class AccountRow(NamedTuple):
    """What the service reads of an account: one row of columns, no ORM object."""

    id: uuid.UUID
    patient_id: uuid.UUID
    status: str
    created_at: datetime


_COLUMNS = tuple(BillingAccount.__table__.c[name] for name in AccountRow._fields)
_PATIENT_ID = bindparam("patient_id", type_=BillingAccount.__table__.c.patient_id.type)

#: ``ON CONFLICT (patient_id) DO NOTHING`` lets the unique constraint arbitrate between concurrent
#: callers: exactly one insert wins, the others wait for it and get no row.
_INSERT_IF_ABSENT = psycopg_sql(
    insert(BillingAccount.__table__)
    .values(patient_id=_PATIENT_ID)
    .on_conflict_do_nothing(index_elements=[BillingAccount.__table__.c.patient_id])
    .returning(*_COLUMNS)
)
_BY_PATIENT_ID = psycopg_sql(select(*_COLUMNS).where(BillingAccount.__table__.c.patient_id == _PATIENT_ID))


def insert_if_absent(conn: psycopg.Connection[Any], *, patient_id: uuid.UUID) -> AccountRow | None:
    """Insert an ACTIVE account for ``patient_id``; None when the patient already has one."""
    return _one(conn, _INSERT_IF_ABSENT, patient_id)


def get_by_patient_id(conn: psycopg.Connection[Any], *, patient_id: uuid.UUID) -> AccountRow | None:
    """The account of ``patient_id``, if any."""
    return _one(conn, _BY_PATIENT_ID, patient_id)


def _one(conn: psycopg.Connection[Any], sql: str, patient_id: uuid.UUID) -> AccountRow | None:
    row = conn.execute(sql, {"patient_id": patient_id}, prepare=True).fetchone()
    return AccountRow(*row) if row is not None else None


def count_for_patient(session: Session, *, patient_id: uuid.UUID) -> int:
    """How many accounts ``patient_id`` has (0 or 1 while the unique constraint holds)."""
    return int(session.execute(
        select(func.count()).select_from(BillingAccount).where(BillingAccount.patient_id == patient_id)
    ).scalar_one())
