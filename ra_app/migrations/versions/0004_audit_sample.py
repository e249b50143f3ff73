"""Audit sample and blind review: how an item entered the queue, with what probability,
its threshold (uncertainty order), and whether a label was made blind

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 11:00:00.000000

Every item already in ra_items came from ra_queue (flagged), so the defaults
(entry 'flagged', probability 1) are the truth for them. The threshold is backfilled
from the pipeline's rows where they still exist; guarded and dynamic like 0003's
backfill, because the RA tables may be created before the pipeline's.
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

BACKFILL = """
DO $$
BEGIN
    IF to_regclass('classifications') IS NOT NULL THEN
        EXECUTE $sql$
        UPDATE ra_items i SET threshold = c.threshold
        FROM classifications c WHERE c.id = i.classification_id
        $sql$;
    END IF;
END
$$
"""


def upgrade():
    op.add_column('ra_items', sa.Column('threshold', sa.Float(), nullable=True))
    op.add_column(
        'ra_items',
        sa.Column('entry', sa.Text(), server_default='flagged', nullable=False),
    )
    op.add_column(
        'ra_items',
        sa.Column('sample_probability', sa.Float(), server_default=sa.text('1'), nullable=False),
    )
    op.create_check_constraint('ra_items_entry', 'ra_items', "entry IN ('flagged', 'audit')")
    op.create_check_constraint(
        'ra_items_probability', 'ra_items', 'sample_probability > 0 AND sample_probability <= 1'
    )
    op.execute(BACKFILL)
    op.create_index(
        'ra_items_open_uncertainty_idx',
        'ra_items',
        [sa.literal_column('abs(score - threshold)'), 'classification_id'],
        unique=False,
        postgresql_where=sa.text('open_slots > 0'),
    )
    op.add_column('ra_labels', sa.Column('reviewed_blind', sa.Boolean(), nullable=True))


def downgrade():
    op.drop_column('ra_labels', 'reviewed_blind')
    op.drop_index(
        'ra_items_open_uncertainty_idx',
        table_name='ra_items',
        postgresql_where=sa.text('open_slots > 0'),
    )
    op.drop_constraint('ra_items_probability', 'ra_items', type_='check')
    op.drop_constraint('ra_items_entry', 'ra_items', type_='check')
    op.drop_column('ra_items', 'sample_probability')
    op.drop_column('ra_items', 'entry')
    op.drop_column('ra_items', 'threshold')
