"""The RA app's own tables (ra_*). Pipeline tables are only read, in pipeline.py.

No foreign key points at a pipeline table: the ra_app role holds SELECT, not
REFERENCES, on them, and the pipeline must stay free to re-create its rows
without RA tables in the way. RA rows carry the pipeline's ids (classification_id,
audio_id, batch_id) as plain values; ra_items is the RA-side copy of the queue
that claims lock, since the view ra_queue cannot be locked by a reader.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from flask_login import UserMixin
from sqlalchemy import (
    REAL,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from ra_app.audit_sample import Entry
from ra_app.extensions import db


class Role(StrEnum):
    RA = "ra"
    ADMIN = "admin"


class AssignmentStatus(StrEnum):
    ASSIGNED = "assigned"  # handed out, not finished
    DONE = "done"  # a label was submitted
    SKIPPED = "skipped"  # the RA passed; the slot went back to the pool
    EXPIRED = "expired"  # abandoned past its TTL; the slot went back to the pool


class AssignmentSource(StrEnum):
    QUEUE = "queue"  # claimed with "Next item"; expires when abandoned
    ADMIN = "admin"  # an admin assigned the batch to this RA; never expires


# Statuses that hold a coder slot of an item.
HOLDING = (AssignmentStatus.ASSIGNED.value, AssignmentStatus.DONE.value)


def _utcnow() -> Any:
    return func.now()


class User(UserMixin, db.Model):
    __tablename__ = "ra_users"
    __table_args__ = (
        CheckConstraint("role IN ('ra', 'admin')", name="ra_users_role_check"),
        CheckConstraint("username ~ '^[a-z0-9][a-z0-9._-]{1,63}$'", name="ra_users_name_check"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(Text, unique=True, nullable=False)
    password_hash: Mapped[str] = mapped_column(Text, nullable=False)
    role: Mapped[str] = mapped_column(Text, nullable=False, default=Role.RA.value)
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=_utcnow()
    )
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Bumped by a password reset. A login session stores it with the user id (see
    # get_id) and the user loader refuses a session whose number is old, so a reset
    # ends every existing session of the user on its next request, wherever it is,
    # without a server-side session store.
    session_version: Mapped[int] = mapped_column(
        Integer, nullable=False, default=1, server_default=text("1")
    )

    @property
    def is_active(self) -> bool:  # Flask-Login refuses inactive users
        return self.active

    def get_id(self) -> str:
        return f"{self.id}:{self.session_version}"

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN.value


class Item(db.Model):
    """One classification as the RA queue sees it: a flagged one (synced from ra_queue)
    or an unflagged one drawn into the audit sample (ra_app.audit_sample)."""

    __tablename__ = "ra_items"
    __table_args__ = (
        CheckConstraint("open_slots >= 0 AND open_slots <= coders_needed", name="ra_items_slots"),
        CheckConstraint("coders_needed IN (1, 2)", name="ra_items_coders_needed"),
        CheckConstraint("entry IN ('flagged', 'audit')", name="ra_items_entry"),
        CheckConstraint(
            "sample_probability > 0 AND sample_probability <= 1", name="ra_items_probability"
        ),
        # One partial index per study order: a claim walks the first open row.
        Index(
            "ra_items_open_score_idx",
            text("score DESC"),
            "classification_id",
            postgresql_where=text("open_slots > 0"),
        ),
        Index(
            "ra_items_open_batch_idx",
            "batch_id",
            "classification_id",
            postgresql_where=text("open_slots > 0"),
        ),
        Index(
            "ra_items_open_random_idx",
            "shuffle_key",
            "classification_id",
            postgresql_where=text("open_slots > 0"),
        ),
        Index(
            "ra_items_open_uncertainty_idx",
            text("abs(score - threshold)"),
            "classification_id",
            postgresql_where=text("open_slots > 0"),
        ),
        Index("ra_items_batch_idx", "batch_id"),
    )

    classification_id: Mapped[int] = mapped_column(
        BigInteger, primary_key=True, autoincrement=False
    )
    audio_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    batch_id: Mapped[str] = mapped_column(Text, nullable=False)
    policy_id: Mapped[int] = mapped_column(Integer, nullable=False)
    score: Mapped[float] = mapped_column(Float, nullable=False)
    # The classifier's threshold for this verdict (NULL on rows synced before it was
    # kept and whose classification has since gone); the uncertainty order reads it.
    threshold: Mapped[float | None] = mapped_column(Float)
    entry: Mapped[str] = mapped_column(
        Text, nullable=False, default=Entry.FLAGGED.value, server_default=Entry.FLAGGED.value
    )
    # The probability with which the item was drawn into the queue: 1 for flagged
    # items, the audit share of its score band for audit items. Estimates weight each
    # reviewed item by its inverse (ra_app.evaluation).
    sample_probability: Mapped[float] = mapped_column(
        Float, nullable=False, default=1.0, server_default=text("1")
    )
    shuffle_key: Mapped[int] = mapped_column(BigInteger, nullable=False)
    coders_needed: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    open_slots: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    synced_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=_utcnow()
    )


class Assignment(db.Model):
    __tablename__ = "ra_assignments"
    __table_args__ = (
        CheckConstraint(
            "status IN ('assigned', 'done', 'skipped', 'expired')", name="ra_assignments_status"
        ),
        CheckConstraint("source IN ('queue', 'admin')", name="ra_assignments_source"),
        # An RA holds at most one live or finished slot of an item, so a
        # double-coded item always gets two different coders.
        Index(
            "ra_assignments_one_per_coder",
            "classification_id",
            "user_id",
            unique=True,
            postgresql_where=text("status IN ('assigned', 'done')"),
        ),
        Index("ra_assignments_user_status_idx", "user_id", "status", "id"),
        Index(
            "ra_assignments_expiry_idx", "expires_at", postgresql_where=text("status = 'assigned'")
        ),
        Index("ra_assignments_item_idx", "classification_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    classification_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("ra_items.classification_id"), nullable=False
    )
    user_id: Mapped[int] = mapped_column(Integer, ForeignKey("ra_users.id"), nullable=False)
    batch_id: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(
        Text, nullable=False, default=AssignmentStatus.ASSIGNED.value
    )
    source: Mapped[str] = mapped_column(Text, nullable=False, default=AssignmentSource.QUEUE.value)
    assigned_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=_utcnow()
    )
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    user: Mapped[User] = relationship(lazy="joined")


class Label(db.Model):
    """One coder's answer on one assignment, with the facts it was made on.

    Why the copy of the pipeline's facts (audio_id ... asr_model): deleting a batch
    cascades in the pipeline's tables down to its classifications, and the ra_app
    role can neither stop that (a trigger on a pipeline table needs its owner, and
    schema.sql never names RA tables) nor should it: the pipeline stays free to
    delete and re-create its rows. So a label keeps, from the moment it was made,
    what the export needs to stand on its own; the export reads these first and
    the pipeline's live rows only for older labels. The transcript text is not
    copied: deleting a batch is how its content leaves the database.
    """

    __tablename__ = "ra_labels"
    __table_args__ = (
        CheckConstraint("time_on_task_ms >= 0", name="ra_labels_time_check"),
        Index("ra_labels_item_idx", "classification_id"),
        Index("ra_labels_user_idx", "user_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("ra_assignments.id"), unique=True, nullable=False
    )
    classification_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    user_id: Mapped[int] = mapped_column(Integer, ForeignKey("ra_users.id"), nullable=False)
    answer: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    time_on_task_ms: Mapped[int] = mapped_column(Integer, nullable=False)
    codebook_version: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=_utcnow()
    )
    # The pipeline's facts at labelling time (NULL where the pipeline had none).
    audio_id: Mapped[int | None] = mapped_column(BigInteger)
    batch_id: Mapped[str | None] = mapped_column(Text)
    rel_path: Mapped[str | None] = mapped_column(Text)
    duration_s: Mapped[float | None] = mapped_column(Float)
    opus_s3_key: Mapped[str | None] = mapped_column(Text)
    policy_name: Mapped[str | None] = mapped_column(Text)
    policy_version: Mapped[int | None] = mapped_column(Integer)
    classifier_model: Mapped[str | None] = mapped_column(Text)
    # REAL like the pipeline's columns, so a copied score prints as the original does.
    score: Mapped[float | None] = mapped_column(REAL)
    threshold: Mapped[float | None] = mapped_column(REAL)
    language: Mapped[str | None] = mapped_column(Text)
    asr_model: Mapped[str | None] = mapped_column(Text)
    # Whether the coder saw the item blind (no score, flag or evidence; RA_BLIND).
    # NULL on labels made before blind review existed (nothing was hidden then).
    reviewed_blind: Mapped[bool | None] = mapped_column(Boolean)


class ApiToken(db.Model):
    """A bearer token for scripts; only its SHA-256 is stored."""

    __tablename__ = "ra_api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(Integer, ForeignKey("ra_users.id"), nullable=False)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    token_hash: Mapped[str] = mapped_column(Text, unique=True, nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=_utcnow()
    )
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    user: Mapped[User] = relationship(lazy="joined")


class Adjudication(db.Model):
    """An admin's final label for an item (ra_app.adjudication).

    Rows are never updated: a later decision is a new row, and the item's current
    final label is its row with the highest id, so the history stays for a review
    board. Agreement is never computed from these (they are not a coder's answer).
    """

    __tablename__ = "ra_adjudications"
    __table_args__ = (
        CheckConstraint("btrim(note) <> ''", name="ra_adjudications_note_check"),
        Index("ra_adjudications_item_idx", "classification_id", text("id DESC")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    classification_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("ra_items.classification_id"), nullable=False
    )
    answer: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    note: Mapped[str] = mapped_column(Text, nullable=False)
    codebook_version: Mapped[str | None] = mapped_column(Text)
    decided_by: Mapped[int] = mapped_column(Integer, ForeignKey("ra_users.id"), nullable=False)
    decided_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=_utcnow()
    )

    decider: Mapped[User] = relationship(lazy="joined")
