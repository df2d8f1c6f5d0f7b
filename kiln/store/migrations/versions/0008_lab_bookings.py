"""lab bookings: suspended jobs (jobs.suspended_at, jobs.suspended_seconds), lab_bookings, lab_callbacks, lab_refusals

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

from kiln.store.models import UTCDateTime

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('suspended_at', UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('suspended_seconds', sa.Float(), nullable=False, server_default='0'))
    op.create_table(
        'lab_bookings',
        sa.Column('job_id', sa.String(length=36), primary_key=True),
        sa.Column('lab', sa.String(length=63), nullable=False),
        sa.Column('booking_id', sa.String(length=200), nullable=False),
        sa.Column('resource', sa.String(length=200), nullable=False),
        sa.Column('slot_start', UTCDateTime(timezone=True), nullable=False),
        sa.Column('slot_end', UTCDateTime(timezone=True), nullable=False),
        sa.Column('deadline', UTCDateTime(timezone=True), nullable=False),
        sa.Column('last_sequence', sa.Integer(), nullable=False, server_default='0'),
        sa.Column('last_said', sa.Text(), nullable=True),
        sa.Column('last_said_at', UTCDateTime(timezone=True), nullable=True),
        sa.Column('outcome_status', sa.String(length=16), nullable=True),
        sa.Column('outcome', sa.JSON(), nullable=True),
        sa.Column('outcome_at', UTCDateTime(timezone=True), nullable=True),
        sa.Column('delivered_run', sa.String(length=36), nullable=True),
        sa.Column('next_poll_at', UTCDateTime(timezone=True), nullable=True),
        sa.Column('polls', sa.Integer(), nullable=False, server_default='0'),
        sa.Column('created_at', UTCDateTime(timezone=True), nullable=False),
        sa.UniqueConstraint('lab', 'booking_id', name='uq_lab_bookings_lab_booking'),
    )
    op.create_index('ix_lab_bookings_next_poll_at', 'lab_bookings', ['next_poll_at'])
    op.create_table(
        'lab_callbacks',
        sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column('lab', sa.String(length=63), nullable=False),
        sa.Column('webhook_id', sa.String(length=200), nullable=False),
        sa.Column('booking_id', sa.String(length=200), nullable=False),
        sa.Column('sequence', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('body', sa.JSON(), nullable=False),
        sa.Column('effect', sa.String(length=200), nullable=True),
        sa.Column('received_at', UTCDateTime(timezone=True), nullable=False),
        sa.UniqueConstraint('lab', 'webhook_id', name='uq_lab_callbacks_webhook_id'),
        sa.UniqueConstraint('lab', 'booking_id', 'sequence', name='uq_lab_callbacks_booking_sequence'),
    )
    op.create_table(
        'lab_refusals',
        sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column('lab', sa.String(length=63), nullable=False),
        sa.Column('webhook_id', sa.String(length=200), nullable=True),
        sa.Column('reason', sa.String(length=32), nullable=False),
        sa.Column('message', sa.Text(), nullable=False),
        sa.Column('client', sa.String(length=200), nullable=True),
        sa.Column('body_sha256', sa.String(length=64), nullable=False),
        sa.Column('body_bytes', sa.Integer(), nullable=False),
        sa.Column('received_at', UTCDateTime(timezone=True), nullable=False),
    )
    op.create_index('ix_lab_refusals_lab_id', 'lab_refusals', ['lab', 'id'])


def downgrade() -> None:
    op.drop_index('ix_lab_refusals_lab_id', table_name='lab_refusals')
    op.drop_table('lab_refusals')
    op.drop_table('lab_callbacks')
    op.drop_index('ix_lab_bookings_next_poll_at', table_name='lab_bookings')
    op.drop_table('lab_bookings')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('suspended_seconds')
        batch_op.drop_column('suspended_at')
