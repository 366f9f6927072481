"""Pure transforms of the analytics pipeline: bytes -> events -> new facts -> aggregate deltas.

Nothing here touches Kafka or Postgres, so every rule that makes analytics exact (newest
version per patient, stale events change nothing, deltas from old facts to new facts) is
unit-testable on plain values.

Rules (DESIGN.md section 4, "Analytics are exact"):

- An event applies only if its version is above the stored one; per batch only the newest
  version of each patient matters.
- A patient's attributes come from the newest event that carries state. A delete that
  carries no attributes at all keeps the last known ones, so counts of registrations stay
  right after a delete.
- Every aggregate is a function of the facts alone, so its change is (new facts) - (old facts)
  of the patients that changed.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import polars as pl
from google.protobuf.message import DecodeError

from pms.contracts import patient_events_pb2

CREATED = "CREATED"
UPDATED = "UPDATED"
DELETED = "DELETED"

_EVENT_TYPES = {
    patient_events_pb2.PATIENT_CREATED: CREATED,
    patient_events_pb2.PATIENT_UPDATED: UPDATED,
    patient_events_pb2.PATIENT_DELETED: DELETED,
}
GENDERS = frozenset({"female", "male", "other", "unknown"})
#: Attribute columns of a fact (the state an event carries); no PII among them.
STATE_COLUMNS = ("gender", "birth_date", "birth_year", "city", "registered_date", "billing_status")
FACT_COLUMNS = ("patient_id", "version", "active", *STATE_COLUMNS, "removed_on", "last_event_at")

EVENT_SCHEMA: dict[str, Any] = {
    "patient_id": pl.String,
    "version": pl.Int64,
    "event_type": pl.String,
    "occurred_at": pl.Datetime("us", "UTC"),
    "carries_state": pl.Boolean,
    "gender": pl.String,
    "birth_date": pl.Date,
    "birth_year": pl.Int32,
    "city": pl.String,
    "registered_date": pl.Date,
    "billing_status": pl.String,
}
FACT_SCHEMA: dict[str, Any] = {
    "patient_id": pl.String,
    "version": pl.Int64,
    "active": pl.Boolean,
    "gender": pl.String,
    "birth_date": pl.Date,
    "birth_year": pl.Int32,
    "city": pl.String,
    "registered_date": pl.Date,
    "billing_status": pl.String,
    "removed_on": pl.Date,
    "last_event_at": pl.Datetime("us", "UTC"),
}


class InvalidEvent(ValueError):
    """A message that cannot be applied; its reason goes to the dead-letter table."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message the pipeline keeps aside instead of applying (PII fields already removed)."""

    reason: str
    raw: bytes


