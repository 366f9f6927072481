"""The registrations buckets PostgreSQL sums (repository.registration_buckets) equal a day-by-day
reference in Python: same periods (ISO weeks from Monday, calendar months, partial first and last
buckets), same sums, and the same hidden flags for every hide rule."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from api.analytics import repository as analytics_repository
from api.analytics.schemas import Granularity
from api.analytics.service import MAX_BUCKETS, HiddenDays, _bucket_count, _period_start, _periods

pytestmark = pytest.mark.integration

FIRST = date(2024, 12, 20)
SPAN = 120  # days of data: several month and year boundaries, weeks across them

days_strategy = st.dictionaries(
    st.integers(0, SPAN - 1).map(lambda n: FIRST + timedelta(days=n)),
    st.tuples(st.integers(0, 25), st.integers(0, 25)),
    max_size=SPAN,
)
rules = st.one_of(
    st.just(HiddenDays(threshold=10, applied=False)),
    st.builds(HiddenDays, threshold=st.integers(2, 15),
              complement=st.one_of(st.none(), st.integers(0, SPAN - 1).map(lambda n: FIRST + timedelta(days=n)))),
)


def reference(days: dict[date, tuple[int, int]], start: date, end: date, granularity: Granularity,
              reg_rule: HiddenDays, rem_rule: HiddenDays) -> list[tuple[date, int, int, bool, bool]]:
    buckets: dict[date, list] = {}
    for day in sorted(d for d in days if start <= d <= end):
        r, x = days[day]
        bucket = buckets.setdefault(_period_start(day, granularity), [0, 0, False, False])
        bucket[0] += r
        bucket[1] += x
        bucket[2] |= reg_rule.hides(day, r)
        bucket[3] |= rem_rule.hides(day, x)
    return [(period, *values) for period, values in sorted(buckets.items())]  # type: ignore[misc]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(days=days_strategy, start_at=st.integers(0, SPAN - 1), length=st.integers(0, SPAN),
       granularity=st.sampled_from(list(Granularity)), reg_rule=rules, rem_rule=rules)
def test_sql_buckets_equal_the_day_by_day_reference(analytics: Engine, days, start_at, length, granularity,
                                                    reg_rule, rem_rule) -> None:
    with analytics.begin() as conn:
        conn.execute(text("TRUNCATE daily_registrations"))
        if days:
            conn.execute(text("INSERT INTO daily_registrations (day, registrations, removals) VALUES (:d, :r, :x)"),
                         [{"d": d, "r": r, "x": x} for d, (r, x) in days.items()])
    start = FIRST + timedelta(days=start_at)
    end = start + timedelta(days=length)
    with Session(analytics) as session:
        got = analytics_repository.registration_buckets(
            session=session, start=start, end=end, granularity=granularity.value,
            hide=(reg_rule.as_sql(), rem_rule.as_sql()))
    assert got == reference(days, start, end, granularity, reg_rule, rem_rule)


@settings(max_examples=300, deadline=None)
@given(start=st.dates(date(1, 1, 1), date(9999, 12, 31)), days=st.integers(0, 40_000),
       granularity=st.sampled_from(list(Granularity)))
def test_the_bucket_limit_counts_the_buckets_it_would_build(start: date, days: int, granularity: Granularity) -> None:
    end = min(date(9999, 12, 31), start + timedelta(days=min(days, (date(9999, 12, 31) - start).days)))
    if granularity is Granularity.DAY and (end - start).days > 5000:
        end = start + timedelta(days=5000)  # enough to cross the limit; keeps the reference list small
    assert _bucket_count(start, end, granularity) == len(_periods(start, end, granularity))


def test_the_bucket_limit_at_its_edges() -> None:
    """3,601 months were refused (an estimate by 28-day months); a 3,701-week range was let through."""
    assert _bucket_count(date(1900, 1, 1), date(2200, 1, 1), Granularity.MONTH) == 3601 <= MAX_BUCKETS
    assert _bucket_count(date(2000, 1, 2), date(2070, 11, 24), Granularity.WEEK) == 3701 > MAX_BUCKETS
