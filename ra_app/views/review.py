"""The review page: transcript, evidence, audio, and the codebook's label form."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from werkzeug.datastructures import MultiDict

from ra_app import assignment, audio, audit_log, blind, pipeline
from ra_app.audit_log import Action
from ra_app.codebook import AnswerError
from ra_app.codebook_support import get_codebook
from ra_app.extensions import db
from ra_app.forms import ActionForm
from ra_app.labels import LabelError, record_label
from ra_app.models import Assignment, AssignmentStatus, Label

bp = Blueprint("review", __name__)

FORM_META_FIELDS = ("csrf_token", "time_on_task_ms")


def own_assignment(assignment_id: int) -> Assignment:
    """The assignment if it is the current user's; admins may look at any.

    404 rather than 403 for another RA's assignment: an RA learns nothing about
    the existence of work that is not theirs.
    """
    found = db.session.get(Assignment, assignment_id)
    if found is None or (found.user_id != current_user.id and not current_user.is_admin):
        abort(404)
    return found


@bp.get("/review/<int:assignment_id>")
@login_required
def show(assignment_id: int) -> Any:
    found = own_assignment(assignment_id)
    item = blind.review_item(found.classification_id)
    if item is None:
        abort(404, description="The pipeline no longer has this item.")
    editable = found.status == AssignmentStatus.ASSIGNED.value and found.user_id == current_user.id
    if editable:
        assignment.touch(found)
    audit_log.record(
        Action.ITEM_VIEW, classification_id=found.classification_id, target=assignment_target(found)
    )
    db.session.commit()  # logged before the item is shown
    label = None
    if found.status != AssignmentStatus.ASSIGNED.value:  # a label closes its assignment
        label = db.session.execute(
            db.select(Label).where(Label.assignment_id == found.id)
        ).scalar_one_or_none()
    return render_template(
        "review.html",
        assignment=found,
        item=item,
        codebook=get_codebook(),
        editable=editable,
        answer=(label.answer if label else {}),
        errors={},
        form=ActionForm(),
    )


@bp.post("/review/<int:assignment_id>/label")
@login_required
def submit(assignment_id: int) -> Any:
    found = own_assignment(assignment_id)
    if found.user_id != current_user.id:
        abort(403)
    if not ActionForm().validate_on_submit():
        flash("The form expired; your answer was not saved. Please submit again.", "error")
        return redirect(url_for("review.show", assignment_id=assignment_id))
    form = MultiDict(request.form)
    try:
        record_label(
            found.id,
            current_user,
            form,
            request.form.get("time_on_task_ms"),
            ignore=FORM_META_FIELDS,
        )
    except AnswerError as exc:
        item = blind.review_item(found.classification_id)
        flash("Please fix the highlighted answers.", "error")
        answer = {k: (form.getlist(k) if len(form.getlist(k)) > 1 else form.get(k)) for k in form}
        return render_template(
            "review.html",
            assignment=found,
            item=item,
            codebook=get_codebook(),
            editable=True,
            answer=answer,
            errors=exc.errors,
            form=ActionForm(),
        ), 400
    except LabelError as exc:
        flash(str(exc), "error")
        return redirect(url_for("queue.index"))
    return _go_next()


@bp.post("/review/<int:assignment_id>/skip")
@login_required
def skip(assignment_id: int) -> Any:
    found = own_assignment(assignment_id)
    if not ActionForm().validate_on_submit():
        flash("The form expired; try again.", "error")
        return redirect(url_for("review.show", assignment_id=assignment_id))
    try:
        # Committed (with its audit row) before the next claim, not with it: sharing
        # one transaction measured slower under load (bench/bench_ra.py), likely the
        # skipped item's row lock held across the claim.
        outcome = assignment.skip(found, current_user)
    except assignment.AssignmentError as exc:
        db.session.rollback()
        flash(str(exc), "error")
        return redirect(url_for("queue.index"))
    commit_skip(found, outcome)
    return _go_next()


def assignment_target(found: Assignment) -> str:
    return f"assignment:{found.id}"


def commit_skip(found: Assignment, outcome: assignment.SkipResult) -> None:
    """Commit a skip together with its audit row (a repeated Skip changed nothing and
    logs nothing)."""
    if outcome is assignment.SkipResult.SKIPPED:
        audit_log.record(
            Action.SKIP, classification_id=found.classification_id, target=assignment_target(found)
        )
    db.session.commit()


def _go_next() -> Any:
    got = assignment.next_assignment(current_user)
    if got is None:
        flash("Saved. Nothing left to review right now. Thank you!", "info")
        return redirect(url_for("queue.index"))
    return redirect(url_for("review.show", assignment_id=got.id))


@bp.get("/audio/<int:assignment_id>")
@login_required
def audio_file(assignment_id: int) -> Any:
    found = own_assignment(assignment_id)
    key = pipeline.opus_key_for(found.classification_id)
    if not key:
        abort(404, description="This item has no converted audio.")
    record_play(found)
    return audio.stream_opus(key)


def record_play(found: Assignment) -> None:
    """Log a play of the item's audio: once per session, however many Range requests."""
    audit_log.record(
        Action.AUDIO_PLAY,
        classification_id=found.classification_id,
        target=assignment_target(found),
        once_per_session=True,
    )
    db.session.commit()
