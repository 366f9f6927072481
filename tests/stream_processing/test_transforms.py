"""The batch parser (what the pipeline runs) against the one-message parser (the rules' reference).

``transforms.parse_batch`` validates and normalises canonical rows in Polars and sends every other
row through ``transforms.parse_event``; these tests hold the two equal on canonical, odd and hostile
input, so moving the parse out of Quix's per-message loop changed no rule.
"""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from pms.contracts import patient_events_pb2 as pb
from stream_processing import transforms

UUIDS = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: "{" + str(u) + "}"),
    st.uuids().map(lambda u: u.hex),
    st.sampled_from(["", "not-a-uuid", "00000000-0000-0000-0000-00000000000g"]),
)
DATES = st.one_of(
    st.dates().map(lambda d: d.isoformat()),
    st.sampled_from(["", "2020-02-29", "2021-02-29", "2020-02-30", "0000-01-01", "20200101", "2020-W01-1",
                     "1980-1-1", " 1980-01-01", "1980-01-01 ", "\uff11\uff19\uff18\uff10-01-01", "9999-12-31",
                     "0001-01-01"]),
)
TIMES = st.one_of(
    st.datetimes(timezones=st.timezones()).map(lambda t: t.isoformat()),
    st.datetimes().map(lambda t: t.isoformat()),  # naive: read as UTC
    st.sampled_from([
        "", "2026-11-26T09:00:00+00:00", "2026-11-26T09:00:00Z", "2026-11-26T09:00:00.123+00:00",
        "2026-11-26T23:59:60+00:00", "2026-11-26T24:00:00+00:00", "2026-11-26T09:00:00+23:59",
        "2026-11-26T09:00:00+24:00", "2026-11-26 09:00:00+00:00", "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00", "0001-01-01T00:30:00+00:00", "2026-02-30T00:00:00+00:00", "yesterday",
    ]),
)
TEXT = st.one_of(
    st.sampled_from(["", "female", "male", "other", "unknown", " Female ", "MALE", "nonsense", "Oslo", " Oslo\t",
                     "Tromsø", "\xa0Oslo", "Oslo\x1c", "\u2003male", "KELVIN \u212a", "Os\x00lo", "PENDING",
                     " active ", "ß", "İ", "\n", "x,\"y\"\nz", "\\N"]),
    st.text(max_size=8),
)


@st.composite
def messages(draw: Any) -> bytes | None:
    kind = draw(st.sampled_from(["event"] * 8 + ["garbage", "empty", "none"]))
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=20))
    if kind == "empty":
        return b""
    if kind == "none":
        return None
    msg = pb.PatientEvent(
        event_id="e", event_type=draw(st.integers(0, 5)), patient_id=draw(UUIDS),
        version=draw(st.one_of(st.integers(-2, 5), st.just(2**62))), occurred_at=draw(TIMES),
        name="Ada Example", email="ada@example.org", gender=draw(TEXT), date_of_birth=draw(DATES),
        registered_date=draw(DATES), city=draw(TEXT), billing_status=draw(TEXT),
    )
    return msg.SerializeToString()


def assert_same_as_one_by_one(raws: list[bytes | None]) -> None:
    events, dead = transforms.parse_batch(raws)
    rows = iter(events.to_dicts())
    for i, raw in enumerate(raws):
        expected = transforms.parse_event(raw)
        if isinstance(expected, transforms.DeadLetter):
            assert dead.get(i) == expected, (i, raw)
        else:
            assert i not in dead, (i, raw, dead.get(i))
            row = next(rows)
            assert row.pop("__i") == i
            assert row == expected, raw
    assert next(rows, None) is None
    assert dict(events.schema) == dict(pl.Schema(transforms.EVENT_SCHEMA | {"__i": pl.Int64}))


@hsettings(max_examples=300, deadline=None)
@given(raws=st.lists(messages(), max_size=12))
def test_batch_parse_equals_parsing_one_by_one(raws: list[bytes | None]) -> None:
    assert_same_as_one_by_one(raws)


def test_canonical_rows_take_the_vectorised_path() -> None:
    msg = pb.PatientEvent(event_type=pb.PATIENT_CREATED, patient_id="0b7e2f4e-6f1d-4c39-9a51-0d5d2b0e8c11",
                          version=3, occurred_at="2026-11-26T09:00:00.250000+01:00", gender=" Female",
                          date_of_birth="1980-02-29", registered_date="", city=" Tromsø ", billing_status="active")
    raw_frame = pl.DataFrame(
        {"__i": [0], "__type": [msg.event_type], "patient_id": [msg.patient_id], "version": [msg.version],
         "__time": [msg.occurred_at], "__gender": [msg.gender], "__dob": [msg.date_of_birth],
         "__registered": [msg.registered_date], "__city": [msg.city], "__billing": [msg.billing_status]},
        schema=transforms._RAW_SCHEMA,
    )
    fast, slow = transforms._normalise(raw_frame)
    assert slow == [] and fast.height == 1
    assert_same_as_one_by_one([msg.SerializeToString()])


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("city", "Os\x00lo", "invalid city"),
    ("billing_status", "PEND\x00", "invalid billing_status"),
    ("occurred_at", "0001-01-01T00:00:00+01:00", "invalid occurred_at"),
    ("date_of_birth", "2021-02-29", "invalid date_of_birth"),
])
def test_values_postgres_or_python_cannot_take_are_dead_letters_without_pii(field: str, value: str,
                                                                          reason: str) -> None:
    msg = pb.PatientEvent(event_type=pb.PATIENT_CREATED, patient_id="0b7e2f4e-6f1d-4c39-9a51-0d5d2b0e8c11",
                          version=1, occurred_at="2026-11-26T09:00:00+00:00", name="Ada Example",
                          email="ada@example.org")
    setattr(msg, field, value)
    events, dead = transforms.parse_batch([msg.SerializeToString()])
    assert events.is_empty()
    assert dead[0].reason == reason
    assert b"Ada Example" not in dead[0].raw and b"ada@example.org" not in dead[0].raw


def test_the_fast_path_keeps_only_edge_characters_both_strips_keep() -> None:
    """Over every code point: what _EDGE admits, neither Python's strip() nor Polars' strip_chars() strips."""
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    frame = pl.DataFrame({"c": chars}).with_columns(
        pl.col("c").str.contains(f"^{transforms._EDGE}$").alias("edge"),
        (pl.col("c").str.strip_chars() == pl.col("c")).alias("polars_keeps"),
    )
    edge = frame.filter("edge")
    assert edge.get_column("polars_keeps").all()
    assert not any(c.isspace() for c in edge.get_column("c").to_list())
    assert edge.height > 1_000_000  # the class is the rule, not an accident of a tiny alphabet


def test_values_at_every_stage_keep_their_order() -> None:
    good = pb.PatientEvent(event_type=pb.PATIENT_CREATED, patient_id="0b7e2f4e-6f1d-4c39-9a51-0d5d2b0e8c11",
                           version=1, occurred_at="2026-11-26T09:00:00+00:00").SerializeToString()
    later = pb.PatientEvent(event_type=pb.PATIENT_UPDATED, patient_id="0b7e2f4e-6f1d-4c39-9a51-0d5d2b0e8c11",
                            version=2, occurred_at="2026-11-26T10:00:00+00:00").SerializeToString()
    values: list[object] = [good, transforms.parse_event(later), None, transforms.DeadLetter("x", b"y"), later]
    events, dead = transforms.parse_values(values)
    assert events.get_column("version").to_list() == [1, 2, 2]
    assert sorted(dead) == [2, 3]
    assert dead[2].reason == "empty message"
