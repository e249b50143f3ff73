"""Admin figures: progress per RA and per batch, agreement, disagreements.

Agreement reads ra_labels only: an adjudication never changes it.

Each is a fixed number of queries whatever the page shows (no N+1), over RA
tables and their indexes; pipeline tables are touched only by primary key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from ra_app import agreement
from ra_app.codebook import Codebook, FieldType
from ra_app.extensions import db


def ra_progress() -> list[Any]:
    return list(
        db.session.execute(
            text("""
            WITH a AS (
                SELECT user_id,
                       count(*) FILTER (WHERE status = 'done') AS done,
                       count(*) FILTER (WHERE status = 'assigned') AS assigned,
                       count(*) FILTER (WHERE status = 'skipped') AS skipped,
                       count(*) FILTER (WHERE status = 'expired') AS expired
                FROM ra_assignments GROUP BY user_id
            ), l AS (
                SELECT user_id, percentile_cont(0.5) WITHIN GROUP (ORDER BY time_on_task_ms)
                           AS median_ms,
                       max(created_at) AS last_label_at
                FROM ra_labels GROUP BY user_id
            )
            SELECT u.id, u.username, u.role, u.active,
                   coalesce(a.done, 0) AS done, coalesce(a.assigned, 0) AS assigned,
                   coalesce(a.skipped, 0) AS skipped, coalesce(a.expired, 0) AS expired,
                   l.median_ms, l.last_label_at
            FROM ra_users u LEFT JOIN a ON a.user_id = u.id LEFT JOIN l ON l.user_id = u.id
            ORDER BY u.username
            """)
        ).all()
    )


def batch_progress(page: int, size: int) -> list[Any]:
    return list(
        db.session.execute(
            text("""
            WITH b AS (
                SELECT batch_id, count(*) AS items, sum(coders_needed) AS slots,
                       -- only what can be handed out: items of switched-off policy
                       -- versions are no longer served
                       coalesce(sum(open_slots) FILTER (WHERE EXISTS (
                           SELECT 1 FROM policies p WHERE p.id = i.policy_id AND p.active
                       )), 0) AS open_slots,
                       count(*) FILTER (WHERE coders_needed = 2) AS double_coded
                FROM ra_items i GROUP BY batch_id ORDER BY batch_id LIMIT :limit OFFSET :offset
            ), a AS (
                SELECT batch_id, count(*) FILTER (WHERE status = 'done') AS done,
                       count(*) FILTER (WHERE status = 'assigned') AS assigned
                FROM ra_assignments WHERE batch_id IN (SELECT batch_id FROM b)
                GROUP BY batch_id
            )
            SELECT b.*, coalesce(a.done, 0) AS done, coalesce(a.assigned, 0) AS assigned
            FROM b LEFT JOIN a USING (batch_id) ORDER BY b.batch_id
            """),
            {"limit": size + 1, "offset": (page - 1) * size},
        ).all()
    )


def _categorical(codebook: Codebook) -> list[str]:
    return [f.id for f in codebook.fields if f.type is not FieldType.TEXT]


def double_coded_rows(
    codebook_version: str, classification_ids: list[int] | None = None
) -> list[agreement.Coding]:
    """Codings of the items with at least two labels under one codebook version
    (optionally only some items). Labels made under another version of the codebook
    answer other questions (options come and go), so they are never compared."""
    only = "" if classification_ids is None else "AND classification_id = ANY(:ids)"
    rows = db.session.execute(
        text(f"""
        SELECT l.classification_id, u.username, l.answer
        FROM ra_labels l JOIN ra_users u ON u.id = l.user_id
        WHERE l.codebook_version = :version AND l.classification_id IN (
            SELECT classification_id FROM ra_labels WHERE codebook_version = :version {only}
            GROUP BY classification_id HAVING count(*) >= 2)
        ORDER BY l.classification_id, u.username
        """),  # noqa: S608 - the only interpolation is the fixed clause above
        {"ids": classification_ids or [], "version": codebook_version},
    ).all()
    return agreement.rows_from_answers((r[0], r[1], r[2]) for r in rows)


def agreement_figures(codebook: Codebook) -> agreement.AgreementReport:
    categorical = set(_categorical(codebook))
    rows = [r for r in double_coded_rows(codebook.version) if r.field in categorical]
    return agreement.agreement_report(rows, codebook)


@dataclass(frozen=True)
class DisagreementPage:
    items: list[dict[str, Any]]  # classification_id, batch_id, fields: [Disagreement]
    has_next: bool


def disagreement_page(codebook: Codebook, page: int, size: int) -> DisagreementPage:
    """Double-coded items whose categorical answers differ, one page at a time.

    SQL finds the items (free-text fields removed from the answers before
    comparing); agreement.disagreements then names the fields, for this page only.
    """
    text_fields = [f.id for f in codebook.fields if f.type is FieldType.TEXT]
    found = db.session.execute(
        text("""
        SELECT l.classification_id, min(a.batch_id) AS batch_id
        FROM ra_labels l JOIN ra_assignments a ON a.id = l.assignment_id
        WHERE l.codebook_version = :version
        GROUP BY l.classification_id
        HAVING count(*) >= 2 AND count(DISTINCT (l.answer - CAST(:text_fields AS text[]))) > 1
        ORDER BY l.classification_id
        LIMIT :limit OFFSET :offset
        """),
        {
            "text_fields": text_fields,
            "version": codebook.version,
            "limit": size + 1,
            "offset": (page - 1) * size,
        },
    ).all()
    ids = [r.classification_id for r in found[:size]]
    by_item: dict[Any, list[agreement.Disagreement]] = {}
    categorical = set(_categorical(codebook))
    rows = (
        [r for r in double_coded_rows(codebook.version, ids) if r.field in categorical]
        if ids
        else []
    )
    for d in agreement.disagreements(rows, codebook):
        by_item.setdefault(d.item_id, []).append(d)
    final = current_adjudications(ids)
    items = [
        {
            "classification_id": r.classification_id,
            "batch_id": r.batch_id,
            "fields": by_item.get(r.classification_id, []),
            "final": final.get(r.classification_id),
        }
        for r in found[:size]
    ]
    return DisagreementPage(items=items, has_next=len(found) > size)


def current_adjudications(classification_ids: list[int]) -> dict[int, Any]:
    """classification id -> its current final label (answer, decided_by, decided_at)."""
    if not classification_ids:
        return {}
    rows = db.session.execute(
        text("""
        SELECT DISTINCT ON (a.classification_id) a.classification_id, a.answer,
               u.username AS decided_by, a.decided_at
        FROM ra_adjudications a JOIN ra_users u ON u.id = a.decided_by
        WHERE a.classification_id = ANY(:ids)
        ORDER BY a.classification_id, a.id DESC
        """),
        {"ids": classification_ids},
    ).all()
    return {r.classification_id: r for r in rows}


def item_labels(classification_id: int) -> list[Any]:
    return list(
        db.session.execute(
            text("""
            SELECT l.id, u.username, l.answer, l.time_on_task_ms, l.created_at,
                   l.codebook_version
            FROM ra_labels l JOIN ra_users u ON u.id = l.user_id
            WHERE l.classification_id = :cid ORDER BY l.id
            """),
            {"cid": classification_id},
        ).all()
    )
