"""HTTP routes of the analytics API (the gateway maps ``/api/analytics/*`` here)."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Query

from api.analytics import service as analytics_service
from api.analytics.dependencies import Reader, SessionDep, Threshold
from api.analytics.schemas import (
    BillingRead,
    DemographicsRead,
    FreshnessRead,
    GeographyRead,
    Granularity,
    RegistrationsRead,
    SummaryRead,
)
from pms.web import ErrorBody

#: Answers every route may give besides its 200 (a 400 for bad parameters is documented by pms.web).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No or bad bearer token"},
    403: {"model": ErrorBody, "description": "Role not allowed"},
    503: {"model": ErrorBody, "description": "Database unavailable, or the pipeline has not created the analytics "
                                             "tables yet; retry after `Retry-After` seconds",
          "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}}},
}

router = APIRouter(prefix="/analytics", tags=["analytics"], responses=ERROR_RESPONSES)


@router.get("/summary", response_model=SummaryRead)
def summary(session: SessionDep, principal: Reader, threshold: Threshold) -> SummaryRead:
    """Return active patients, new registrations today / 7 d / 30 d, removals, as-of time, lag, pipeline state."""
    return analytics_service.summary(session=session, principal=principal, threshold=threshold)


@router.get("/registrations", response_model=RegistrationsRead)
def registrations(
    session: SessionDep,
    principal: Reader,
    threshold: Threshold,
    start: Annotated[date | None, Query(alias="from", description="First day (default: 29 days before 'to')")] = None,
    end: Annotated[date | None, Query(alias="to", description="Last day, inclusive (default: today, UTC)")] = None,
    granularity: Granularity = Granularity.DAY,
) -> RegistrationsRead:
    """Return registrations and removals per day, week or month, gaps filled with zero."""
    return analytics_service.registrations(session=session, principal=principal, threshold=threshold,
                                           start=start, end=end, granularity=granularity)


@router.get("/demographics", response_model=DemographicsRead)
def demographics(session: SessionDep, principal: Reader, threshold: Threshold) -> DemographicsRead:
    """Return active patients by age band x gender."""
    return analytics_service.demographics(session=session, principal=principal, threshold=threshold)


@router.get("/geography", response_model=GeographyRead)
def geography(
    session: SessionDep, principal: Reader, threshold: Threshold,
    top: Annotated[int, Query(ge=1, le=1000, description="How many cities to list")] = 10,
) -> GeographyRead:
    """Return the cities with the most active patients."""
    return analytics_service.geography(session=session, principal=principal, threshold=threshold, top=top)


@router.get("/billing", response_model=BillingRead)
def billing(session: SessionDep, principal: Reader, threshold: Threshold) -> BillingRead:
    """Return active patients by billing status."""
    return analytics_service.billing(session=session, principal=principal, threshold=threshold)


@router.get("/freshness", response_model=FreshnessRead)
def freshness(session: SessionDep, principal: Reader) -> FreshnessRead:
    """Return event-to-analytics freshness p50/p99, pipeline counters, whether it runs, partition positions."""
    return analytics_service.freshness(session=session)
