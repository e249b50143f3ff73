"""The assignment queue: who codes which item, handed out atomically.

ra_queue (the pipeline's view) cannot be locked by the ra_app role, which only
reads it, so flagged rows are copied into ra_items, an RA-side table with a
coder-slot counter. A claim locks one open ra_items row with FOR UPDATE SKIP
LOCKED, takes a slot and records the assignment in the same transaction: two
claimers never share a slot, and neither waits on the other.

Whether an item is double-coded, where it falls in a random order and whether an
unflagged item is drawn into the audit sample are derived from
md5(seed, classification_id), so they are stable across syncs and processes and
reproducible from the study's seed.

The queue follows the active policy versions. When a new version supersedes one
(``audio-pipeline policy apply`` switches the old one off, ``audio-pipeline
reclassify`` judges the stored transcripts under the new one), the old version's
items are no longer synced in nor handed out, by "Next item" or by a batch
assignment; their assignments already held and their labels stay as they are.
Switching a version on again serves its items again (a full sync brings in any
flagged while it was off).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from flask import current_app
from sqlalchemy import text

from ra_app.audit_sample import HASH_SPACE, probability_sql
from ra_app.config import QueueOrder
from ra_app.extensions import db
from ra_app.models import Assignment, AssignmentSource, AssignmentStatus, User

# Seconds between incremental syncs of ra_queue, per app process, while claims find
# items; a claim that finds nothing open always syncs first (as it sweeps, below), so
# items flagged since the last sync (a metrics scrape's, say) are never reported as
# "nothing left".
SYNC_INTERVAL = 5.0
# Seconds between sweeps for abandoned assignments on "Next item", per app process
# (each sweep is an UPDATE and a commit); a claim that finds nothing open always
# sweeps first, so a slot freed by expiry is never reported as "nothing left".
EXPIRE_INTERVAL = 5.0
# A view of a queue assignment renews its hold only when the last renewal is at least
# this old (seconds): the page shown right after a claim costs no UPDATE and commit,
# and an RA on the item still holds it for at least the TTL minus this.
TOUCH_MIN_AGE = 60.0
# Classification ids are taken from a sequence, but transactions commit out of
# order: re-read this many ids below the watermark so a late commit is not missed.
SYNC_LOOKBACK_IDS = 1000

# An item is served only while its policy version is active (see the module docstring).
_ACTIVE_VERSION_SQL = "EXISTS (SELECT 1 FROM policies p WHERE p.id = i.policy_id AND p.active)"

_ORDER_SQL = {
    QueueOrder.SCORE: "i.score DESC, i.classification_id",
    QueueOrder.BATCH: "i.batch_id, i.classification_id",
    QueueOrder.RANDOM: "i.shuffle_key, i.classification_id",
    # Nearest the threshold first: where the classifier is least sure, a label
    # teaches the most. Items without a known threshold come last.
    QueueOrder.UNCERTAINTY: "abs(i.score - i.threshold), i.classification_id",
}


class AssignmentError(RuntimeError):
    """The assignment cannot take this action (wrong owner, already done, ...)."""


# Flagged rows come from ra_queue; unflagged rows from classifications, only those
# the audit draw picks (ra_app.audit_sample says how, and why a hash). Both follow the
# active policy versions only: an inactive version takes no new review work.
_SYNC_SQL = """
INSERT INTO ra_items (classification_id, audio_id, batch_id, policy_id, score, threshold,
                      entry, sample_probability, shuffle_key, coders_needed, open_slots)
SELECT s.classification_id, s.audio_id, s.batch_id, s.policy_id, s.score, s.threshold,
       s.entry, s.probability,
       ('x' || substr(md5(:seed || ':order:' || s.classification_id), 1, 15))
           ::bit(60)::bigint AS shuffle_key,
       s.coders, s.coders
