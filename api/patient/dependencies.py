"""Annotated dependencies of the patient routes: session, caller, the patient in the path."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from api.patient import service as patient_service
from api.patient.models import Patient
from pms.db import SessionDep
from pms.errors import BadRequest
from pms.security import Principal, Role, require_roles

#: STAFF and ADMIN read and write patients; ANALYST (and anyone else) gets 403.
StaffUser = Annotated[Principal, require_roles(Role.STAFF, Role.ADMIN)]
AdminUser = Annotated[Principal, require_roles(Role.ADMIN)]


def valid_patient(patient_id: str, session: SessionDep) -> Patient:
    """The active patient named by the path, or 404 (malformed ids included)."""
    return patient_service.get_or_raise(session=session, patient_id=patient_id)


ValidPatient = Annotated[Patient, Depends(valid_patient)]


def expected_version(if_match: Annotated[str | None, Header(alias="If-Match")] = None) -> int | None:
    """The version an ``If-Match`` header names (``3``, ``"3"`` or ``W/"3"``); None when absent."""
    if if_match is None or if_match.strip() == "*":
        return None
    raw = if_match.strip().removeprefix("W/").strip('"')
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:  # str.isdigit alone passes "²", which int() refuses
        raise BadRequest("Invalid If-Match header", errors={"If-Match": "Must be a patient version number"})
    return int(raw)


ExpectedVersion = Annotated[int | None, Depends(expected_version)]


async def request_id(request: Request) -> str | None:
    """The caller's X-Request-ID, cut to what the audit table keeps (callers choose its length)."""
    value = getattr(request.state, "request_id", None)
    return value[:64] if isinstance(value, str) else None


RequestId = Annotated[str | None, Depends(request_id)]
