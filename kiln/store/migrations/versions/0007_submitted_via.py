"""jobs submitted through another API's routes: jobs.submitted_via and jobs.submitted_request

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
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
