"""PatientEvent construction: the protobuf contract of DESIGN.md section 3, built from a row."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Protocol

from api.patient.models import OutboxEvent, Patient
from pms.contracts import patient_events_pb2

CREATED = "PATIENT_CREATED"
UPDATED = "PATIENT_UPDATED"
DELETED = "PATIENT_DELETED"


class PatientState(Protocol):
    """What an event is built from: a ``Patient`` row or the bulk path's plain values."""

    id: uuid.UUID
    version: int
    name: str
    email: str
    gender: str | None
    date_of_birth: date
    registered_date: date
    city: str | None
    billing_status: str


def build_event(patient: PatientState, *, event_type: str, occurred_at: datetime) -> patient_events_pb2.PatientEvent:
    """The event describing ``patient`` as it is now (after the change)."""
    return patient_events_pb2.PatientEvent(
        event_id=str(uuid.uuid4()),
        event_type=patient_events_pb2.EventType.Value(event_type),
        patient_id=str(patient.id),
        version=patient.version,
        occurred_at=occurred_at.astimezone(UTC).isoformat(),
        name=patient.name,
        email=patient.email,
        gender=patient.gender or "",
        date_of_birth=patient.date_of_birth.isoformat(),
        registered_date=patient.registered_date.isoformat(),
        city=patient.city or "",
        billing_status=patient.billing_status or "",
    )


def outbox_row(patient: Patient, *, event_type: str, occurred_at: datetime) -> OutboxEvent:
    """An outbox row for ``patient``'s current state, to add in the same transaction as the change."""
    event = build_event(patient, event_type=event_type, occurred_at=occurred_at)
    return OutboxEvent(
        event_id=uuid.UUID(event.event_id),
        patient_id=patient.id,
        version=patient.version,
        event_type=event_type,
        payload=event.SerializeToString(),
        occurred_at=occurred_at,
    )
