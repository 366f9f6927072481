"""Billing rules: validate the request, own the transaction, call the repository.

Raises :mod:`pms.errors` exceptions; the servicer maps them to gRPC status codes the
same way the HTTP services map them to statuses.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine

from billing import repository as billing_repository
from billing.repository import AccountRow
from pms.db import driver_connection
from pms.errors import BadRequest, NotFound

#: The canonical 8-4-4-4-12 hex form only: other spellings uuid.UUID() accepts (braces,
#: "urn:uuid:", no hyphens) are a caller bug here, not something to guess about.
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
#: Bounds on fields billing receives but does not store (name and email: see billing/models.py).
MAX_NAME_CHARS = 255
MAX_EMAIL_CHARS = 320


@dataclass(frozen=True, slots=True)
class Account:
    """A billing account as the service hands it to the transport layer."""

    account_id: str
    status: str
    patient_id: str
    created_at: datetime
    #: True when this call opened the account.
    created: bool


def parse_patient_id(raw: str) -> uuid.UUID:
    """Return ``raw`` as a UUID, or raise BadRequest (the value itself is never echoed)."""
    if not raw:
        raise BadRequest("patient_id is required", errors={"patient_id": "required"})
    if not _UUID_RE.fullmatch(raw):
        raise BadRequest("patient_id must be a UUID", errors={"patient_id": "must be a UUID"})
    value = uuid.UUID(raw)
    if value.int == 0:
        raise BadRequest("patient_id must not be the nil UUID", errors={"patient_id": "must not be the nil UUID"})
    return value


def _check_contact_bounds(*, name: str, email: str) -> None:
    errors: dict[str, str] = {}
    if len(name) > MAX_NAME_CHARS:
        errors["name"] = f"at most {MAX_NAME_CHARS} characters"
    if len(email) > MAX_EMAIL_CHARS:
        errors["email"] = f"at most {MAX_EMAIL_CHARS} characters"
    if errors:
        raise BadRequest("invalid billing request", errors=errors)


def create(*, engine: Engine, patient_id: str, name: str = "", email: str = "") -> Account:
    """Open the patient's account, or return the one already open (idempotent on patient_id).

    ``name`` and ``email`` are accepted for compatibility with the seed contract and only
    bounds-checked: billing does not store or log them. The insert is one autocommit statement,
    atomic by itself: no BEGIN and COMMIT round trips.

    Raises:
        BadRequest: ``patient_id`` is not a UUID, or name/email exceed their bounds.
    """
    pid = parse_patient_id(patient_id)
    _check_contact_bounds(name=name, email=email)
    with driver_connection(engine) as conn:
        row = billing_repository.insert_if_absent(conn, patient_id=pid)
        created = row is not None
        if row is None:
            # READ COMMITTED: this statement sees the winner's committed row.
            row = billing_repository.get_by_patient_id(conn, patient_id=pid)
    if row is None:  # the account was deleted between the two statements; not a path we have
        raise RuntimeError("billing account vanished during create")
    return _account(row, created=created)


def get_or_raise(*, engine: Engine, patient_id: str) -> Account:
    """Return the patient's account.

    Raises:
        BadRequest: ``patient_id`` is not a UUID.
        NotFound: the patient has no billing account.
    """
    pid = parse_patient_id(patient_id)
    with driver_connection(engine) as conn:
        row = billing_repository.get_by_patient_id(conn, patient_id=pid)
    if row is None:
        raise NotFound("no billing account for this patient")
    return _account(row, created=False)


def _account(row: AccountRow, *, created: bool) -> Account:
    return Account(
        account_id=str(row.id),
        status=row.status,
        patient_id=str(row.patient_id),
        created_at=row.created_at,
        created=created,
    )
