"""Registrations for ANALYST callers: no combination of answers narrows a hidden day.

The daily series is written straight into ``daily_registrations`` (the pipeline's own tests prove
how it gets there); the answers come from the real API on the analyst connection.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from pms.security import Role, encode_token
from pms.settings import Settings

pytestmark = pytest.mark.integration

TODAY = datetime.now(UTC).date()
MARCH = [date(2025, 3, d) for d in range(1, 32)]  # 2025-03-01 is a Saturday; weeks start on Monday
Get = Callable[..., dict[str, Any]]


@pytest.fixture
def get(client: TestClient, api_settings: Settings) -> Get:
    def call(path: str, role: Role = Role.ANALYST, **params: Any) -> dict[str, Any]:
        token = encode_token(api_settings, sub="someone@pms.local", role=role)
        response = client.get(path, params=params, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        body = response.json()
        body.pop("asOf")
        return body

    return call


def load(engine: Engine, days: dict[date, tuple[int, int]]) -> None:
    """Replace the daily series with ``days`` (day -> (registrations, removals))."""
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE daily_registrations"))
        if days:
            conn.execute(text("INSERT INTO daily_registrations (day, registrations, removals) VALUES (:d, :r, :x)"),
                         [{"d": d, "r": r, "x": x} for d, (r, x) in days.items()])


def march(**small: int) -> dict[date, tuple[int, int]]:
    """Every March 2025 day with 20 + day registrations (none removed), but ``small`` (``d12=3``) overridden."""
    days = {d: (20 + d.day, 0) for d in MARCH}
    for name, count in small.items():
        days[date(2025, 3, int(name[1:]))] = (count, 0)
    return days


def battery(get: Get, role: Role = Role.ANALYST) -> list[dict[str, Any]]:
    """Every answer an attacker could combine: each start day x two ends x three granularities."""
    return [get("/analytics/registrations", role, **{"from": str(start), "to": str(end), "granularity": g})
            for g in ("day", "week", "month") for end in (date(2025, 3, 16), date(2025, 4, 6))
            for start in [date(2025, 2, 24), *MARCH] if start <= end]


def test_answers_do_not_change_when_hidden_days_trade_counts(analytics: Engine, get: Get) -> None:
    """Two series that differ only inside their hidden days (same number of them, same sum) give
    every ANALYST answer byte for byte: so no combination of answers tells them apart."""
    load(analytics, march(d12=3, d20=4))
    first = battery(get)
    first_staff = battery(get, Role.STAFF)
    load(analytics, march(d12=4, d20=3))
    assert battery(get) == first
    assert battery(get, Role.STAFF) != first_staff  # the battery does see the change where it may


def test_no_week_month_or_partial_bucket_holding_a_hidden_day_is_shown(analytics: Engine, get: Get) -> None:
    load(analytics, march(d12=3, d20=4))  # two small days adding up to 7 < 10: one large day hidden too
    days = get("/analytics/registrations", **{"from": "2025-03-01", "to": "2025-03-31"})
    hidden = {b["period"] for b in days["buckets"] if b["registrationsSuppressed"]}
    assert hidden == {"2025-03-12", "2025-03-20", "2025-03-01"}  # 03-01 (21) is the smallest large day
    assert all(b["registrations"] is None for b in days["buckets"] if b["registrationsSuppressed"])
    assert days["totalRegistrations"] == {"value": None, "suppressed": True}

    weeks = get("/analytics/registrations", **{"from": "2025-03-01", "to": "2025-03-31", "granularity": "week"})
    shown = {b["period"]: b["registrations"] for b in weeks["buckets"] if not b["registrationsSuppressed"]}
    # Weeks of 03-01 (Sat, partial: 02-24..03-02), 03-10 and 03-17 hold hidden days; the others are exact sums.
    assert shown == {"2025-03-03": sum(20 + d for d in range(3, 10)), "2025-03-24": sum(20 + d for d in range(24, 31)),
                     "2025-03-31": 51}
    # The old per-answer attack: a week minus its shown days. The week is simply not given.
    week = get("/analytics/registrations", **{"from": "2025-03-10", "to": "2025-03-16", "granularity": "week"})
    assert week["buckets"][0]["registrations"] is None and week["totalRegistrations"]["value"] is None
    # Partial first buckets one day apart (03-12..03-16 minus 03-13..03-16 would be 03-12).
    late = get("/analytics/registrations", **{"from": "2025-03-13", "to": "2025-03-16", "granularity": "week"})
    early = get("/analytics/registrations", **{"from": "2025-03-12", "to": "2025-03-16", "granularity": "week"})
    assert late["buckets"][0]["registrations"] == sum(20 + d for d in range(13, 17))
    assert early["buckets"][0]["registrations"] is None
    month = get("/analytics/registrations", **{"from": "2025-03-01", "to": "2025-03-31", "granularity": "month"})
    assert month["buckets"][0]["registrationsSuppressed"] is True

    # STAFF and ADMIN see exact counts everywhere.
    staff = get("/analytics/registrations", Role.ADMIN, **{"from": "2025-03-10", "to": "2025-03-16",
                                                           "granularity": "week"})
    assert staff["buckets"][0]["registrations"] == 3 + sum(20 + d for d in (10, 11, 13, 14, 15, 16))


def test_no_complementary_day_when_the_hidden_days_already_add_up(analytics: Engine, get: Get) -> None:
    load(analytics, march(d12=5, d20=6))  # 11 >= 10 and two days
    days = get("/analytics/registrations", **{"from": "2025-03-01", "to": "2025-03-31"})
    assert {b["period"] for b in days["buckets"] if b["registrationsSuppressed"]} == {"2025-03-12", "2025-03-20"}


def test_summary_windows_follow_the_same_hidden_days(analytics: Engine, get: Get) -> None:
    """``new7d`` minus the shown days of the last week was the other way to a hidden day."""
    load(analytics, {TODAY: (30, 0), TODAY - timedelta(days=3): (4, 2), TODAY - timedelta(days=20): (50, 0),
                     TODAY - timedelta(days=40): (12, 15), TODAY - timedelta(days=41): (0, 15)})
    summary = get("/analytics/summary")
    assert summary["newToday"] == {"value": 30, "suppressed": False}
    assert summary["new7d"] == {"value": None, "suppressed": True}  # holds the 4
    assert summary["new30d"] == {"value": None, "suppressed": True}
    recent = get("/analytics/registrations", **{"from": str(TODAY - timedelta(days=45)), "to": str(TODAY)})
    hidden = {b["period"] for b in recent["buckets"] if b["registrationsSuppressed"]}
    # The 4 alone would be the all-time total minus the shown days: the smallest large day (the 12) goes too.
    assert hidden == {str(TODAY - timedelta(days=3)), str(TODAY - timedelta(days=40))}
    # Removals are their own series: one small day (2) with the smallest large day (15, earliest) beside it.
    removals = {b["period"] for b in recent["buckets"] if b["removalsSuppressed"]}
    assert removals == {str(TODAY - timedelta(days=3)), str(TODAY - timedelta(days=41))}
    staff = get("/analytics/summary", Role.STAFF)
    assert (staff["newToday"]["value"], staff["new7d"]["value"], staff["new30d"]["value"]) == (30, 34, 84)


def test_an_empty_or_all_large_series_hides_nothing(analytics: Engine, get: Get) -> None:
    load(analytics, {})
    summary = get("/analytics/summary")
    assert [summary[k]["suppressed"] for k in ("newToday", "new7d", "new30d")] == [False, False, False]
    load(analytics, march())
    weeks = get("/analytics/registrations", **{"from": "2025-03-01", "to": "2025-03-31", "granularity": "week"})
    assert not any(b["registrationsSuppressed"] for b in weeks["buckets"])
    assert weeks["totalRegistrations"]["value"] == sum(20 + d for d in range(1, 32))
