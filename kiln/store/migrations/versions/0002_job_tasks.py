"""job tasks: per-task status of jobs split into ntasks

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from alembic import op
import sqlalchemy as sa
import kiln.store.models


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('job_tasks',
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('done_units', sa.Integer(), nullable=False),
    sa.Column('requested_units', sa.Integer(), nullable=False),
    sa.Column('updated_at', kiln.store.models.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('job_id', 'task_id')
    )


def downgrade() -> None:
    op.drop_table('job_tasks')
