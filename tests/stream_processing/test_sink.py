"""The sink against a real PostgreSQL: exact, idempotent, order-proof (no Kafka needed)."""

from __future__ import annotations

import random
import uuid
from datetime import date, timedelta

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from stream_processing import transforms
from stream_processing.sink import FreshnessWindow, Record, apply_records
from tests.stream_processing.helpers import (
    BASE_TIME,
    Event,
    PatientState,
    history,
    oracle,
    read_tables,
    status,
    truncate,
)

pytestmark = pytest.mark.integration


def deliver(engine: Engine, events: list[Event], *, batch_sizes: list[int] | None = None,
            partitions: int = 3, topic: str = "patient", freshness: FreshnessWindow | None = None) -> None:
    """Feed ``events`` through the sink in batches, as the Quix sink would: raw message bytes."""
    records = []
    offsets = dict.fromkeys(range(partitions), 0)
    for event in events:
        partition = int(uuid.UUID(event.patient_id)) % partitions
        records.append(Record(topic, partition, offsets[partition], event.raw()))
        offsets[partition] += 1
    sizes = iter(batch_sizes or [])
    start = 0
    while start < len(records):
        size = next(sizes, 50)
        apply_records(engine, records=records[start:start + max(size, 1)], freshness=freshness)
        start += max(size, 1)


def assert_exact(engine: Engine, events: list[Event]) -> None:
    expected = oracle(events)
    actual = read_tables(engine)
    for table, rows in expected.items():
        assert actual[table] == rows, table


states = st.builds(
    PatientState,
    gender=st.sampled_from(["female", "male", "other", "unknown", "", "FEMALE", "nonsense"]),
    dob=st.sampled_from(["1950-05-05", "1980-01-01", "1999-12-31", "2020-02-29", ""]),
    city=st.sampled_from(["Oslo", "Bergen", " Oslo ", "", "Tromsø"]),
    registered=st.sampled_from(["2026-10-30", "2026-11-01", "2026-11-02", ""]),
    billing=st.sampled_from(["PENDING", "ACTIVE", "active", ""]),
)
patients = st.lists(
    st.tuples(st.lists(states, min_size=1, max_size=4), st.booleans()), min_size=1, max_size=6
)


@hsettings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    patients=patients,
    duplicate=st.floats(0, 1),
    shuffle_seed=st.one_of(st.none(), st.integers(0, 2**16)),
    batch_sizes=st.lists(st.integers(1, 12), max_size=8),
)
def test_tables_equal_a_from_scratch_recomputation(
    analytics_engine: Engine, patients: list[tuple[list[PatientState], bool]], duplicate: float,
    shuffle_seed: int | None, batch_sizes: list[int],
) -> None:
    truncate(analytics_engine)
    events: list[Event] = []
    for i, (patient_states, deleted) in enumerate(patients):
        pid = str(uuid.UUID(int=i + 1))
        events += history(pid, patient_states, delete=deleted, start=BASE_TIME + timedelta(days=i))
    delivered = list(events)
    rng = random.Random(shuffle_seed or 0)
    delivered += [e for e in events if rng.random() < duplicate]  # redelivery
    if shuffle_seed is not None:
        rng.shuffle(delivered)  # out of order (across patients and versions)
    deliver(analytics_engine, delivered, batch_sizes=batch_sizes)
    assert_exact(analytics_engine, events)
    counters = status(analytics_engine)
    assert counters["events_processed"] == len(delivered)
    assert counters["events_applied"] + counters["events_stale"] == len(delivered)


def test_redelivering_everything_changes_nothing(analytics: Engine) -> None:
    events = history(str(uuid.uuid4()), [PatientState(), PatientState(city="Bergen")], delete=False)
    events += history(str(uuid.uuid4()), [PatientState(gender="male")], delete=True)
    deliver(analytics, events)
    before = read_tables(analytics)
    deliver(analytics, events, batch_sizes=[1, 1, 1, 1])
    deliver(analytics, list(reversed(events)))
    assert read_tables(analytics) == before
    assert status(analytics)["events_stale"] == 2 * len(events)


def test_update_moves_patient_between_buckets_and_delete_removes_it(analytics: Engine) -> None:
    pid = str(uuid.uuid4())
    first = PatientState(gender="female", dob="1980-01-01", city="Oslo", registered="2026-11-01", billing="PENDING")
    moved = PatientState(gender="male", dob="1990-06-01", city="Bergen", registered="2026-11-02", billing="ACTIVE")
    create, update, delete = history(pid, [first, moved], delete=True)
    deliver(analytics, [create])
    tables = read_tables(analytics)
    assert tables["demographics"] == {(1980, "female", 1)}
    assert tables["geography"] == {("Oslo", 1)}
    assert tables["billing_status_counts"] == {("PENDING", 1)}
    deliver(analytics, [update])
    tables = read_tables(analytics)
    assert tables["demographics"] == {(1990, "male", 1)}  # the old bucket's zero row is gone
    assert tables["geography"] == {("Bergen", 1)}
    assert tables["billing_status_counts"] == {("ACTIVE", 1)}
    assert tables["daily_registrations"] == {(date(2026, 11, 2), 1, 0)}  # registration moved days
    deliver(analytics, [delete])
    tables = read_tables(analytics)
    assert tables["demographics"] == set()
    assert tables["geography"] == set()
    assert tables["billing_status_counts"] == set()
    assert delete.occurred_at.date() == date(2026, 11, 2)
    assert tables["daily_registrations"] == {(date(2026, 11, 2), 1, 1)}
    (fact,) = tables["patient_facts"]
    assert fact[1:3] == (3, False)


