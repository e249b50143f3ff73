"""Adjudication: an admin records an item's final label, with a note saying why.

The answer is validated against the codebook exactly as a coder's label is, so a
final label always answers the study's questions. Decisions are kept as history
(ra_app.models.Adjudication): the current one is the latest. The evaluation takes
the current verdict as the item's truth; agreement never sees adjudications.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ra_app import audit_log
from ra_app.audit_log import Action
from ra_app.codebook import AnswerError
from ra_app.codebook_support import get_codebook
from ra_app.extensions import db
from ra_app.models import Adjudication, Item, User

NOTE_MAX_CHARS = 5000  # a paragraph or two of reasoning


class AdjudicationError(RuntimeError):
    """The decision cannot be recorded (no such item in the RA queue)."""


def record_adjudication(
    classification_id: int,
    user: User,
    answer: Mapping[str, Any],
    note: str | None,
    *,
    ignore: Iterable[str] = (),
) -> Adjudication:
    """Validate and store a final label; raises AnswerError (bad answer or note) or
    AdjudicationError, saving nothing. The audit row is written in the same
    transaction: a decision is never kept unlogged."""
    codebook = get_codebook()
    errors: dict[str, list[str]] = {}
    try:
        cleaned = codebook.validate_answer(answer, ignore=ignore)
    except AnswerError as exc:
        errors.update(exc.errors)
        cleaned = {}
    text = (note or "").strip()
    if not text:
        errors["note"] = ["A note saying why is required."]
    elif len(text) > NOTE_MAX_CHARS:
        errors["note"] = [f"At most {NOTE_MAX_CHARS} characters."]
    if errors:
        raise AnswerError(errors)
    if db.session.get(Item, classification_id) is None:
        raise AdjudicationError(f"item {classification_id} is not in the RA queue")
    decision = Adjudication(
        classification_id=classification_id,
        answer=cleaned,
        note=text,
        codebook_version=codebook.version,
        decided_by=user.id,
    )
    db.session.add(decision)
    db.session.flush()
    audit_log.record(
        Action.ADJUDICATION,
        actor=user,
        classification_id=classification_id,
        details={"adjudication_id": decision.id, "answer": cleaned},
    )
    db.session.commit()  # the decision and its audit row together
    return decision


def history(classification_id: int) -> list[Adjudication]:
    """Every decision on the item, latest (the current one) first."""
    return list(
        db.session.execute(
            db.select(Adjudication)
            .where(Adjudication.classification_id == classification_id)
            .order_by(Adjudication.id.desc())
        ).scalars()
    )
