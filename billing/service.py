"""Billing rules: validate the request, own the transaction, call the repository.

Raises :mod:`pms.errors` exceptions; the servicer maps them to gRPC status codes the
same way the HTTP services map them to statuses.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row
from sqlalchemy.orm import Session, sessionmaker

from billing import repository as billing_repository
from billing.models import BillingAccount as AccountRow
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


def create(*, sessions: sessionmaker[Session], patient_id: str, name: str = "", email: str = "") -> Account:
    """Open the patient's account, or return the one already open (idempotent on patient_id).

    ``name`` and ``email`` are accepted for compatibility with the seed contract and only
    bounds-checked: billing does not store or log them.

    Raises:
        BadRequest: ``patient_id`` is not a UUID, or name/email exceed their bounds.
    """
    pid = parse_patient_id(patient_id)
    _check_contact_bounds(name=name, email=email)
    with sessions() as session:
        # With the server's AUTOCOMMIT sessions the insert is its own transaction (no BEGIN and
        # COMMIT round trips) and the commit below is a no-op; with other sessions it commits.
        inserted = billing_repository.insert_if_absent(session, patient_id=pid)
        created = inserted is not None
        row: AccountRow | Row[Any] | None = inserted
        if row is None:
            # READ COMMITTED: this statement sees the winner's committed row.
            row = billing_repository.get_by_patient_id(session, patient_id=pid)
        if row is None:  # the account was deleted between the two statements; not a path we have
            raise RuntimeError("billing account vanished during create")
        session.commit()
        return _account(row, created=created)


def get_or_raise(*, sessions: sessionmaker[Session], patient_id: str) -> Account:
    """Return the patient's account.

    Raises:
        BadRequest: ``patient_id`` is not a UUID.
        NotFound: the patient has no billing account.
    """
    pid = parse_patient_id(patient_id)
    with sessions() as session:
        row = billing_repository.get_by_patient_id(session, patient_id=pid)
        if row is None:
            raise NotFound("no billing account for this patient")
        return _account(row, created=False)


def _account(row: AccountRow | Row[Any], *, created: bool) -> Account:
    return Account(
        account_id=str(row.id),
        status=row.status,
        patient_id=str(row.patient_id),
        created_at=row.created_at,
        created=created,
    )
