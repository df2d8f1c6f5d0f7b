"""jobs submitted through another API's routes: jobs.submitted_via and jobs.submitted_request

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('submitted_via', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('submitted_request', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('submitted_request')
        batch_op.drop_column('submitted_via')
