"""The rules of the analytics API: periods, age bands, and small-count suppression.

Every answer is built from the pre-aggregated tables inside one REPEATABLE READ snapshot
(see main.py), so its ``asOf`` (the pipeline's last commit) and its numbers agree.

Small-count suppression (for ANALYST callers; STAFF and ADMIN see exact counts): a count
from 1 to ``threshold - 1`` is hidden, as CDC WONDER hides counts of 9 or fewer. Because
each breakdown is published with its total, hiding one cell is not enough (total minus the
other cells gives it back), so further cells are hidden, smallest first, until at least two
are hidden and the hidden cells add up to at least ``threshold``; when that is impossible
the total is hidden too.

Registrations and removals are different: the same days are summed into many answers (day,
week and month buckets, partial first/last buckets, range totals, the summary's rolling
``newToday``/``new7d``/``new30d``), so hiding per answer cannot work (a week bucket minus its
shown days, or two ranges one day apart, would give a hidden day back). Instead each daily
series has ONE set of hidden days, decided on the whole series and never on the question
(:class:`HiddenDays`), and every registrations figure an ANALYST sees is a sum of days that
contains none of them: a bucket, total or window holding a hidden day is hidden. Every
published figure is then a sum of published days, so no combination of answers says more
about a hidden day than that it is hidden. The all-time total still follows from other
answers (active + removed patients), hence the one complementary day (see
:func:`hidden_days`). Residual risks are in the README (Analytics, small-count suppression).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from api.analytics import repository as analytics_repository
from api.analytics.schemas import (
    BillingRead,
    BillingStatusCount,
    CityCount,
    Count,
    DemographicCell,
    DemographicsRead,
    FreshnessRead,
    GeographyRead,
    Granularity,
    PartitionRead,
    PipelineState,
    RegistrationBucket,
    RegistrationsRead,
    SummaryRead,
    Suppression,
)
from pms.errors import BadRequest
from pms.security import Principal, Role
from stream_processing.heartbeat import running

#: Age bands (inclusive lower bound, label) by age reached this year.
AGE_BANDS: tuple[tuple[int, str], ...] = (
    (0, "0-17"), (18, "18-34"), (35, "35-49"), (50, "50-64"), (65, "65-79"), (80, "80+"),
)
UNKNOWN = "unknown"
#: Largest number of buckets one registrations answer may hold.
MAX_BUCKETS = 3700


def suppression_for(*, principal: Principal, threshold: int) -> Suppression:
    """ANALYST callers get suppressed small counts; STAFF and ADMIN see them."""
    return Suppression(applied=principal.role is Role.ANALYST and threshold > 1, threshold=threshold)


def suppress_cells(counts: Sequence[int], *, threshold: int) -> tuple[list[bool], bool]:
    """Which cells to hide, and whether the total must be hidden too.

    Args:
        counts: the cells of one breakdown whose total is also published.
        threshold: counts from 1 to ``threshold - 1`` are primary suppressions.

    Returns:
        (hidden flag per cell, total hidden)
    """
    hidden = [0 < c < threshold for c in counts]
    if not any(hidden):
        return hidden, False
    candidates = sorted((c, i) for i, c in enumerate(counts) if c > 0 and not hidden[i])
    while candidates and (sum(hidden) < 2 or sum(c for c, h in zip(counts, hidden, strict=True) if h) < threshold):
        _, index = candidates.pop(0)
        hidden[index] = True
    hidden_sum = sum(c for c, h in zip(counts, hidden, strict=True) if h)
    return hidden, sum(hidden) < 2 or hidden_sum < threshold


@dataclass(frozen=True, slots=True)
class HiddenDays:
    """The days of one daily series (registrations or removals) an ANALYST never sees, in any answer."""

    threshold: int
    #: The complementary day (see :func:`hidden_days`), hidden although its count is not small.
    complement: date | None = None
    applied: bool = True

    def hides(self, day: date, count: int) -> bool:
        return self.applied and (0 < count < self.threshold or day == self.complement)

    def as_sql(self) -> tuple[int, date | None]:
        """The same rule for a query: the largest hidden small count (0: none) and the complementary day."""
        return (self.threshold - 1, self.complement) if self.applied else (0, None)


def hidden_days(*, small_days: int, small_sum: int, smallest_large_day: date | None, threshold: int) -> HiddenDays:
    """Decide the hidden days of one daily series from the whole series (never from a question).

    Every day with a count from 1 to ``threshold - 1`` is hidden. The series' all-time total can be
    worked out from other answers (active plus removed patients), and that total minus every shown
    day is the sum of the hidden days; so when fewer than two days are hidden, or they add up to
    less than ``threshold``, the day with the smallest count >= ``threshold`` is hidden as well.

    Args:
        small_days: how many days have a count from 1 to ``threshold - 1``.
        small_sum: the sum of those counts.
        smallest_large_day: the day with the smallest count >= ``threshold`` (earliest on ties), if any.
        threshold: the privacy threshold.
    """
    complement = small_days > 0 and (small_days < 2 or small_sum < threshold)
    return HiddenDays(threshold=threshold, complement=smallest_large_day if complement else None)


def _series_rules(*, session: Session, suppression: Suppression) -> tuple[HiddenDays, HiddenDays]:
    """The hidden days of the registrations and of the removals series (nothing hidden for STAFF/ADMIN)."""
    if not suppression.applied:
        off = HiddenDays(threshold=suppression.threshold, applied=False)
        return off, off
    basis = analytics_repository.small_count_basis(session=session, threshold=suppression.threshold)
    regs, rems = (hidden_days(small_days=n, small_sum=total, smallest_large_day=day, threshold=suppression.threshold)
                  for n, total, day in (basis["registrations"], basis["removals"]))
    return regs, rems


def _count(value: int, *, hidden: bool) -> Count:
    return Count(value=None if hidden else value, suppressed=hidden)


def _single(value: int, suppression: Suppression) -> Count:
    """A standalone count: hidden when small."""
    return _count(value, hidden=suppression.applied and 0 < value < suppression.threshold)


def _as_of(status: dict | None) -> datetime:
    if status and status.get("last_commit_at"):
        return status["last_commit_at"]
    return datetime.now(UTC)


def _today() -> date:
    return datetime.now(UTC).date()


def age_band(birth_year: int | None, *, reference_year: int) -> str:
    """The band of the age reached in ``reference_year``; ``unknown`` without a usable birth year."""
    if birth_year is None or birth_year > reference_year:
        return UNKNOWN
    age = reference_year - birth_year
    label = AGE_BANDS[0][1]
    for lower, name in AGE_BANDS:
        if age >= lower:
            label = name
    return label


def pipeline_state(status: dict[str, Any] | None) -> PipelineState | None:
    """Running or not, from the pipelines' heartbeat (stream_processing/heartbeat.py); None when the
    tables predate the heartbeat (the pipeline has not migrated them yet)."""
    if status is None or "heartbeat_at" not in status:
        return None
    beat = status["heartbeat_at"]
    return PipelineState(running=running(beat, interval_s=status.get("heartbeat_interval_s"), now=status["db_now"]),
                         heartbeat_at=beat)


def summary(*, session: Session, principal: Principal, threshold: int) -> SummaryRead:
    """Active patients, recent registrations and removals, as of the pipeline's last commit."""
    suppression = suppression_for(principal=principal, threshold=threshold)
    status = analytics_repository.status(session=session)
    today = _today()
    counts = analytics_repository.summary_counts(session=session, today=today)
    # The new-registration windows are sums of days like any registrations answer: hidden when they hold
    # a hidden day (see HiddenDays), so that they cannot be set against registrations answers.
    window_hidden = dict.fromkeys((0, 6, 29), False)
    if suppression.applied:
        rule, _ = _series_rules(session=session, suppression=suppression)
        for day, registered, _removed in analytics_repository.registrations_between(
                session=session, start=today - timedelta(days=29), end=today):
            if rule.hides(day, registered):
                for days in window_hidden:
                    window_hidden[days] |= day >= today - timedelta(days=days)
    return SummaryRead(
        as_of=_as_of(status),
        active_patients=_single(counts["active"], suppression),
        new_today=_count(counts["new_today"], hidden=window_hidden[0]),
        new_7d=_count(counts["new_7d"], hidden=window_hidden[6]),
        new_30d=_count(counts["new_30d"], hidden=window_hidden[29]),
        removed_total=_single(counts["removed"], suppression),
        last_event_at=status["last_event_at"] if status else None,
        lag_messages=status["lag_messages"] if status else None,
        pipeline=pipeline_state(status),
        suppression=suppression,
    )


