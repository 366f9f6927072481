"""outbox insert trigger: NOTIFY the relay on commit

Revision ID: 0002_outbox_notify
Revises: 0001
Create Date: 2026-11-26

The outbox relay LISTENs on channel ``patient_outbox`` and wakes when a transaction that
inserted outbox rows commits, instead of waiting for its next poll. The trigger is
statement-level and the payload empty: PostgreSQL delivers notifications at commit and
folds identical ones of a transaction into one, so a bulk COPY of 10,000 events costs one
notification, and a rolled-back change sends none. The channel name is
``api.patient.relay.NOTIFY_CHANNEL``; a missed notification only costs one poll interval.
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0002_outbox_notify'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("""
        CREATE FUNCTION patient_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('patient_outbox', '');
            RETURN NULL;
        END
        $$
    """)
    op.execute("""
        CREATE TRIGGER patient_outbox_notify AFTER INSERT ON patient_outbox
        FOR EACH STATEMENT EXECUTE FUNCTION patient_outbox_notify()
    """)


def downgrade() -> None:
    op.execute("DROP TRIGGER patient_outbox_notify ON patient_outbox")
    op.execute("DROP FUNCTION patient_outbox_notify()")
