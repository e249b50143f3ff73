"""The RA's home: what they are on, what they have done, and "Next item"."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import func

from ra_app import assignment
from ra_app.extensions import db
from ra_app.forms import ActionForm
from ra_app.models import Assignment, AssignmentStatus, Label

bp = Blueprint("queue", __name__)


def page_arg() -> int:
    return max(1, request.args.get("page", 1, type=int) or 1)


@bp.get("/")
@login_required
def index() -> Any:
    counts = dict(
        db.session.execute(
            db.select(Assignment.status, func.count())
            .where(Assignment.user_id == current_user.id)
            .group_by(Assignment.status)
        ).all()
    )
    current = assignment.current_assignment(current_user)
    page = page_arg()
    size = current_app.config["PAGE_SIZE"]
    # Only this RA's own labels: an RA never sees another RA's work.
    recent = db.session.execute(
        db.select(
            Label.id,
            Label.classification_id,
            Label.answer,
            Label.created_at,
            Label.assignment_id,
            Label.time_on_task_ms,
        )
        .where(Label.user_id == current_user.id)
        .order_by(Label.id.desc())
        .limit(size + 1)
        .offset((page - 1) * size)
    ).all()
    return render_template(
        "queue.html",
        counts=counts,
        current=current,
        recent=recent[:size],
        page=page,
        has_next=len(recent) > size,
        form=ActionForm(),
        AssignmentStatus=AssignmentStatus,
    )


@bp.post("/next")
@login_required
def next_item() -> Any:
    if not ActionForm().validate_on_submit():
        flash("The form expired; try again.", "error")
        return redirect(url_for("queue.index"))
    got = assignment.next_assignment(current_user)
    if got is None:
        flash("Nothing left to review right now. Thank you!", "info")
        return redirect(url_for("queue.index"))
    return redirect(url_for("review.show", assignment_id=got.id))