def test_stateless_delete_keeps_last_known_attributes(analytics: Engine) -> None:
    pid = str(uuid.uuid4())
    events = history(pid, [PatientState(city="Bergen")], delete=True, stateless_delete=True)
    deliver(analytics, events[:1])
    deliver(analytics, events[1:])
    one_by_one = read_tables(analytics)
    truncate(analytics)
    deliver(analytics, events)  # both in one batch
    assert read_tables(analytics) == one_by_one
    (fact,) = one_by_one["patient_facts"]
    assert fact[6] == "Bergen" and fact[2] is False
    assert_exact(analytics, events)


def test_stale_version_changes_nothing(analytics: Engine) -> None:
    pid = str(uuid.uuid4())
    events = history(pid, [PatientState(city="Oslo"), PatientState(city="Bergen")])
    deliver(analytics, [events[1]])
    deliver(analytics, [events[0]])
    assert read_tables(analytics)["geography"] == {("Bergen", 1)}
    assert status(analytics)["events_stale"] == 1


def test_garbage_and_unknown_types_land_in_dead_letters_without_pii(analytics: Engine) -> None:
    good = history(str(uuid.uuid4()), [PatientState()])[0]
    unknown = good.proto()
    unknown.event_type = 42
    unknown.version = 5
    bad_date = good.proto()
    bad_date.date_of_birth = "1980-13-45"
    nul_city = good.proto()
    nul_city.patient_id = str(uuid.uuid4())
    nul_city.city = "Os\x00lo"  # PostgreSQL text cannot hold NUL: it would fail every retry of the batch
    records = [
        Record("patient", 0, 0, b"\xff\xfe not protobuf at all"),
        Record("patient", 0, 1, unknown.SerializeToString()),
        Record("patient", 0, 2, good.raw()),
        Record("patient", 0, 3, bad_date.SerializeToString()),
        Record("patient", 0, 4, b""),
        Record("patient", 0, 5, None),  # a null value: Quix does not call the deserializer for it
        Record("patient", 0, 6, nul_city.SerializeToString()),
    ]
    apply_records(analytics, records=records)
    apply_records(analytics, records=records)  # redelivery does not duplicate dead letters
    with analytics.connect() as conn:
        rows = conn.execute(text("SELECT kafka_offset, reason, raw FROM dead_letters ORDER BY kafka_offset")).all()
    assert [(r[0], r[1]) for r in rows] == [
        (0, "not a PatientEvent (protobuf decode failed)"),
        (1, "unknown event type 42"),
        (3, "invalid date_of_birth"),
        (4, "empty message"),
        (5, "empty message"),
        (6, "invalid city"),
    ]
    assert rows[0][2] == b"\xff\xfe not protobuf at all"
    for _, _, raw in [rows[1], rows[2], rows[5]]:
        assert b"Ada Example" not in raw and b"ada@example.org" not in raw
    assert len(read_tables(analytics)["patient_facts"]) == 1  # processing went on
    counters = status(analytics)
    assert counters["dead_letters"] == 12  # seen, redeliveries included (stored once, above)
    assert counters["events_processed"] == 14
    assert counters["events_processed"] == counters["events_applied"] + counters["events_stale"] \
        + counters["dead_letters"]


def test_pre_parsed_values_and_raw_bytes_give_the_same_tables(analytics: Engine) -> None:
    """apply_records also takes parse_event's output (the analytics API tests feed it that way)."""
    events = [e for i in range(30) for e in history(str(uuid.uuid4()), [PatientState(city=f"C{i % 4}"),
                                                                        PatientState(city="Oslo")],
                                                    delete=i % 3 == 0, start=BASE_TIME + timedelta(minutes=i))]
    deliver(analytics, events, batch_sizes=[len(events)])
    from_raw = read_tables(analytics)
    truncate(analytics)
    mixed = [Record("patient", 0, i, transforms.parse_event(e.raw()) if i % 2 else e.raw())
             for i, e in enumerate(events)]
    apply_records(analytics, records=mixed)
    assert read_tables(analytics) == from_raw
    assert_exact(analytics, events)


def test_positions_lag_and_freshness_are_recorded(analytics: Engine) -> None:
    events = [e for i in range(20) for e in history(str(uuid.uuid4()), [PatientState()],
                                                    start=BASE_TIME + timedelta(minutes=i))]
    window = FreshnessWindow(size=10)
    records = [Record("patient", 0, 100 + i, e.raw()) for i, e in enumerate(events)]
    apply_records(analytics, records=records, freshness=window, watermarks=lambda topic, p: 150, consumer="t:1")
    with analytics.connect() as conn:
        row = conn.execute(text("SELECT next_offset, high_watermark, lag, consumer FROM pipeline_partitions")).one()
    assert tuple(row) == (120, 150, 30, "t:1")
    counters = status(analytics)
    assert counters["lag_messages"] == 30
    assert counters["freshness_samples"] == 10
    assert counters["last_event_at"] == max(e.occurred_at for e in events)
    # occurred_at is weeks before "now": freshness must say so, and p99 >= p50.
    assert counters["freshness_p99_ms"] >= counters["freshness_p50_ms"] > 3600 * 1000


def test_text_that_csv_or_copy_could_misread_is_stored_as_is(analytics: Engine) -> None:
    """The facts travel as CSV through COPY: quotes, separators, newlines and NULL markers stay text."""
    cities = ['x,"y"\nz', "\\N", '""', "'; DROP TABLE geography; --", "Tromsø\r\n", "\t"]
    events = [e for i, city in enumerate(cities)
              for e in history(str(uuid.uuid4()), [PatientState(city=city, billing=city.upper())],
                               start=BASE_TIME + timedelta(minutes=i))]
    deliver(analytics, events)
    assert_exact(analytics, events)
    assert {row[0] for row in read_tables(analytics)["geography"]} == {c.strip() for c in cities}
