"""ra_labels keep the facts they were made on, so deleting a batch cannot drop labels from exports

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 07:00:00.000000

The pipeline's DELETE of a batch cascades to its classifications, which the RA app
can neither stop (a trigger on a pipeline table needs the pipeline's ownership, and
schema.sql never names RA tables) nor should: see ra_app.models.Label.
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

COLUMNS = [
    ('audio_id', sa.BigInteger()),
    ('batch_id', sa.Text()),
    ('rel_path', sa.Text()),
    ('duration_s', sa.Float()),
    ('opus_s3_key', sa.Text()),
    ('policy_name', sa.Text()),
    ('policy_version', sa.Integer()),
    ('classifier_model', sa.Text()),
    ('score', sa.REAL()),
    ('threshold', sa.REAL()),
    ('language', sa.Text()),
    ('asr_model', sa.Text()),
]

# Existing labels get the facts the pipeline still holds. Guarded and dynamic because
# the RA tables may be created before the pipeline's (an empty database).
BACKFILL = """
DO $$
BEGIN
    IF to_regclass('classifications') IS NOT NULL AND to_regclass('audio_files') IS NOT NULL
       AND to_regclass('policies') IS NOT NULL AND to_regclass('transcripts') IS NOT NULL THEN
        EXECUTE $sql$
        UPDATE ra_labels l
        SET audio_id = c.audio_id, batch_id = f.batch_id, rel_path = f.rel_path,
            duration_s = f.duration_s, opus_s3_key = f.opus_s3_key, policy_name = p.name,
            policy_version = p.version, classifier_model = c.model, score = c.score,
            threshold = c.threshold, language = t.language, asr_model = t.model
        FROM classifications c
        JOIN audio_files f ON f.id = c.audio_id
        JOIN policies p ON p.id = c.policy_id
        LEFT JOIN transcripts t ON t.audio_id = c.audio_id
        WHERE c.id = l.classification_id
        $sql$;
    END IF;
END
$$
"""


def upgrade():
    for name, type_ in COLUMNS:
        op.add_column('ra_labels', sa.Column(name, type_, nullable=True))
    op.execute(BACKFILL)


def downgrade():
    for name, _ in reversed(COLUMNS):
        op.drop_column('ra_labels', name)
