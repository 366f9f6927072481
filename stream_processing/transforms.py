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
from collections.abc import Sequence
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
    try:
        return parsed.astimezone(UTC)
    except OverflowError as exc:  # e.g. 0001-01-01T00:00+01:00 lies before datetime.min in UTC
        raise InvalidEvent("invalid occurred_at") from exc


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
    for name in ("city", "billing_status"):
        if "\x00" in getattr(msg, name):  # PostgreSQL text cannot hold NUL: the batch would fail forever
            raise InvalidEvent(f"invalid {name}")
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


# The canonical forms the patient service writes. A batch's rows in these forms are validated and
# normalised by Polars in one pass; any other row goes through event_from_proto, whose rules they
# reproduce exactly (tests/stream_processing/test_transforms.py holds the two paths equal).
_UUID_RE = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_DATE_RE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"
_TIME_RE = (r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{6})?"
            r"[+-]([01][0-9]|2[0-3]):[0-5][0-9]$")
# Python's str.strip() and Polars' strip_chars() agree when what is stripped is ASCII whitespace and
# the kept text starts and ends with a character neither of them calls whitespace (their sets differ:
# Python also strips \x1c-\x1f). _EDGE is that character class, held to both by a test over all of Unicode.
_EDGE = r"[^\x00-\x20\x7F-\xA0\x{1680}\x{180E}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}]"
_TRIMMABLE_RE = rf"(?s)^[ \t\n\r]*({_EDGE}(.*{_EDGE})?)?[ \t\n\r]*$"
_ASCII_RE = r"^[\x20-\x7e\t\n\r]*$"
_RAW_SCHEMA: dict[str, Any] = {
    "__i": pl.Int64, "__type": pl.Int64, "patient_id": pl.String, "version": pl.Int64, "__time": pl.String,
    "__gender": pl.String, "__dob": pl.String, "__registered": pl.String, "__city": pl.String,
    "__billing": pl.String,
}


def parse_batch(raws: list[bytes | None]) -> tuple[pl.DataFrame, dict[int, DeadLetter]]:
    """Decode a batch of Kafka message values at once: the batch form of :func:`parse_event`.

    Per message only the protobuf decode and the field reads run in Python; validation and
    normalisation (UUID, dates, timestamps, trimming, case) run vectorised in Polars. This
    is what lets the deserializer hand the raw bytes through untouched, so the one-message-
    at-a-time consumer loop does no parsing at all.

    Returns:
        The events (EVENT_SCHEMA plus ``__i``, the message's index in ``raws``) in input order,
        and the dead letters by index.
    """
    dead: dict[int, DeadLetter] = {}
    columns: tuple[list[Any], ...] = tuple([] for _ in _RAW_SCHEMA)
    index, types, ids, versions, times, genders, dobs, registered, cities, billing = columns
    decode = patient_events_pb2.PatientEvent.FromString
    for i, raw in enumerate(raws):
        if not raw:
            dead[i] = DeadLetter("empty message", b"")
            continue
        try:
            msg = decode(raw)
        except (DecodeError, RuntimeError, ValueError):
            dead[i] = DeadLetter("not a PatientEvent (protobuf decode failed)", bytes(raw))
            continue
        index.append(i)
        types.append(msg.event_type)
        ids.append(msg.patient_id)
        versions.append(msg.version)
        times.append(msg.occurred_at)
        genders.append(msg.gender)
        dobs.append(msg.date_of_birth)
        registered.append(msg.registered_date)
        cities.append(msg.city)
        billing.append(msg.billing_status)
    raw_frame = pl.DataFrame(dict(zip(_RAW_SCHEMA, columns, strict=True)), schema=_RAW_SCHEMA)
    fast, slow_index = _normalise(raw_frame)
    slow: list[dict[str, Any]] = []
    for i in slow_index:
        parsed = parse_event(raws[i])
        if isinstance(parsed, DeadLetter):
            dead[i] = parsed
        else:
            slow.append(parsed | {"__i": i})
    events = fast
    if slow:
        slow_frame = pl.DataFrame(slow, schema=EVENT_SCHEMA | {"__i": pl.Int64}, orient="row")
        events = pl.concat([fast, slow_frame.select(fast.columns)]).sort("__i")
    return events, dead


