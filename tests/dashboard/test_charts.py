"""Analytics JSON -> Polars -> Altair, without Streamlit: suppressed cells are never turned into numbers."""

from __future__ import annotations

from datetime import date

from dashboard import charts


def test_count_value_reads_plain_and_api_counts() -> None:
    assert charts.count_value(7) == (7, False)
    assert charts.count_value(None) == (None, False)
    assert charts.count_value({"value": 12, "suppressed": False}) == (12, False)
    assert charts.count_value({"value": None, "suppressed": True}) == (None, True)
    assert charts.count_value({"value": 3, "suppressed": True}) == (None, True)


def test_registrations_keep_suppressed_buckets_missing_and_sorted() -> None:
    frame = charts.registrations_frame({"buckets": [
        {"period": "2026-11-02", "registrations": None, "removals": 0, "registrationsSuppressed": True},
        {"period": "2026-11-01", "registrations": 12, "removals": 1},
    ]})
    assert frame["period"].to_list() == [date(2026, 11, 1), date(2026, 11, 2)]
    assert frame["registrations"].to_list() == [12, None]
    assert frame["suppressed"].to_list() == [False, True]
    spec = charts.registrations_chart(frame).to_dict()
    values = next(iter(spec["datasets"].values()))
    assert all(v["patients"] is not None for v in values)
    assert len(values) == 3  # 12 registrations, 1 removal, 0 removals; the suppressed bucket is not drawn


def test_demographics_pyramid_puts_men_left_and_orders_bands() -> None:
    frame = charts.demographics_frame({"cells": [
        {"ageBand": "18-34", "gender": "male", "patients": 20},
        {"ageBand": "18-34", "gender": "female", "patients": 25},
        {"ageBand": "80+", "gender": "female", "patients": None, "suppressed": True},
        {"ageBand": "0-17", "gender": "other", "patients": 11},
    ]})
    spec = charts.pyramid_chart(frame).to_dict()
    values = next(iter(spec["datasets"].values()))
    signed = {(v["age_band"], v["gender"]): v["signed"] for v in values}
    assert signed == {("18-34", "male"): -20, ("18-34", "female"): 25, ("0-17", "other"): 11}
    assert spec["encoding"]["y"]["sort"] == ["80+", "18-34", "0-17"]


def test_geography_sorted_with_suppressed_last() -> None:
    frame = charts.geography_frame({"cities": [
        {"city": "Leeds", "patients": 15}, {"city": "Hull", "patients": None, "suppressed": True},
        {"city": "York", "patients": 40},
    ]})
    assert frame["city"].to_list() == ["York", "Leeds", "Hull"]
    assert frame["patients"].to_list() == [40, 15, None]


def test_rows_finds_the_list_whatever_it_is_called() -> None:
    assert charts.rows({"asOf": "x", "statuses": [{"a": 1}]}) == [{"a": 1}]
    assert charts.rows({"asOf": "x"}) == []