def _parse_date(value: str, field: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise InvalidEvent(f"invalid {field}") from exc


def _parse_time(value: str) -> datetime:
    if not value:
        raise InvalidEvent("missing occurred_at")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidEvent("invalid occurred_at") from exc
    if parsed.tzinfo is None:  # the contract says UTC; a naive stamp is read as UTC
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def event_from_proto(msg: patient_events_pb2.PatientEvent) -> dict[str, Any]:
    """The analytics view of one event: validated, normalised, name and email dropped.

    Raises:
        InvalidEvent: unknown event type or a field that cannot be read.
    """
    event_type = _EVENT_TYPES.get(msg.event_type)
    if event_type is None:
        raise InvalidEvent(f"unknown event type {msg.event_type}")
    try:
        patient_id = str(uuid.UUID(msg.patient_id))
    except ValueError as exc:
        raise InvalidEvent("invalid patient_id") from exc
    if msg.version < 1:
        raise InvalidEvent("version must be >= 1")
    birth_date = _parse_date(msg.date_of_birth, "date_of_birth")
    registered_date = _parse_date(msg.registered_date, "registered_date")
    gender = msg.gender.strip().lower()
    carries_state = bool(gender or birth_date or registered_date or msg.city.strip() or msg.billing_status.strip())
    return {
        "patient_id": patient_id,
        "version": int(msg.version),
        "event_type": event_type,
        "occurred_at": _parse_time(msg.occurred_at),
        # A create or update always carries the full state; a delete may carry none.
        "carries_state": carries_state or event_type != DELETED,
        "gender": gender if gender in GENDERS else "unknown",
        "birth_date": birth_date,
        "birth_year": birth_date.year if birth_date else None,
        "city": msg.city.strip(),
        "registered_date": registered_date,
        "billing_status": msg.billing_status.strip().upper(),
    }


def parse_event(raw: bytes | None) -> dict[str, Any] | DeadLetter:
    """Decode one Kafka message value into an event dict, or a :class:`DeadLetter`."""
    if not raw:
        return DeadLetter("empty message", b"")
    msg = patient_events_pb2.PatientEvent()
    try:
        msg.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        return DeadLetter("not a PatientEvent (protobuf decode failed)", raw)
    try:
        return event_from_proto(msg)
    except InvalidEvent as exc:
        # It parsed, so it may hold a name and email: keep the evidence, not the PII.
        msg.ClearField("name")
        msg.ClearField("email")
        return DeadLetter(str(exc), msg.SerializeToString())


def events_frame(events: list[dict[str, Any]]) -> pl.DataFrame:
    """A typed frame of parsed events."""
    return pl.DataFrame(events, schema=EVENT_SCHEMA, orient="row") if events else pl.DataFrame(schema=EVENT_SCHEMA)


def facts_frame(rows: list[dict[str, Any]] | None = None) -> pl.DataFrame:
    """A typed frame of stored facts."""
    return pl.DataFrame(rows, schema=FACT_SCHEMA, orient="row") if rows else pl.DataFrame(schema=FACT_SCHEMA)


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """What one batch changes: the facts to write, the facts they replace, and the counts."""

    new_facts: pl.DataFrame
    old_facts: pl.DataFrame
    applied: pl.DataFrame  # distinct (patient, version) events above the stored version
    stale: int


def plan_batch(events: pl.DataFrame, stored: pl.DataFrame) -> BatchPlan:
    """Decide the new facts of every patient in ``events`` given their ``stored`` facts.

    Args:
        events: parsed events (any order, duplicates allowed).
        stored: current facts of (at least) those patients.
    """
    stored_versions = stored.select("patient_id", pl.col("version").alias("stored_version"))
    tagged = events.join(stored_versions, on="patient_id", how="left")
    fresh_mask = pl.col("stored_version").is_null() | (pl.col("version") > pl.col("stored_version"))
    # A redelivered copy inside the batch is as stale as one arriving later.
    applied = tagged.filter(fresh_mask).drop("stored_version").unique(["patient_id", "version"], keep="first")
    stale = tagged.height - applied.height
    if applied.is_empty():
        return BatchPlan(facts_frame(), facts_frame(), applied, stale)

    ordered = applied.sort("patient_id", "version")
    newest = ordered.group_by("patient_id", maintain_order=True).last()
    state = (
        ordered.filter(pl.col("carries_state"))
        .group_by("patient_id", maintain_order=True)
        .last()
        .select("patient_id", *STATE_COLUMNS)
    )
    stored_state = stored.select("patient_id", *[pl.col(c).alias(f"{c}__stored") for c in STATE_COLUMNS])
    merged = (
        newest.select("patient_id", "version", "event_type", "occurred_at")
        .join(state.rename({c: f"{c}__batch" for c in STATE_COLUMNS}), on="patient_id", how="left")
        .join(stored_state, on="patient_id", how="left")
        .with_columns(pl.col("gender__batch").is_not_null().alias("__has_batch_state"))
    )
    # Attributes from the newest state-carrying event of this batch; else the stored ones.
    state_exprs = []
    for col in STATE_COLUMNS:
        state_exprs.append(
            pl.when(pl.col("__has_batch_state")).then(pl.col(f"{col}__batch")).otherwise(pl.col(f"{col}__stored"))
            .alias(col)
        )
    is_delete = pl.col("event_type") == DELETED
    new_facts = merged.select(
        "patient_id",
        "version",
        (~is_delete).alias("active"),
        *state_exprs,
        pl.when(is_delete).then(pl.col("occurred_at").dt.date()).otherwise(None).alias("removed_on"),
        pl.col("occurred_at").alias("last_event_at"),
    ).with_columns(
        # A patient first seen through a stateless delete has unknown attributes.
        pl.col("gender").fill_null("unknown"),
        pl.col("city").fill_null(""),
        pl.col("billing_status").fill_null(""),
    ).select(FACT_COLUMNS).cast(FACT_SCHEMA)
    old_facts = stored.join(new_facts.select("patient_id"), on="patient_id", how="semi").select(FACT_COLUMNS)
    return BatchPlan(new_facts.sort("patient_id"), old_facts, applied, stale)


def _contributions(facts: pl.DataFrame, sign: int) -> dict[str, pl.DataFrame]:
    active = facts.filter(pl.col("active"))
    one = pl.lit(sign, pl.Int64)
    registrations = facts.filter(pl.col("registered_date").is_not_null()).select(
        pl.col("registered_date").alias("day"), one.alias("registrations"), pl.lit(0, pl.Int64).alias("removals")
    )
    removals = facts.filter(~pl.col("active") & pl.col("removed_on").is_not_null()).select(
        pl.col("removed_on").alias("day"), pl.lit(0, pl.Int64).alias("registrations"), one.alias("removals")
    )
    return {
        "daily_registrations": pl.concat([registrations, removals]),
        "demographics": active.select("birth_year", "gender", one.alias("patients")),
        "geography": active.select("city", one.alias("patients")),
        "billing_status_counts": active.select("billing_status", one.alias("patients")),
    }


AGGREGATE_KEYS: dict[str, tuple[str, ...]] = {
    "daily_registrations": ("day",),
    "demographics": ("birth_year", "gender"),
    "geography": ("city",),
    "billing_status_counts": ("billing_status",),
}
AGGREGATE_COUNTS: dict[str, tuple[str, ...]] = {
    "daily_registrations": ("registrations", "removals"),
    "demographics": ("patients",),
    "geography": ("patients",),
    "billing_status_counts": ("patients",),
}


def aggregate_deltas(old_facts: pl.DataFrame, new_facts: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """The change of every aggregate when ``old_facts`` are replaced by ``new_facts``.

    Returns one frame per aggregate table with its key columns and signed count changes,
    zero changes dropped and rows sorted by key (so concurrent writers lock rows in one order).
    """
    minus = _contributions(old_facts, -1)
    plus = _contributions(new_facts, +1)
    deltas: dict[str, pl.DataFrame] = {}
    for table, keys in AGGREGATE_KEYS.items():
        counts = AGGREGATE_COUNTS[table]
        combined = pl.concat([minus[table], plus[table]])
        summed = combined.group_by(list(keys)).agg([pl.col(c).sum() for c in counts])
        nonzero = pl.any_horizontal([pl.col(c) != 0 for c in counts])
        deltas[table] = summed.filter(nonzero).sort(list(keys), nulls_last=False)
    return deltas


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
