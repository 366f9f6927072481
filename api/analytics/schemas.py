"""Response shapes of the analytics API (camelCase JSON, like the rest of the platform).

A count is ``null`` with ``suppressed: true`` when small-count suppression hid it.
"""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class Schema(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class Granularity(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


class Suppression(Schema):
    """Whether small counts were hidden for this caller, and below which count."""

    applied: bool
    threshold: int


class Count(Schema):
    """A count, or null when suppressed."""

    value: int | None
    suppressed: bool = False


class PipelineState(Schema):
    """Whether a pipeline is running: its last heartbeat, and whether that is recent.

    Every other status figure moves only when a batch is written; after a pipeline stopped they
    keep their last values (a lag of 0 included), so ``running`` is what says they may be stale.
    """

    running: bool = Field(description="A pipeline beat within the last three of its heartbeat intervals")
    heartbeat_at: datetime | None = Field(description="The latest heartbeat of any pipeline process")


#: ``pipeline`` in the summary and freshness answers.
PipelineField = Annotated[PipelineState | None, Field(
    description="Whether a pipeline is consuming; null until the pipeline has migrated the analytics tables")]


class SummaryRead(Schema):
    as_of: datetime
    active_patients: Count
    new_today: Count
    new_7d: Count = Field(alias="new7d")
    new_30d: Count = Field(alias="new30d")
    removed_total: Count
    last_event_at: datetime | None
    lag_messages: int | None
    pipeline: PipelineField
    suppression: Suppression


class RegistrationBucket(Schema):
    period: date
    registrations: int | None
    removals: int | None
    registrations_suppressed: bool = False
    removals_suppressed: bool = False


class RegistrationsRead(Schema):
    as_of: datetime
    granularity: Granularity
    from_: date
    to: date
    total_registrations: Count
    total_removals: Count
    buckets: list[RegistrationBucket]
    suppression: Suppression

    model_config = ConfigDict(alias_generator=lambda name: "from" if name == "from_" else to_camel(name),
                              populate_by_name=True)


class DemographicCell(Schema):
    age_band: str
    gender: str
    patients: int | None
    suppressed: bool = False


class DemographicsRead(Schema):
    as_of: datetime
    #: Age bands use age reached this year (current year - birth year).
    reference_year: int
    total: Count
    cells: list[DemographicCell]
    suppression: Suppression


class CityCount(Schema):
    city: str
    patients: int | None
    suppressed: bool = False


class GeographyRead(Schema):
    as_of: datetime
    total: Count
    cities: list[CityCount]
    #: Patients in cities outside the top N.
    other: Count
    suppression: Suppression


class BillingStatusCount(Schema):
    billing_status: str
    patients: int | None
    suppressed: bool = False


class BillingRead(Schema):
    as_of: datetime
    total: Count
    statuses: list[BillingStatusCount]
    suppression: Suppression


class PartitionRead(Schema):
    topic: str
    partition: int
    next_offset: int
    high_watermark: int | None
    lag: int | None
    updated_at: datetime


class FreshnessRead(Schema):
    as_of: datetime
    p50_ms: float | None
    p99_ms: float | None
    samples: int
    last_event_at: datetime | None
    last_commit_at: datetime | None
    events_processed: int
    events_applied: int
    events_stale: int
    dead_letters: int
    lag_messages: int | None
    pipeline: PipelineField
    partitions: list[PartitionRead]
