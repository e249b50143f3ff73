"""Adjudication: an admin's final label for an item, with a note, who and when

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 14:40:00.000000

One row per decision, never updated: a later decision on the same item is a new
row and becomes the current one (the highest id per classification_id). A review
board sees who decided what, when and why, including a decision that was reversed,
and ra_app.evaluation_source reads the current one as the item's truth.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "ra_adjudications",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("classification_id", sa.BigInteger(), nullable=False),
        sa.Column("answer", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("codebook_version", sa.Text(), nullable=True),
        sa.Column("decided_by", sa.Integer(), nullable=False),
        sa.Column(
            "decided_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("btrim(note) <> ''", name="ra_adjudications_note_check"),
        sa.ForeignKeyConstraint(["classification_id"], ["ra_items.classification_id"]),
        sa.ForeignKeyConstraint(["decided_by"], ["ra_users.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ra_adjudications_item_idx",
        "ra_adjudications",
        ["classification_id", sa.literal_column("id DESC")],
        unique=False,
    )


def downgrade():
    op.drop_index("ra_adjudications_item_idx", table_name="ra_adjudications")
    op.drop_table("ra_adjudications")
