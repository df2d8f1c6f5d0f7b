"""batch runs: jobs.in_parent_run (subflow children apart from released ones), jobs.estimated_core_hours

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('in_parent_run', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('estimated_core_hours', sa.Float(), nullable=False, server_default='0'))
    # until now every child was a subflow of its parent
    op.execute("UPDATE jobs SET in_parent_run = (parent_id IS NOT NULL)")


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('estimated_core_hours')
        batch_op.drop_column('in_parent_run')
