"""patients, outbox, audit, relay state

Revision ID: 0001
Revises:
Create Date: 2026-11-26

MRNs come from patient_mrn_seq (unique, never reused); trigram GIN indexes back search;
the partial unique index on lower(email) enforces one active patient per email.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(sa.schema.CreateSequence(sa.Sequence('patient_mrn_seq', start=100001)))
    op.create_table('patient_audit',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('patient_id', sa.UUID(), nullable=False),
    sa.Column('actor', sa.String(length=254), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('fields', postgresql.ARRAY(sa.Text()), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('request_id', sa.String(length=64), nullable=True),
    sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_patient_audit'))
    )
    op.create_index(op.f('ix_patient_audit_patient_id'), 'patient_audit', ['patient_id'], unique=False)
    op.create_table('patient_outbox',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('event_id', sa.UUID(), nullable=False),
    sa.Column('patient_id', sa.UUID(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('event_type', sa.String(length=32), nullable=False),
    sa.Column('payload', sa.LargeBinary(), nullable=False),
    sa.Column('occurred_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_patient_outbox')),
    sa.UniqueConstraint('event_id', name=op.f('uq_patient_outbox_event_id'))
    )
    op.create_index('ix_patient_outbox_occurred_at', 'patient_outbox', ['occurred_at'], unique=False)
    op.create_index('ix_patient_outbox_patient_id_version', 'patient_outbox', ['patient_id', 'version'], unique=True)
    op.create_index('ix_patient_outbox_unsent', 'patient_outbox', ['id'], unique=False, postgresql_where=sa.text('sent_at IS NULL'))
    op.create_table('patient_relay_state',
    sa.Column('topic', sa.String(length=249), nullable=False),
    sa.Column('partition', sa.Integer(), nullable=False),
    sa.Column('high_watermark', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('topic', 'partition', name=op.f('pk_patient_relay_state'))
    )
    op.create_table('patient_service_flags',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('set_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_patient_service_flags'))
    )
    op.create_table('patients',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('mrn', sa.String(length=20), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('email', sa.String(length=254), nullable=False),
    sa.Column('address', sa.String(length=255), nullable=False),
    sa.Column('city', sa.String(length=100), nullable=True),
    sa.Column('gender', sa.String(length=10), nullable=True),
    sa.Column('phone', sa.String(length=20), nullable=True),
    sa.Column('date_of_birth', sa.Date(), nullable=False),
    sa.Column('registered_date', sa.Date(), nullable=False),
    sa.Column('billing_account_id', sa.String(length=64), nullable=True),
    sa.Column('billing_status', sa.String(length=16), server_default='PENDING', nullable=False),
    sa.Column('billing_attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('billing_next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('version', sa.Integer(), server_default='1', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("billing_status <> 'PENDING' OR billing_next_attempt_at IS NOT NULL",
                       name=op.f('ck_patients_pending_has_due_time')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_patients')),
    sa.UniqueConstraint('mrn', name=op.f('uq_patients_mrn'))
    )
    op.create_index('ix_patients_active_order', 'patients', ['created_at', 'id'], unique=False, postgresql_where=sa.text('deleted_at IS NULL'))
    op.create_index('ix_patients_billing_pending', 'patients', ['billing_next_attempt_at'], unique=False, postgresql_where=sa.text("billing_status = 'PENDING' AND deleted_at IS NULL"))
    op.create_index('ix_patients_date_of_birth', 'patients', ['date_of_birth'], unique=False)
    op.create_index('ix_patients_email_active', 'patients', [sa.literal_column('lower(email)')], unique=True, postgresql_where=sa.text('deleted_at IS NULL'))
    op.create_index('ix_patients_email_trgm', 'patients', ['email'], unique=False, postgresql_using='gin', postgresql_ops={'email': 'gin_trgm_ops'})
    op.create_index('ix_patients_name_trgm', 'patients', ['name'], unique=False, postgresql_using='gin', postgresql_ops={'name': 'gin_trgm_ops'})
    op.create_index('ix_patients_phone', 'patients', ['phone'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_patients_phone', table_name='patients')
    op.drop_index('ix_patients_name_trgm', table_name='patients', postgresql_using='gin', postgresql_ops={'name': 'gin_trgm_ops'})
    op.drop_index('ix_patients_email_trgm', table_name='patients', postgresql_using='gin', postgresql_ops={'email': 'gin_trgm_ops'})
    op.drop_index('ix_patients_email_active', table_name='patients', postgresql_where=sa.text('deleted_at IS NULL'))
    op.drop_index('ix_patients_date_of_birth', table_name='patients')
    op.drop_index('ix_patients_billing_pending', table_name='patients', postgresql_where=sa.text("billing_status = 'PENDING' AND deleted_at IS NULL"))
    op.drop_index('ix_patients_active_order', table_name='patients', postgresql_where=sa.text('deleted_at IS NULL'))
    op.drop_table('patients')
    op.drop_table('patient_service_flags')
    op.drop_table('patient_relay_state')
    op.drop_index('ix_patient_outbox_unsent', table_name='patient_outbox', postgresql_where=sa.text('sent_at IS NULL'))
    op.drop_index('ix_patient_outbox_patient_id_version', table_name='patient_outbox')
    op.drop_index('ix_patient_outbox_occurred_at', table_name='patient_outbox')
    op.drop_table('patient_outbox')
    op.drop_index(op.f('ix_patient_audit_patient_id'), table_name='patient_audit')
    op.drop_table('patient_audit')
    op.execute(sa.schema.DropSequence(sa.Sequence('patient_mrn_seq')))
