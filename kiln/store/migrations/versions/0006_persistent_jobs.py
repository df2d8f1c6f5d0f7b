"""Persistent jobs: jobs.persistent, and the service slots a worker hosts them in

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('persistent', sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('service_slots', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('service_slots')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('persistent')