def _period_start(day: date, granularity: Granularity) -> date:
    if granularity is Granularity.WEEK:
        return day - timedelta(days=day.weekday())  # ISO weeks start on Monday
    if granularity is Granularity.MONTH:
        return day.replace(day=1)
    return day


def _bucket_count(start: date, end: date, granularity: Granularity) -> int:
    """How many periods :func:`_periods` makes for ``start``..``end``, counted exactly (an estimate by
    28-day months refused ranges under the limit, one by 7-day spans let one bucket too many through)."""
    if granularity is Granularity.DAY:
        return (end - start).days + 1
    if granularity is Granularity.WEEK:
        return (_period_start(end, granularity) - _period_start(start, granularity)).days // 7 + 1
    return (end.year - start.year) * 12 + end.month - start.month + 1


def _periods(start: date, end: date, granularity: Granularity) -> list[date]:
    periods = []
    current = _period_start(start, granularity)
    while current <= end:
        periods.append(current)
        try:
            if granularity is Granularity.DAY:
                current += timedelta(days=1)
            elif granularity is Granularity.WEEK:
                current += timedelta(days=7)
            else:
                current = (current.replace(day=28) + timedelta(days=4)).replace(day=1)
        except OverflowError:  # the next period would start after 9999-12-31, so after ``end``
            break
    return periods


