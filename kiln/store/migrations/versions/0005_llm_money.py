"""LLM budgets and usage: projects' USD budget, spend and holds; jobs' holds and submitting key; keys' LLM rate
limits; llm_usage

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

import kiln.store.models

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('llm_usage',
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.String(length=36), nullable=False),
    sa.Column('key_prefix', sa.String(length=16), nullable=True),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('provider', sa.String(length=200), nullable=True),
    sa.Column('input_tokens', sa.Integer(), nullable=False),
    sa.Column('output_tokens', sa.Integer(), nullable=False),
    sa.Column('cache_read_tokens', sa.Integer(), nullable=False),
    sa.Column('cache_write_tokens', sa.Integer(), nullable=False),
    sa.Column('cost_usd', sa.Float(), nullable=False),
    sa.Column('failed', sa.Boolean(), nullable=False),
    sa.Column('at', kiln.store.models.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('job_id')
    )
    op.create_index('ix_llm_usage_project_at', 'llm_usage', ['project_id', 'at'], unique=False)
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.add_column(sa.Column('llm_budget_usd', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('llm_spent_usd', sa.Float(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('llm_held_usd', sa.Float(), nullable=False, server_default='0'))
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('llm_calls_per_minute', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('llm_tokens_per_minute', sa.Integer(), nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('held_usd', sa.Float(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('key_prefix', sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('key_prefix')
        batch_op.drop_column('held_usd')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('llm_tokens_per_minute')
        batch_op.drop_column('llm_calls_per_minute')
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.drop_column('llm_held_usd')
        batch_op.drop_column('llm_spent_usd')
        batch_op.drop_column('llm_budget_usd')
    op.drop_index('ix_llm_usage_project_at', table_name='llm_usage')
    op.drop_table('llm_usage')
