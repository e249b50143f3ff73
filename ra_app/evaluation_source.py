"""The reviewed items the evaluation reads (ra_app.evaluation computes from them).

One item per labelled classification, with the facts its first label kept (the
pipeline's live row for labels from before those copies existed, as in the export),
how it entered the queue and with what probability, and every coder's answer to
the codebook's verdict field.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import text

from ra_app.codebook import Codebook, Verdict
from ra_app.evaluation import GroupEvaluation, GroupKey, ReviewedItem, evaluate
from ra_app.extensions import db

# Where adjudication keeps final labels (migration 0005, ra_app.adjudication): one
# row per decision, the latest per item is the current one.
ADJUDICATION_TABLE = "ra_adjudications"

_LABELS_SQL = """
SELECT l.classification_id,
       coalesce(l.policy_name, p.name) AS policy,
       coalesce(l.policy_version, p.version) AS policy_version,
       coalesce(l.classifier_model, c.model) AS model,
       coalesce(l.score, c.score, i.score::real) AS score,
       coalesce(l.threshold, c.threshold, i.threshold::real) AS threshold,
       i.entry, i.sample_probability,
       l.answer ->> :field AS value
FROM ra_labels l
JOIN ra_items i ON i.classification_id = l.classification_id
LEFT JOIN classifications c ON c.id = l.classification_id
LEFT JOIN policies p ON p.id = c.policy_id
ORDER BY l.classification_id, l.id
"""


# Items in the queue per policy version x model and entry, reviewed or not. Items
# whose classification the pipeline has since deleted are not counted.
_ENTERED_SQL = """
SELECT p.name AS policy, p.version AS policy_version, c.model, i.entry, count(*) AS n
FROM ra_items i
JOIN classifications c ON c.id = i.classification_id
JOIN policies p ON p.id = c.policy_id
GROUP BY p.name, p.version, c.model, i.entry
"""


def entered_counts() -> dict[GroupKey, dict[str, int]]:
    counts: dict[GroupKey, dict[str, int]] = defaultdict(dict)
    for row in db.session.execute(text(_ENTERED_SQL)).mappings():
        key = (row["policy"], int(row["policy_version"]), row["model"])
        counts[key][row["entry"]] = int(row["n"])
    return counts


def adjudicated_values(field: str) -> dict[int, Any]:
    """classification id -> the adjudicated value of the verdict field.

    The current decision (latest row) per item of ``ra_adjudications``. The table is
    checked for first so that a database not yet migrated to 0005 still evaluates
    (every truth is then the coders' majority).
    """
    columns = set(
        db.session.execute(
            text("""SELECT column_name FROM information_schema.columns
                    WHERE table_schema = current_schema() AND table_name = :table"""),
            {"table": ADJUDICATION_TABLE},
        ).scalars()
    )
    if not {"id", "classification_id", "answer"} <= columns:
        return {}
    rows = db.session.execute(
        text(f"""SELECT DISTINCT ON (classification_id) classification_id, answer ->> :field
                 FROM {ADJUDICATION_TABLE} ORDER BY classification_id, id DESC"""),  # noqa: S608 - a constant
        {"field": field},
    ).all()
    return {int(r[0]): r[1] for r in rows}


def reviewed_items(verdict: Verdict) -> list[ReviewedItem]:
    """Every labelled item with its coders' verdict answers, in classification order."""
    answers: dict[int, list[Any]] = defaultdict(list)
    facts: dict[int, Any] = {}
    for row in db.session.execute(text(_LABELS_SQL), {"field": verdict.field}).mappings():
        cid = int(row["classification_id"])
        answers[cid].append(row["value"])
        facts.setdefault(cid, row)
    adjudicated = adjudicated_values(verdict.field)
    items = []
    for cid, row in facts.items():
        if None in (row["policy"], row["model"], row["score"], row["threshold"]):
            continue  # a label from before labels kept facts, on a deleted batch
        items.append(
            ReviewedItem(
                classification_id=cid,
                policy=row["policy"],
                policy_version=int(row["policy_version"]),
                model=row["model"],
                score=float(row["score"]),
                threshold=float(row["threshold"]),
                entry=row["entry"],
                probability=float(row["sample_probability"]),
                answers=tuple(answers[cid]),
                adjudicated=adjudicated.get(cid),
            )
        )
    return items


def evaluate_study(codebook: Codebook, target_precision: float) -> list[GroupEvaluation] | None:
    """The evaluation of every policy version x model; None when the codebook has no verdict."""
    if codebook.verdict is None:
        return None
    verdict = codebook.verdict
    return evaluate(reviewed_items(verdict), verdict, target_precision, entered_counts())