def registrations(
    *, session: Session, principal: Principal, threshold: int, start: date | None, end: date | None,
    granularity: Granularity,
) -> RegistrationsRead:
    """Registrations and removals per period between ``start`` and ``end`` (inclusive), gaps as zero.

    Raises:
        BadRequest: ``start`` after ``end``, or more than MAX_BUCKETS periods.
    """
    end = end or _today()
    if start is None:
        start = end - timedelta(days=min(29, (end - date.min).days))
    if start > end:
        raise BadRequest(errors={"from": "must not be after 'to'"})
    if _bucket_count(start, end, granularity) > MAX_BUCKETS:
        raise BadRequest(errors={"from": f"range too long for granularity '{granularity.value}'"})
    suppression = suppression_for(principal=principal, threshold=threshold)
    reg_rule, rem_rule = _series_rules(session=session, suppression=suppression)
    periods = _periods(start, end, granularity)
    index = {p: i for i, p in enumerate(periods)}
    regs = [0] * len(periods)
    rems = [0] * len(periods)
    reg_hidden = [False] * len(periods)
    rem_hidden = [False] * len(periods)
    # A bucket (a partial first or last one too) is a sum of days: hidden when it holds a hidden day.
    for period, r, x, r_hidden, x_hidden in analytics_repository.registration_buckets(
        session=session, start=start, end=end, granularity=granularity.value,
        hide=(reg_rule.as_sql(), rem_rule.as_sql()),
    ):
        i = index[period]
        regs[i], rems[i], reg_hidden[i], rem_hidden[i] = r, x, r_hidden, x_hidden
    reg_total_hidden, rem_total_hidden = any(reg_hidden), any(rem_hidden)
    buckets = [
        RegistrationBucket(
            period=p,
            registrations=None if reg_hidden[i] else regs[i], registrations_suppressed=reg_hidden[i],
            removals=None if rem_hidden[i] else rems[i], removals_suppressed=rem_hidden[i],
        )
        for i, p in enumerate(periods)
    ]
    return RegistrationsRead(
        as_of=_as_of(analytics_repository.status(session=session)),
        granularity=granularity, from_=start, to=end,
        total_registrations=_count(sum(regs), hidden=reg_total_hidden),
        total_removals=_count(sum(rems), hidden=rem_total_hidden),
        buckets=buckets, suppression=suppression,
    )


