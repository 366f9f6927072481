"""Shared test helpers: PatientEvent builders, a from-scratch oracle, table readers.

The oracle recomputes every analytics table from the full list of events with plain
Python (no Polars, no SQL), independently of stream_processing.transforms.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, text

from pms.contracts import patient_events_pb2 as pb
from stream_processing import transforms

TYPES = {"CREATED": pb.PATIENT_CREATED, "UPDATED": pb.PATIENT_UPDATED, "DELETED": pb.PATIENT_DELETED}
TABLES = ("patient_facts", "daily_registrations", "demographics", "geography", "billing_status_counts",
          "pipeline_partitions", "dead_letters")
BASE_TIME = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


@dataclass
class PatientState:
    gender: str = "female"
    dob: str = "1980-01-01"
    city: str = "Oslo"
    registered: str = "2026-11-01"
    billing: str = "PENDING"


@dataclass
class Event:
    patient_id: str
    version: int
    kind: str
    state: PatientState | None
    occurred_at: datetime = field(default_factory=lambda: BASE_TIME)

    def proto(self) -> pb.PatientEvent:
        msg = pb.PatientEvent(
            event_id=str(uuid.uuid4()), event_type=TYPES[self.kind], patient_id=self.patient_id,
            version=self.version, occurred_at=self.occurred_at.isoformat(), name="Ada Example",
            email="ada@example.org",
        )
        if self.state is not None:
            msg.gender = self.state.gender
            msg.date_of_birth = self.state.dob
            msg.city = self.state.city
            msg.registered_date = self.state.registered
            msg.billing_status = self.state.billing
        return msg

    def raw(self) -> bytes:
        return self.proto().SerializeToString()


def history(patient_id: str, states: list[PatientState], *, delete: bool = False, stateless_delete: bool = False,
            start: datetime = BASE_TIME) -> list[Event]:
    """One patient's events in version order: create, updates, optionally a delete."""
    events = []
    for i, state in enumerate(states):
        events.append(Event(patient_id, i + 1, "CREATED" if i == 0 else "UPDATED", state,
                            start + timedelta(minutes=i)))
    if delete:
        events.append(Event(patient_id, len(states) + 1, "DELETED", None if stateless_delete else states[-1],
                            start + timedelta(minutes=len(states), hours=30)))
    return events


def _norm_date(value: str) -> date | None:
    return date.fromisoformat(value) if value else None


def oracle(events: list[Event]) -> dict[str, set[tuple[Any, ...]]]:
    """Every analytics table recomputed from scratch (in-order semantics per patient)."""
    by_patient: dict[str, dict[int, Event]] = {}
    for event in events:
        by_patient.setdefault(event.patient_id, {})[event.version] = event
    facts = set()
    registrations: Counter[date] = Counter()
    removals: Counter[date] = Counter()
    demo: Counter[tuple[int | None, str]] = Counter()
    geo: Counter[str] = Counter()
    billing: Counter[str] = Counter()
    for pid, versions in by_patient.items():
        newest = versions[max(versions)]
        with_state = [versions[v] for v in sorted(versions) if versions[v].state is not None
                      or versions[v].kind != "DELETED"]
        state = with_state[-1].state if with_state else None
        gender = (state.gender.strip().lower() if state else "") or "unknown"
        gender = gender if gender in transforms.GENDERS else "unknown"
        dob = _norm_date(state.dob) if state else None
        city = state.city.strip() if state else ""
        registered = _norm_date(state.registered) if state else None
        bill = state.billing.strip().upper() if state else ""
        active = newest.kind != "DELETED"
        removed_on = None if active else newest.occurred_at.astimezone(UTC).date()
        facts.add((pid, newest.version, active, gender, dob, dob.year if dob else None, city, registered, bill,
                   removed_on, newest.occurred_at))
        if registered:
            registrations[registered] += 1
        if not active:
            removals[removed_on] += 1  # type: ignore[index]
        if active:
            demo[(dob.year if dob else None, gender)] += 1
            geo[city] += 1
            billing[bill] += 1
    days = set(registrations) | set(removals)
    return {
        "patient_facts": facts,
        "daily_registrations": {(d, registrations[d], removals[d]) for d in days},
        "demographics": {(k[0], k[1], n) for k, n in demo.items()},
        "geography": set(geo.items()),
        "billing_status_counts": set(billing.items()),
    }


def read_tables(engine: Engine) -> dict[str, set[tuple[Any, ...]]]:
    """The analytics tables as sets of tuples, in the oracle's column order."""
    queries = {
        "patient_facts": "SELECT patient_id::text, version, active, gender, birth_date, birth_year, city,"
                         " registered_date, billing_status, removed_on, last_event_at FROM patient_facts",
        "daily_registrations": "SELECT day, registrations, removals FROM daily_registrations",
        "demographics": "SELECT birth_year, gender, patients FROM demographics",
        "geography": "SELECT city, patients FROM geography",
        "billing_status_counts": "SELECT billing_status, patients FROM billing_status_counts",
    }
    with engine.connect() as conn:
        return {name: {tuple(row) for row in conn.execute(text(sql))} for name, sql in queries.items()}


def status(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT * FROM pipeline_status WHERE id = 1")).mappings().one())


def truncate(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)}"))
        conn.execute(text(
            "UPDATE pipeline_status SET events_processed = 0, events_applied = 0, events_stale = 0,"
            " dead_letters = 0, last_event_at = NULL, last_commit_at = NULL, lag_messages = NULL,"
            " freshness_p50_ms = NULL, freshness_p99_ms = NULL, freshness_samples = 0, heartbeat_at = NULL,"
            " heartbeat_interval_s = NULL"
            " WHERE id = 1"
        ))