FROM (
    SELECT u.*,
           CASE WHEN ('x' || substr(md5(:seed || ':double:' || u.classification_id), 1, 8))
                         ::bit(32)::bigint < :double_below
                THEN 2 ELSE 1 END AS coders
    FROM (
        SELECT q.classification_id, q.audio_id, q.batch_id, q.policy_id, q.score, q.threshold,
               'flagged' AS entry, 1.0::float8 AS probability
        FROM ra_queue q
        JOIN policies p ON p.id = q.policy_id
        WHERE p.active AND q.classification_id > :after
        UNION ALL
        SELECT a.classification_id, a.audio_id, a.batch_id, a.policy_id, a.score, a.threshold,
               'audit' AS entry, a.probability
        FROM (
            SELECT c.id AS classification_id, c.audio_id, f.batch_id, c.policy_id, c.score,
                   c.threshold, CAST({probability} AS float8) AS probability
            FROM classifications c
            JOIN audio_files f ON f.id = c.audio_id
            JOIN policies p ON p.id = c.policy_id
            WHERE c.label = 0 AND p.active AND c.id > :after
        ) a
        WHERE a.probability > 0
          AND ('x' || substr(md5(:seed || ':audit:' || a.classification_id), 1, 8))
                  ::bit(32)::bigint < a.probability * :hash_space
    ) u
) s
ON CONFLICT (classification_id) DO {conflict}
"""
# A full sync refreshes what a re-run may have changed: the score and threshold, and
# an audit item's probability when RA_AUDIT_SHARE was raised. Draws are nested (an
# item drawn at a lower share is drawn at any higher one), so after a full sync at a
# higher share the whole sample is a sample at that share. A lowered share changes
# nothing already drawn: those items were drawn at the old, higher share, and stay.
# How an item entered never changes.
_ON_CONFLICT_FULL = """UPDATE SET score = EXCLUDED.score, threshold = EXCLUDED.threshold,
    sample_probability = CASE WHEN ra_items.entry = EXCLUDED.entry
                              THEN greatest(ra_items.sample_probability,
                                            EXCLUDED.sample_probability)
                              ELSE ra_items.sample_probability END
WHERE (ra_items.score, ra_items.threshold, ra_items.sample_probability)
      IS DISTINCT FROM (EXCLUDED.score, EXCLUDED.threshold, EXCLUDED.sample_probability)"""


def sync_queue(full: bool = False) -> int:
    """Copy new flagged rows from ra_queue, and the audit sample's share of new
    unflagged rows, into ra_items; returns rows written.

    Incremental syncs read only ids above the watermark (an index range scan);
    a full sync re-reads everything and refreshes scores of re-run classifications.
    """
    cfg = current_app.config
    after = 0
    if not full:
        watermark = db.session.execute(
            text("SELECT coalesce(max(classification_id), 0) FROM ra_items")
        ).scalar_one()
        after = max(0, watermark - SYNC_LOOKBACK_IDS)
    conflict = _ON_CONFLICT_FULL if full else "NOTHING"
    probability, band_params = probability_sql("c.score", cfg["RA_AUDIT_BANDS"])
    result = db.session.execute(
        text(_SYNC_SQL.format(conflict=conflict, probability=probability)),
        {
            "seed": cfg["RA_QUEUE_SEED"],
            "double_below": int(cfg["RA_DOUBLE_CODED_SHARE"] * HASH_SPACE),
            "after": after,
            "audit_share": float(cfg["RA_AUDIT_SHARE"]),
            "hash_space": HASH_SPACE,
            **band_params,
        },
    )
    db.session.commit()
    current_app.extensions["ra_last_sync"] = time.monotonic()
    return result.rowcount


def maybe_sync_queue() -> bool:
    """Sync unless one ran within SYNC_INTERVAL; whether it synced."""
    last = current_app.extensions.get("ra_last_sync")
    if last is None or time.monotonic() - last >= SYNC_INTERVAL:
        sync_queue()
        return True
    return False


def expire_abandoned() -> int:
    """Return the slots of abandoned queue assignments to the pool."""
    current_app.extensions["ra_last_expire"] = time.monotonic()
    rows = db.session.execute(
        text("""
        WITH expired AS (
            UPDATE ra_assignments SET status = 'expired'
            WHERE status = 'assigned' AND expires_at < now()
            RETURNING classification_id
        ), counts AS (
            SELECT classification_id, count(*) AS n FROM expired GROUP BY classification_id
        )
        UPDATE ra_items i SET open_slots = i.open_slots + counts.n
        FROM counts WHERE i.classification_id = counts.classification_id
        RETURNING counts.n
        """)
    ).all()
    db.session.commit()
    if rows:
        db.session.expire_all()  # plain SQL changed rows this session may hold
    return sum(r.n for r in rows)


def maybe_expire_abandoned() -> None:
    last = current_app.extensions.get("ra_last_expire")
    if last is None or time.monotonic() - last >= EXPIRE_INTERVAL:
        expire_abandoned()


def _expiry() -> datetime:
    return datetime.now(UTC) + timedelta(seconds=current_app.config["RA_ASSIGNMENT_TTL"])


def current_assignment(user: User) -> Assignment | None:
    """The RA's oldest unfinished assignment (admin-assigned batches first)."""
    return db.session.execute(
        db.select(Assignment)
        .where(Assignment.user_id == user.id, Assignment.status == AssignmentStatus.ASSIGNED)
        .order_by((Assignment.source == AssignmentSource.ADMIN.value).desc(), Assignment.id)
        .limit(1)
    ).scalar_one_or_none()