def parse_values(values: Sequence[object]) -> tuple[pl.DataFrame, dict[int, DeadLetter]]:
    """Events and dead letters of a batch of consumed values, whatever stage each is at.

    A value is the raw message (``bytes``, or ``None`` for a null value), an event dict from
    :func:`parse_event`, or a :class:`DeadLetter`. Returns the events (EVENT_SCHEMA) in input
    order and the dead letters by index in ``values``.
    """
    raw_at = [i for i, v in enumerate(values) if v is None or isinstance(v, bytes | bytearray | memoryview)]
    if len(raw_at) == len(values):  # the pipeline's case: everything straight from Kafka
        events, dead = parse_batch(values)  # type: ignore[arg-type]
        return events.drop("__i"), dead
    frame, parsed_dead = parse_batch([values[i] for i in raw_at])  # type: ignore[misc]
    dead = {raw_at[j]: letter for j, letter in parsed_dead.items()}
    frames = [frame.with_columns(pl.col("__i").map_elements(raw_at.__getitem__, return_dtype=pl.Int64))]
    parsed: list[dict[str, Any]] = []
    for i, value in enumerate(values):
        if isinstance(value, DeadLetter):
            dead[i] = value
        elif isinstance(value, dict):
            parsed.append(value | {"__i": i})
    if parsed:
        frames.append(pl.DataFrame(parsed, schema=EVENT_SCHEMA | {"__i": pl.Int64}, orient="row")
                      .select(frame.columns))
    return pl.concat(frames).sort("__i").drop("__i"), dead


def _normalise(raw: pl.DataFrame) -> tuple[pl.DataFrame, list[int]]:
    """The rows of ``raw`` in canonical form as events, and the indexes of all other rows."""
    dob = pl.col("__dob").str.to_date("%Y-%m-%d", strict=False)
    registered = pl.col("__registered").str.to_date("%Y-%m-%d", strict=False)
    occurred = pl.col("__time").str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%:z", time_unit="us", strict=False)
    parsed = raw.with_columns(dob.alias("birth_date"), registered.alias("registered_date"),
                              occurred.dt.convert_time_zone("UTC").alias("occurred_at"))

    def date_ok(text: str, value: str) -> pl.Expr:
        return (pl.col(text) == "") | (pl.col(text).str.contains(_DATE_RE) & (pl.col(value).dt.year() >= 1))

    canonical = (
        pl.col("__type").is_in(list(_EVENT_TYPES))
        & pl.col("patient_id").str.contains(_UUID_RE)
        & (pl.col("version") >= 1)
        & date_ok("__dob", "birth_date")
        & date_ok("__registered", "registered_date")
        & pl.col("__time").str.contains(_TIME_RE)
        & pl.col("occurred_at").dt.year().is_between(2, 9998)  # far from datetime's range in any offset
        & pl.all_horizontal([pl.col(c).str.contains(_TRIMMABLE_RE) & ~pl.col(c).str.contains("\x00", literal=True)
                             for c in ("__gender", "__city", "__billing")])
        & pl.col("__gender").str.contains(_ASCII_RE)
        & pl.col("__billing").str.contains(_ASCII_RE)
    ).fill_null(False)
    parsed = parsed.with_columns(canonical.alias("__canonical"))
    slow = parsed.filter(~pl.col("__canonical")).get_column("__i").to_list()
    gender = pl.col("__gender").str.strip_chars().str.to_lowercase()
    city = pl.col("__city").str.strip_chars()
    billing = pl.col("__billing").str.strip_chars()
    event_type = pl.col("__type").replace_strict(_EVENT_TYPES, return_dtype=pl.String)
    has_state = ((gender != "") | pl.col("birth_date").is_not_null() | pl.col("registered_date").is_not_null()
                 | (city != "") | (billing != ""))
    fast = parsed.filter(pl.col("__canonical")).select(
        "__i",
        "patient_id",
        "version",
        event_type.alias("event_type"),
        "occurred_at",
        (has_state | (event_type != DELETED)).alias("carries_state"),
        pl.when(gender.is_in(sorted(GENDERS))).then(gender).otherwise(pl.lit("unknown")).alias("gender"),
        "birth_date",
        pl.col("birth_date").dt.year().cast(pl.Int32).alias("birth_year"),
        city.alias("city"),
        "registered_date",
        billing.str.to_uppercase().alias("billing_status"),
    ).cast(EVENT_SCHEMA)
    return fast, slow


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
