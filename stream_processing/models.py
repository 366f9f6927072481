"""SQLAlchemy tables of the ``analytics`` database (Alembic owns the DDL; this is the map).

The pipeline writes them with bulk SQL; the analytics API and notebooks read them. The
column list is documented in docs/readme/analytics.md and must stay in step with it.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Double,
    Identity,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    Table,
    Text,
    Uuid,
    func,
)

from pms.db import new_metadata

metadata = new_metadata()

patient_facts = Table(
    "patient_facts",
    metadata,
    Column("patient_id", Uuid, primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("active", Boolean, nullable=False),
    Column("gender", Text, nullable=False),
    Column("birth_date", Date),
    Column("birth_year", Integer),
    Column("city", Text, nullable=False),
    Column("registered_date", Date),
    Column("billing_status", Text, nullable=False),
    Column("removed_on", Date),
    Column("last_event_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

daily_registrations = Table(
    "daily_registrations",
    metadata,
    Column("day", Date, primary_key=True),
    Column("registrations", Integer, nullable=False, server_default="0"),
    Column("removals", Integer, nullable=False, server_default="0"),
)

demographics = Table(
    "demographics",
    metadata,
    Column("birth_year", Integer),
    Column("gender", Text, nullable=False),
    Column("patients", Integer, nullable=False),
    Index("uq_demographics_birth_year_gender", "birth_year", "gender", unique=True,
          postgresql_nulls_not_distinct=True),
)

geography = Table(
    "geography",
    metadata,
    Column("city", Text, primary_key=True),
    Column("patients", Integer, nullable=False),
)

billing_status_counts = Table(
    "billing_status_counts",
    metadata,
    Column("billing_status", Text, primary_key=True),
    Column("patients", Integer, nullable=False),
)

pipeline_status = Table(
    "pipeline_status",
    metadata,
    Column("id", SmallInteger, primary_key=True),
    Column("events_processed", BigInteger, nullable=False, server_default="0"),
    Column("events_applied", BigInteger, nullable=False, server_default="0"),
    Column("events_stale", BigInteger, nullable=False, server_default="0"),
    Column("dead_letters", BigInteger, nullable=False, server_default="0"),
    Column("last_event_at", DateTime(timezone=True)),
    Column("last_commit_at", DateTime(timezone=True)),
    Column("lag_messages", BigInteger),
    Column("freshness_p50_ms", Double),
    Column("freshness_p99_ms", Double),
    Column("freshness_samples", Integer, nullable=False, server_default="0"),
    #: Stamped every PMS_PIPELINE__HEARTBEAT_S by a consuming pipeline (stream_processing/heartbeat.py),
    #: with that interval, so readers judge the beat by the writer's setting.
    Column("heartbeat_at", DateTime(timezone=True)),
    Column("heartbeat_interval_s", Double),
)

pipeline_partitions = Table(
    "pipeline_partitions",
    metadata,
    Column("topic", Text, primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("next_offset", BigInteger, nullable=False),
    Column("high_watermark", BigInteger),
    Column("lag", BigInteger),
    Column("consumer", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("kafka_offset", BigInteger, nullable=False),
    Column("reason", Text, nullable=False),
    Column("raw", LargeBinary, nullable=False),
    Column("raw_digest", Text, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("uq_dead_letters_topic_partition_kafka_offset_raw_digest", "topic", "partition", "kafka_offset",
          "raw_digest", unique=True),
)