def claim(user: User) -> Assignment | None:
    """Take one open slot for ``user`` in the study order, or None if none is left.

    One statement: pick and lock an open item, take its slot, record the assignment.
    """
    order = _ORDER_SQL[QueueOrder(current_app.config["RA_QUEUE_ORDER"])]
    claimed = db.session.execute(
        db.select(Assignment).from_statement(
            text(f"""
            WITH picked AS (
                SELECT i.classification_id FROM ra_items i
                WHERE i.open_slots > 0
                  AND {_ACTIVE_VERSION_SQL}
                  AND NOT EXISTS (
                      SELECT 1 FROM ra_assignments a
                      WHERE a.classification_id = i.classification_id AND a.user_id = :uid
                        AND a.status IN ('assigned', 'done', 'skipped'))
                ORDER BY {order}
                LIMIT 1
                FOR UPDATE OF i SKIP LOCKED
            ), taken AS (
                UPDATE ra_items i SET open_slots = i.open_slots - 1
                FROM picked WHERE i.classification_id = picked.classification_id
                RETURNING i.classification_id, i.batch_id
            )
            INSERT INTO ra_assignments
                (classification_id, user_id, batch_id, status, source, expires_at)
            SELECT classification_id, :uid, batch_id, :status, :source, :expires FROM taken
            RETURNING *
            """)  # noqa: S608 - fixed strings above only
        ),
        {
            "uid": user.id,
            "status": AssignmentStatus.ASSIGNED.value,
            "source": AssignmentSource.QUEUE.value,
            "expires": _expiry(),
        },
    ).scalar_one_or_none()
    db.session.commit()
    return claimed


def next_assignment(user: User) -> Assignment | None:
    """What "Next item" gives ``user``: the unfinished one, else a fresh claim."""
    maybe_expire_abandoned()
    current = current_assignment(user)
    if current is not None:
        touch(current)
        return current
    synced = maybe_sync_queue()
    claimed = claim(user)
    if claimed is None:
        # Nothing open: catch up on what arrived and on slots freed by expiry before
        # saying so (both, so neither short-circuits the other).
        arrived = 0 if synced else sync_queue()
        freed = expire_abandoned()
        if arrived or freed:
            claimed = claim(user)
    return claimed


def touch(assignment: Assignment) -> None:
    """Keep a queue assignment alive while the RA is on it."""
    if assignment.source != AssignmentSource.QUEUE.value:
        return
    renewed = _expiry()
    held = assignment.expires_at
    if held is not None and (renewed - held).total_seconds() < TOUCH_MIN_AGE:
        return
    assignment.expires_at = renewed
    db.session.commit()


class SkipResult(StrEnum):
    SKIPPED = "skipped"  # this call skipped it and gave its slot back
    ALREADY_SKIPPED = "already_skipped"  # an earlier call (a double click) skipped it


_SKIP_SQL = """
WITH skipped AS (
    UPDATE ra_assignments SET status = 'skipped', completed_at = now()
    WHERE id = :aid AND user_id = :uid AND status = 'assigned'
    RETURNING classification_id
)
UPDATE ra_items i SET open_slots = i.open_slots + 1
FROM skipped WHERE i.classification_id = skipped.classification_id
RETURNING i.classification_id
"""
# An expired assignment's slot is already back in the pool: marking it skipped only
# records that this RA passed on it, so "Next item" never offers it to them again.
_SKIP_EXPIRED_SQL = """
UPDATE ra_assignments SET status = 'skipped', completed_at = now()
WHERE id = :aid AND user_id = :uid AND status = 'expired'
RETURNING id
"""


