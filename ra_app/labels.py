"""Recording a label: validate against the codebook, then close the assignment."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from ra_app import assignment, audit_log, blind, metrics, pipeline
from ra_app.audit_log import Action
from ra_app.codebook_support import get_codebook
from ra_app.extensions import db
from ra_app.models import AssignmentStatus, Label, User

MAX_TIME_ON_TASK_MS = 24 * 3600 * 1000  # a day; anything longer is a stale tab


class LabelError(RuntimeError):
    """The label cannot be recorded (not yours, already labelled, slot lost)."""


def _time_on_task(raw: Any, assigned_at: datetime, now: datetime) -> int:
    """The client's measure of active time, bounded by the time since assignment.

    The page counts only the time it was visible; scripts and pages without
    JavaScript fall back to the time since the item was handed out.
    """
    elapsed = max(0, int((now - assigned_at).total_seconds() * 1000))
    try:
        reported = int(raw)
    except (TypeError, ValueError):
        return min(elapsed, MAX_TIME_ON_TASK_MS)
    return max(0, min(reported, elapsed, MAX_TIME_ON_TASK_MS))


def record_label(
    assignment_id: int,
    user: User,
    answer: Mapping[str, Any],
    time_on_task_ms: Any = None,
    *,
    ignore: Iterable[str] = (),
) -> Label:
    """Validate ``answer`` and store it; raises AnswerError or LabelError, saving nothing."""
    codebook = get_codebook()
    cleaned = codebook.validate_answer(answer, ignore=ignore)
    try:
        found = assignment.lock_for_label(assignment_id, user)
    except assignment.AssignmentError as exc:
        raise LabelError(str(exc)) from exc
    now = datetime.now(UTC)
    # Read in this transaction, so the label keeps what the pipeline held as it was made.
    facts = pipeline.label_facts(found.classification_id) or {}
    label = Label(
        assignment_id=found.id,
        classification_id=found.classification_id,
        user_id=user.id,
        answer=cleaned,
        time_on_task_ms=_time_on_task(time_on_task_ms, found.assigned_at, now),
        codebook_version=codebook.version,
        reviewed_blind=blind.item_is_blind(found.classification_id),
        **facts,
    )
    db.session.add(label)
    found.status = AssignmentStatus.DONE.value
    found.completed_at = now
    db.session.flush()
    audit_log.record(
        Action.LABEL,
        actor=user,
        classification_id=found.classification_id,
        target=f"assignment:{found.id}",
        details={"label_id": label.id},
    )
    db.session.commit()  # the label and its audit row together
    metrics.label_recorded(label.policy_name, label.time_on_task_ms)
    return label