def _hide(counts: list[int], suppression: Suppression) -> tuple[list[bool], bool]:
    if not suppression.applied:
        return [False] * len(counts), False
    return suppress_cells(counts, threshold=suppression.threshold)


def demographics(*, session: Session, principal: Principal, threshold: int) -> DemographicsRead:
    """Active patients by age band x gender."""
    suppression = suppression_for(principal=principal, threshold=threshold)
    reference_year = _today().year
    cells: dict[tuple[str, str], int] = {}
    for birth_year, gender, patients in analytics_repository.demographics(session=session):
        key = (age_band(birth_year, reference_year=reference_year), gender)
        cells[key] = cells.get(key, 0) + patients
    band_order = {name: i for i, (_, name) in enumerate(AGE_BANDS)}
    keys = sorted(cells, key=lambda k: (band_order.get(k[0], len(band_order)), k[1]))
    counts = [cells[k] for k in keys]
    hidden, total_hidden = _hide(counts, suppression)
    return DemographicsRead(
        as_of=_as_of(analytics_repository.status(session=session)),
        reference_year=reference_year,
        total=_count(sum(counts), hidden=total_hidden),
        cells=[DemographicCell(age_band=k[0], gender=k[1], patients=None if h else c, suppressed=h)
               for k, c, h in zip(keys, counts, hidden, strict=True)],
        suppression=suppression,
    )


def geography(*, session: Session, principal: Principal, threshold: int, top: int) -> GeographyRead:
    """The ``top`` cities by active patients; everything else as ``other``.

    For ANALYST callers a hidden city is never listed, whatever ``top`` is: it always sits
    in ``other``, so comparing answers for different ``top`` reveals only listed cities.
    """
    suppression = suppression_for(principal=principal, threshold=threshold)
    rows = analytics_repository.geography(session=session)
    total = sum(n for _, n in rows)
    hidden, total_hidden = _hide([n for _, n in rows], suppression)
    listed = [(city, n) for (city, n), h in zip(rows, hidden, strict=True) if not h][:top]
    other = total - sum(n for _, n in listed)
    return GeographyRead(
        as_of=_as_of(analytics_repository.status(session=session)),
        total=_count(total, hidden=total_hidden),
        cities=[CityCount(city=city or UNKNOWN, patients=n) for city, n in listed],
        other=_count(other, hidden=total_hidden),
        suppression=suppression,
    )


def billing(*, session: Session, principal: Principal, threshold: int) -> BillingRead:
    """Active patients by billing status."""
    suppression = suppression_for(principal=principal, threshold=threshold)
    rows = analytics_repository.billing(session=session)
    hidden, total_hidden = _hide([n for _, n in rows], suppression)
    return BillingRead(
        as_of=_as_of(analytics_repository.status(session=session)),
        total=_count(sum(n for _, n in rows), hidden=total_hidden),
        statuses=[BillingStatusCount(billing_status=s or UNKNOWN, patients=None if h else n, suppressed=h)
                  for (s, n), h in zip(rows, hidden, strict=True)],
        suppression=suppression,
    )


def freshness(*, session: Session) -> FreshnessRead:
    """How fresh analytics are: event -> commit p50/p99, counters, per-partition positions."""
    status = analytics_repository.status(session=session) or {}
    return FreshnessRead(
        as_of=_as_of(status),
        p50_ms=status.get("freshness_p50_ms"),
        p99_ms=status.get("freshness_p99_ms"),
        samples=status.get("freshness_samples", 0),
        last_event_at=status.get("last_event_at"),
        last_commit_at=status.get("last_commit_at"),
        events_processed=status.get("events_processed", 0),
        events_applied=status.get("events_applied", 0),
        events_stale=status.get("events_stale", 0),
        dead_letters=status.get("dead_letters", 0),
        lag_messages=status.get("lag_messages"),
        pipeline=pipeline_state(status),
        partitions=[PartitionRead(**{k: v for k, v in p.items() if k != "consumer"})
                    for p in analytics_repository.partitions(session=session)],
    )
