"""ra_users.session_version: a password reset ends the user's sessions

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 06:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade():
    op.add_column(
        'ra_users',
        sa.Column('session_version', sa.Integer(), server_default=sa.text('1'), nullable=False),
    )


def downgrade():
    op.drop_column('ra_users', 'session_version')
