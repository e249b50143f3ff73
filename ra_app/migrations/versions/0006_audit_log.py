"""Append-only audit log for the review board: who did what, when, from where

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 15:00:00.000000

Append-only twice over, because the role that runs migrations (the app's own role,
ra_app) owns the table and an owner can grant itself back any privilege it lost:

- UPDATE, DELETE and TRUNCATE are revoked from everyone, the owner included;
- triggers refuse UPDATE, DELETE and TRUNCATE whatever the privileges, and stamp
  every new row with the database's clock, so a row cannot be back-dated either.

An owner can still drop or disable a trigger (DDL). That is what separating the
owner from the app's login role closes: see ra_app.audit_log for the grants.

Old rows leave only through ra_audit_log_prune(keep_days, actor), a SECURITY DEFINER
function, whose EXECUTE is revoked from PUBLIC. Inside one transaction it disables
the guard (which locks the table against writers), grants its owner DELETE, deletes the rows older
than keep_days, takes both back and records the prune as a row of its own; no other
session ever sees the guard off (catalog changes are visible only on commit, and
writers wait on the lock).
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

GUARD = """
CREATE FUNCTION ra_audit_log_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ra_audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE FUNCTION ra_audit_log_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER ra_audit_log_append_only BEFORE UPDATE OR DELETE ON ra_audit_log
    FOR EACH ROW EXECUTE FUNCTION ra_audit_log_refuse();
CREATE TRIGGER ra_audit_log_no_truncate BEFORE TRUNCATE ON ra_audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION ra_audit_log_refuse();
CREATE TRIGGER ra_audit_log_stamp BEFORE INSERT ON ra_audit_log
    FOR EACH ROW EXECUTE FUNCTION ra_audit_log_stamp();

REVOKE UPDATE, DELETE, TRUNCATE ON ra_audit_log FROM PUBLIC;
REVOKE UPDATE, DELETE, TRUNCATE ON ra_audit_log FROM CURRENT_USER;

CREATE FUNCTION ra_audit_log_prune(keep_days integer, actor text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    owner_role text := current_user;  -- the function's owner, as SECURITY DEFINER
    deleted bigint;
BEGIN
    IF keep_days IS NULL OR keep_days < 1 THEN
        RAISE EXCEPTION 'keep_days must be at least 1 (got %)', keep_days;
    END IF;
    -- Takes a SHARE ROW EXCLUSIVE lock until commit: writers wait meanwhile.
    ALTER TABLE ra_audit_log DISABLE TRIGGER ra_audit_log_append_only;
    EXECUTE format('GRANT DELETE ON ra_audit_log TO %I', owner_role);
    DELETE FROM ra_audit_log WHERE at < now() - make_interval(days => keep_days);
    GET DIAGNOSTICS deleted = ROW_COUNT;
    EXECUTE format('REVOKE DELETE ON ra_audit_log FROM %I', owner_role);
    ALTER TABLE ra_audit_log ENABLE TRIGGER ra_audit_log_append_only;
    INSERT INTO ra_audit_log (actor_username, action, details)
    VALUES (actor, 'audit_log.prune',
            jsonb_build_object('keep_days', keep_days, 'deleted', deleted,
                               'database_role', session_user));
    RETURN deleted;
END
$$;
REVOKE EXECUTE ON FUNCTION ra_audit_log_prune(integer, text) FROM PUBLIC;
"""

UNGUARD = """
DROP FUNCTION IF EXISTS ra_audit_log_prune(integer, text);
DROP TRIGGER IF EXISTS ra_audit_log_stamp ON ra_audit_log;
DROP TRIGGER IF EXISTS ra_audit_log_no_truncate ON ra_audit_log;
DROP TRIGGER IF EXISTS ra_audit_log_append_only ON ra_audit_log;
DROP FUNCTION IF EXISTS ra_audit_log_stamp();
DROP FUNCTION IF EXISTS ra_audit_log_refuse();
"""


def upgrade():
    op.create_table(
        "ra_audit_log",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("actor_id", sa.Integer(), nullable=True),
        sa.Column("actor_username", sa.Text(), nullable=True),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("classification_id", sa.BigInteger(), nullable=True),
        sa.Column("target", sa.Text(), nullable=True),
        sa.Column("details", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("client_addr", sa.Text(), nullable=True),
        sa.Column("session_hash", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["actor_id"], ["ra_users.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ra_audit_log_at_idx", "ra_audit_log", ["at"])
    op.create_index("ra_audit_log_actor_idx", "ra_audit_log", ["actor_username", "id"])
    op.create_index("ra_audit_log_action_idx", "ra_audit_log", ["action", "id"])
    op.create_index(
        "ra_audit_log_item_idx",
        "ra_audit_log",
        ["classification_id", "id"],
        postgresql_where=sa.text("classification_id IS NOT NULL"),
    )
    # One play per item per session, however many Range requests the player sends.
    op.create_index(
        "ra_audit_log_one_play",
        "ra_audit_log",
        ["session_hash", "classification_id"],
        unique=True,
        postgresql_where=sa.text("action = 'audio.play'"),
    )
    op.execute(GUARD)


def downgrade():
    op.execute(UNGUARD)
    op.drop_table("ra_audit_log")
