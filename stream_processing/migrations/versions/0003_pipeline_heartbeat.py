"""pipeline status: the heartbeat of a running pipeline

``pipeline_status.heartbeat_at`` is stamped every ``PMS_PIPELINE__HEARTBEAT_S`` by each pipeline
process that is consuming (its loop turns, it holds partitions, the broker is up), also while no
event arrives, with that interval in ``heartbeat_interval_s`` so readers judge the beat by the
writer's own setting. Every other column only moves when a batch is written, so without it a
pipeline that died left its last figures (lag 0 included) looking current.

Revision ID: 0003_pipeline_heartbeat
Revises: 0002_dead_letter_privacy
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_pipeline_heartbeat"
down_revision: str | None = "0002_dead_letter_privacy"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("pipeline_status", sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("pipeline_status", sa.Column("heartbeat_interval_s", sa.Double(), nullable=True))


def downgrade() -> None:
    op.drop_column("pipeline_status", "heartbeat_interval_s")
    op.drop_column("pipeline_status", "heartbeat_at")
