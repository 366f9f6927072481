"""analytics tables: patient facts, aggregates, pipeline status, dead letters

Revision ID: 0001_analytics_tables
Revises:
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_analytics_tables"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "patient_facts",
        sa.Column("patient_id", sa.Uuid(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("gender", sa.Text(), nullable=False),
        sa.Column("birth_date", sa.Date(), nullable=True),
        sa.Column("birth_year", sa.Integer(), nullable=True),
        sa.Column("city", sa.Text(), nullable=False),
        sa.Column("registered_date", sa.Date(), nullable=True),
        sa.Column("billing_status", sa.Text(), nullable=False),
        sa.Column("removed_on", sa.Date(), nullable=True),
        sa.Column("last_event_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("patient_id", name=op.f("pk_patient_facts")),
    )
    op.create_table(
        "daily_registrations",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("registrations", sa.Integer(), server_default="0", nullable=False),
        sa.Column("removals", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("day", name=op.f("pk_daily_registrations")),
    )
    op.create_table(
        "demographics",
        sa.Column("birth_year", sa.Integer(), nullable=True),
        sa.Column("gender", sa.Text(), nullable=False),
        sa.Column("patients", sa.Integer(), nullable=False),
    )
    # NULLS NOT DISTINCT: an unknown birth year is one bucket, so upserts can target it.
    op.create_index(
        "uq_demographics_birth_year_gender", "demographics", ["birth_year", "gender"], unique=True,
        postgresql_nulls_not_distinct=True,
    )
    op.create_table(
        "geography",
        sa.Column("city", sa.Text(), nullable=False),
        sa.Column("patients", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("city", name=op.f("pk_geography")),
    )
    op.create_table(
        "billing_status_counts",
        sa.Column("billing_status", sa.Text(), nullable=False),
        sa.Column("patients", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("billing_status", name=op.f("pk_billing_status_counts")),
    )
    op.create_table(
        "pipeline_status",
        sa.Column("id", sa.SmallInteger(), nullable=False),
        sa.Column("events_processed", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("events_applied", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("events_stale", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("dead_letters", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("last_event_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_commit_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lag_messages", sa.BigInteger(), nullable=True),
        sa.Column("freshness_p50_ms", sa.Double(), nullable=True),
        sa.Column("freshness_p99_ms", sa.Double(), nullable=True),
        sa.Column("freshness_samples", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pipeline_status")),
    )
    op.execute("INSERT INTO pipeline_status (id) VALUES (1)")
    op.create_table(
        "pipeline_partitions",
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("next_offset", sa.BigInteger(), nullable=False),
        sa.Column("high_watermark", sa.BigInteger(), nullable=True),
        sa.Column("lag", sa.BigInteger(), nullable=True),
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("topic", "partition", name=op.f("pk_pipeline_partitions")),
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("kafka_offset", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("raw_digest", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
    )
    op.create_index(
        "uq_dead_letters_topic_partition_kafka_offset_raw_digest", "dead_letters",
        ["topic", "partition", "kafka_offset", "raw_digest"], unique=True,
    )


def downgrade() -> None:
    for table in ("dead_letters", "pipeline_partitions", "pipeline_status", "billing_status_counts", "geography",
                  "demographics", "daily_registrations", "patient_facts"):
        op.drop_table(table)