def skip(assignment: Assignment, user: User) -> SkipResult:
    """Give the slot back to the pool; this RA will not be offered the item again.

    Every step is conditional on the row's status at the moment it is written, not
    on what this request read earlier: a second Skip (double click), a label or the
    expiry sweep may have changed it since. Under READ COMMITTED a waiting UPDATE
    re-checks its WHERE against the committed row, so of two racers only one frees
    the slot, and a skip never lands on a labelled assignment.

    The caller commits, so its audit row goes in the same transaction as the skip.
    Raises AssignmentError when it is not the user's or was labelled first.
    """
    if assignment.user_id != user.id:
        raise AssignmentError("not your assignment")
    params = {"aid": assignment.id, "uid": user.id}
    freed = db.session.execute(text(_SKIP_SQL), params).first() is not None
    marked = not freed and db.session.execute(text(_SKIP_EXPIRED_SQL), params).first() is not None
    # The ORM copy predates both statements; the refresh reads the row as this
    # transaction sees it: its own update, or what a racer committed first.
    db.session.refresh(assignment)
    if freed or marked:
        return SkipResult.SKIPPED
    status = assignment.status
    if status == AssignmentStatus.SKIPPED.value:
        return SkipResult.ALREADY_SKIPPED
    raise AssignmentError(f"assignment is already {status}; nothing was skipped")


def lock_for_label(assignment_id: int, user: User) -> Assignment:
    """Lock ``user``'s assignment for a label; re-takes the slot if it had expired.

    Raises AssignmentError when it is someone else's, already labelled, skipped,
    or expired and its slot has since gone to another RA.
    """
    assignment = db.session.execute(
        db.select(Assignment)
        .where(Assignment.id == assignment_id)
        .with_for_update(of=Assignment)
        # The locked row, not a copy this session loaded before: sessions do not
        # expire objects on commit (see extensions.py).
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if assignment is None or assignment.user_id != user.id:
        raise AssignmentError("no such assignment of yours")
    if assignment.status == AssignmentStatus.EXPIRED.value:
        retaken = db.session.execute(
            text("""UPDATE ra_items SET open_slots = open_slots - 1
                    WHERE classification_id = :cid AND open_slots > 0"""),
            {"cid": assignment.classification_id},
        ).rowcount
        if not retaken:
            db.session.rollback()
            raise AssignmentError("this assignment expired and the item went to another RA")
        assignment.status = AssignmentStatus.ASSIGNED.value
    if assignment.status != AssignmentStatus.ASSIGNED.value:
        db.session.rollback()
        raise AssignmentError(f"assignment is already {assignment.status}")
    return assignment


def assign_batch(batch_id: str, user: User) -> int:
    """Give ``user`` one open slot of every item of ``batch_id`` not yet theirs."""
    maybe_sync_queue()
    result = db.session.execute(
        text(f"""
        WITH picked AS (
            SELECT i.classification_id FROM ra_items i
            WHERE i.batch_id = :batch AND i.open_slots > 0
              AND {_ACTIVE_VERSION_SQL}
              AND NOT EXISTS (
                  SELECT 1 FROM ra_assignments a
                  WHERE a.classification_id = i.classification_id AND a.user_id = :uid
                    AND a.status IN ('assigned', 'done'))
            FOR UPDATE OF i SKIP LOCKED
        ), taken AS (
            UPDATE ra_items i SET open_slots = i.open_slots - 1
            FROM picked WHERE i.classification_id = picked.classification_id
            RETURNING i.classification_id, i.batch_id
        )
        INSERT INTO ra_assignments (classification_id, user_id, batch_id, status, source)
        SELECT classification_id, :uid, batch_id, 'assigned', 'admin' FROM taken
        """),  # noqa: S608 - a fixed string above only
        {"batch": batch_id, "uid": user.id},
    )
    db.session.commit()
    return result.rowcount


@dataclass(frozen=True)
class QueueCounts:
    items: int
    open_slots: int  # slots that can still be handed out (active policy versions)
    assigned: int
    done: int
    superseded_open_slots: int = 0  # open slots of switched-off versions: not served


def queue_counts() -> QueueCounts:
    row: Any = db.session.execute(
        text(f"""
        SELECT (SELECT count(*) FROM ra_items) AS items,
               (SELECT coalesce(sum(open_slots), 0) FROM ra_items i
                 WHERE {_ACTIVE_VERSION_SQL}) AS open_slots,
               (SELECT coalesce(sum(open_slots), 0) FROM ra_items i
                 WHERE NOT {_ACTIVE_VERSION_SQL}) AS superseded,
               (SELECT count(*) FROM ra_assignments WHERE status = 'assigned') AS assigned,
               (SELECT count(*) FROM ra_assignments WHERE status = 'done') AS done
        """)  # noqa: S608 - a fixed string above only
    ).one()
    return QueueCounts(
        int(row.items),
        int(row.open_slots),
        int(row.assigned),
        int(row.done),
        int(row.superseded),
    )
