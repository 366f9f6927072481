"""SQL of the analytics API: reads of the pre-aggregated tables only (never a scan of facts)."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from sqlalchemy import ScalarSelect, func, select, text
from sqlalchemy.orm import Session

from stream_processing import models as analytics_models

m = analytics_models


def status(*, session: Session) -> dict[str, Any] | None:
    """The status row, plus ``db_now``: the database's clock, which stamped the pipeline's heartbeat.

    ``s.*``, not the model's columns: an API newer than the tables (the pipeline migrates them when it
    starts) still answers, without the columns it does not find.
    """
    row = session.execute(text("SELECT s.*, now() AS db_now FROM pipeline_status s WHERE s.id = 1")).mappings().first()
    return dict(row) if row else None


def partitions(*, session: Session) -> list[dict[str, Any]]:
    table = m.pipeline_partitions
    rows = session.execute(select(table).order_by(table.c.topic, table.c.partition)).mappings().all()
    return [dict(r) for r in rows]


def registrations_between(*, session: Session, start: date, end: date) -> list[tuple[date, int, int]]:
    """Daily (day, registrations, removals) rows with ``start <= day <= end`` (missing days are zero)."""
    t = m.daily_registrations
    rows = session.execute(
        select(t.c.day, t.c.registrations, t.c.removals).where(t.c.day.between(start, end)).order_by(t.c.day)
    ).all()
    return [(r[0], int(r[1]), int(r[2])) for r in rows]


#: Registrations and removals per period, and whether each period holds a hidden day of either
#: series, summed in PostgreSQL: bucketing ~4,000 daily rows in Python (11 years by month) cost
#: ~15 ms per answer and spikes of ~90 ms (row conversion and date arithmetic per day).
_REGISTRATION_BUCKETS = text("""
    SELECT CAST(CASE CAST(:granularity AS text)
                    WHEN 'week' THEN date_trunc('week', CAST(day AS timestamp))
                    WHEN 'month' THEN date_trunc('month', CAST(day AS timestamp))
                    ELSE day END AS date) AS period,
           sum(registrations), sum(removals),
           coalesce(bool_or(registrations BETWEEN 1 AND :reg_below OR day = CAST(:reg_day AS date)), false),
           coalesce(bool_or(removals BETWEEN 1 AND :rem_below OR day = CAST(:rem_day AS date)), false)
    FROM daily_registrations
    WHERE day BETWEEN :start AND :end
    GROUP BY 1
    ORDER BY 1
""")


def registration_buckets(*, session: Session, start: date, end: date, granularity: str,
                         hide: tuple[tuple[int, date | None], tuple[int, date | None]]
                         ) -> list[tuple[date, int, int, bool, bool]]:
    """(period start, registrations, removals, registrations hidden, removals hidden) for each period
    (``day``, ``week`` from Monday, ``month``) with a row between ``start`` and ``end``.

    ``hide`` gives, per series (registrations, removals), the largest small count (0: none) and the
    one other hidden day (None: none): a period is hidden when it holds such a day.
    """
    (reg_below, reg_day), (rem_below, rem_day) = hide
    rows = session.execute(_REGISTRATION_BUCKETS, {
        "granularity": granularity, "start": start, "end": end,
        "reg_below": reg_below, "reg_day": reg_day, "rem_below": rem_below, "rem_day": rem_day,
    }).all()
    return [(r[0], int(r[1]), int(r[2]), bool(r[3]), bool(r[4])) for r in rows]


_SMALL_COUNT_BASIS = text(
    "SELECT count(*) FILTER (WHERE registrations BETWEEN 1 AND :below), "
    "coalesce(sum(registrations) FILTER (WHERE registrations BETWEEN 1 AND :below), 0), "
    "min(ARRAY[registrations, day - DATE '1970-01-01']) FILTER (WHERE registrations >= :threshold), "
    "count(*) FILTER (WHERE removals BETWEEN 1 AND :below), "
    "coalesce(sum(removals) FILTER (WHERE removals BETWEEN 1 AND :below), 0), "
    "min(ARRAY[removals, day - DATE '1970-01-01']) FILTER (WHERE removals >= :threshold) "
    "FROM daily_registrations"
)
_EPOCH = date(1970, 1, 1)


def small_count_basis(*, session: Session, threshold: int) -> dict[str, tuple[int, int, date | None]]:
    """Per daily series (``registrations``, ``removals``) over ALL days: how many days hold a count from 1 to
    ``threshold - 1``, their sum, and the day with the smallest count >= ``threshold`` (earliest on ties).

    One scan of the (small: one row per day) table; ``min(ARRAY[count, day])`` picks that day without a sort.
    """
    row = session.execute(_SMALL_COUNT_BASIS, {"below": threshold - 1, "threshold": threshold}).one()

    def day(pair: list[int] | None) -> date | None:
        return None if pair is None else _EPOCH + timedelta(days=int(pair[1]))

    return {"registrations": (int(row[0]), int(row[1]), day(row[2])),
            "removals": (int(row[3]), int(row[4]), day(row[5]))}


def summary_counts(*, session: Session, today: date) -> dict[str, int]:
    """Active patients, registrations since today-0/6/29 days and all removals, in one round trip."""
    reg = m.daily_registrations

    def registered_since(days: int) -> ScalarSelect[int]:
        return (select(func.coalesce(func.sum(reg.c.registrations), 0))
                .where(reg.c.day.between(today - timedelta(days=days), today)).scalar_subquery())

    row = session.execute(select(
        select(func.coalesce(func.sum(m.geography.c.patients), 0)).scalar_subquery().label("active"),
        registered_since(0).label("new_today"),
        registered_since(6).label("new_7d"),
        registered_since(29).label("new_30d"),
        select(func.coalesce(func.sum(reg.c.removals), 0)).scalar_subquery().label("removed"),
    )).mappings().one()
    return {k: int(v) for k, v in row.items()}


def demographics(*, session: Session) -> list[tuple[int | None, str, int]]:
    t = m.demographics
    return [(r[0], r[1], int(r[2])) for r in session.execute(select(t.c.birth_year, t.c.gender, t.c.patients))]


def geography(*, session: Session) -> list[tuple[str, int]]:
    t = m.geography
    rows = session.execute(select(t.c.city, t.c.patients).order_by(t.c.patients.desc(), t.c.city))
    return [(r[0], int(r[1])) for r in rows]


def billing(*, session: Session) -> list[tuple[str, int]]:
    t = m.billing_status_counts
    rows = session.execute(select(t.c.billing_status, t.c.patients).order_by(t.c.billing_status))
    return [(r[0], int(r[1])) for r in rows]
