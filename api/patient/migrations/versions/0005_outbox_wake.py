"""drop the outbox NOTIFY trigger: the writing process wakes its relay after the commit

Revision ID: 0005_outbox_wake
Revises: 0004_active_count
Create Date: 2026-11-26

A ``pg_notify`` inside the writing transaction (migration ``0002_outbox_notify``) makes
PostgreSQL serialize the commits of every notifying transaction behind one lock held through
the WAL flush, so creates could not share a flush (group commit). The relay is now woken in
process (``api.patient.outbox_wake``); see ``api.patient.relay`` for how a relay that does not
lead passes the wake-up on.
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0005_outbox_wake'
down_revision: str | None = '0004_active_count'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS patient_outbox_notify ON patient_outbox")
    op.execute("DROP FUNCTION IF EXISTS patient_outbox_notify()")


def downgrade() -> None:
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
