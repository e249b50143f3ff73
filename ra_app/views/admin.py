"""Researcher pages: progress, agreement, adjudication, users, batches, export."""

from __future__ import annotations

from datetime import date
from typing import Any

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    stream_with_context,
    url_for,
)
from flask_login import current_user, login_user
from werkzeug.datastructures import MultiDict

from ra_app import adjudication, assignment, audit_log, pipeline, reports, users
from ra_app.audit_log import Action
from ra_app.codebook import AnswerError
from ra_app.codebook_support import get_codebook
from ra_app.evaluation import DEFAULT_TARGET_PRECISION
from ra_app.evaluation_source import evaluate_study
from ra_app.export import MIME, ExportFormat, audit_log_csv_lines, export_lines
from ra_app.extensions import db
from ra_app.forms import ActionForm, AssignBatchForm, NewUserForm, ResetPasswordForm, TokenForm
from ra_app.models import ApiToken, User
from ra_app.security import admin_required, issue_token
from ra_app.views.queue import page_arg

bp = Blueprint("admin", __name__, url_prefix="/admin")


@bp.get("/")
@admin_required
def index() -> Any:
    return render_template(
        "admin/index.html",
        progress=reports.ra_progress(),
        counts=assignment.queue_counts(),
        assign_form=AssignBatchForm(),
        form=ActionForm(),
    )


@bp.get("/batches")
@admin_required
def batches() -> Any:
    page, size = page_arg(), current_app.config["PAGE_SIZE"]
    rows = reports.batch_progress(page, size)
    return render_template(
        "admin/batches.html", rows=rows[:size], page=page, has_next=len(rows) > size
    )


@bp.get("/agreement")
@admin_required
def agreement_page() -> Any:
    codebook = get_codebook()
    return render_template(
        "admin/agreement.html", report=reports.agreement_figures(codebook), codebook=codebook
    )


@bp.get("/disagreements")
@admin_required
def disagreements() -> Any:
    page, size = page_arg(), current_app.config["PAGE_SIZE"]
    found = reports.disagreement_page(get_codebook(), page, size)
    return render_template(
        "admin/disagreements.html", found=found, page=page, has_next=found.has_next
    )


@bp.get("/evaluation")
@admin_required
def evaluation() -> Any:
    target = request.args.get("precision", DEFAULT_TARGET_PRECISION, type=float)
    if target is None or not 0.0 <= target <= 1.0:
        target = DEFAULT_TARGET_PRECISION
    codebook = get_codebook()
    verdict = codebook.verdict
    excluded = []
    if verdict is not None:
        field = codebook.field(verdict.field)
        excluded = [v for v in field.option_values if verdict.of(v) is None]
    return render_template(
        "admin/evaluation.html",
        groups=evaluate_study(codebook, target),
        target=target,
        excluded=excluded,
    )


# Form keys of the adjudication form that are not codebook fields.
ADJUDICATION_META_FIELDS = ("csrf_token", "adjudication_note")


@bp.get("/items/<int:classification_id>")
@admin_required
def item(classification_id: int) -> Any:
    return _item_page(classification_id)


def _item_page(
    classification_id: int,
    answer: dict[str, Any] | None = None,
    note: str = "",
    errors: dict[str, list[str]] | None = None,
    status: int = 200,
) -> Any:
    detail = pipeline.item_detail(classification_id)
    if detail is None:
        abort(404)
    decisions = adjudication.history(classification_id)
    if status == 200:  # a re-shown form with errors is the same view, not a new one
        audit_log.record(
            Action.ITEM_VIEW, classification_id=classification_id, details={"page": "admin"}
        )
        db.session.commit()
    if answer is None:  # the form starts from the current decision, if any
        answer = dict(decisions[0].answer) if decisions else {}
    return render_template(
        "admin/item.html",
        item=detail,
        labels=reports.item_labels(classification_id),
        codebook=get_codebook(),
        decisions=decisions,
        answer=answer,
        note=note,
        errors=errors or {},
        form=ActionForm(),
    ), status


@bp.post("/items/<int:classification_id>/adjudicate")
@admin_required
def adjudicate(classification_id: int) -> Any:
    if not ActionForm().validate_on_submit():
        flash("The form expired; the decision was not saved. Please submit again.", "error")
        return redirect(url_for("admin.item", classification_id=classification_id))
    form = MultiDict(request.form)
    note = request.form.get("adjudication_note", "")
    try:
        adjudication.record_adjudication(
            classification_id, current_user, form, note, ignore=ADJUDICATION_META_FIELDS
        )
    except AnswerError as exc:
        flash("Please fix the highlighted answers.", "error")
        answer = {
            k: (form.getlist(k) if len(form.getlist(k)) > 1 else form.get(k))
            for k in form
            if k not in ADJUDICATION_META_FIELDS
        }
        return _item_page(classification_id, answer, note, exc.errors, 400)
    except adjudication.AdjudicationError as exc:
        abort(404, description=str(exc))
    flash(f"Final label of item {classification_id} recorded.", "info")
    return redirect(url_for("admin.item", classification_id=classification_id))


@bp.post("/assign")
@admin_required
def assign() -> Any:
    form = AssignBatchForm()
    if not form.validate_on_submit():
        flash("Give a batch and a research assistant.", "error")
        return redirect(url_for("admin.index"))
    name = form.username.data.strip().lower()
    user = db.session.execute(db.select(User).where(User.username == name)).scalar_one_or_none()
    if user is None or not user.active:
        flash(f"No active user {name!r}.", "error")
        return redirect(url_for("admin.index"))
    batch = form.batch_id.data.strip()
    # In assign_batch's transaction: it commits both, or neither.
    audit_log.record(Action.BATCH_ASSIGN, target=f"batch:{batch}", details={"to": user.username})
    n = assignment.assign_batch(batch, user)
    flash(f"Assigned {n} items of batch {form.batch_id.data.strip()!r} to {name}.", "info")
    return redirect(url_for("admin.index"))


@bp.post("/sync")
@admin_required
def sync() -> Any:
    if ActionForm().validate_on_submit():
        n = assignment.sync_queue(full=True)
        flash(f"Queue synced from the pipeline: {n} items new or re-scored.", "info")
    return redirect(url_for("admin.index"))


@bp.get("/users")
@admin_required
def user_list() -> Any:
    rows = db.session.execute(db.select(User).order_by(User.username)).scalars().all()
    return render_template(
        "admin/users.html",
        users=rows,
        new_form=NewUserForm(),
        token_form=TokenForm(),
        form=ActionForm(),
    )


@bp.post("/users")
@admin_required
def user_create() -> Any:
    form = NewUserForm()
    if not form.validate_on_submit():
        for field, errors in form.errors.items():
            flash(f"{field}: {'; '.join(errors)}", "error")
        return redirect(url_for("admin.user_list"))
    try:
        user = users.create_user(form.username.data, form.password.data, form.role.data)
        audit_log.record(
            Action.USER_CREATE, target=f"user:{user.username}", details={"role": user.role}
        )
        db.session.commit()
    except users.UserError as exc:
        db.session.rollback()
        flash(str(exc), "error")
        return redirect(url_for("admin.user_list"))
    flash(f"Created {user.role} {user.username!r}.", "info")
    return redirect(url_for("admin.user_list"))


@bp.get("/users/<int:user_id>")
@admin_required
def user_detail(user_id: int) -> Any:
    user = db.get_or_404(User, user_id)
    return render_template(
        "admin/user.html",
        user=user,
        tokens=users.live_tokens(user),
        password_form=ResetPasswordForm(),
        token_form=TokenForm(),
        form=ActionForm(),
    )


def _back(user: User) -> Any:
    """Back to the page the action was sent from: the user's own page or the list."""
    if request.form.get("back") == "user":
        return redirect(url_for("admin.user_detail", user_id=user.id))
    return redirect(url_for("admin.user_list"))


@bp.post("/users/<int:user_id>/active")
@admin_required
def user_set_active(user_id: int) -> Any:
    user = db.get_or_404(User, user_id)
    if ActionForm().validate_on_submit():
        activate = request.form.get("active") == "1"
        if not activate and user.id == current_user.id:
            flash("You cannot deactivate yourself.", "error")
        else:
            user.active = activate
            action = Action.USER_ACTIVATE if activate else Action.USER_DEACTIVATE
            audit_log.record(action, target=f"user:{user.username}")
            db.session.commit()
            flash(f"{user.username} is now {'active' if activate else 'deactivated'}.", "info")
    return _back(user)


@bp.post("/users/<int:user_id>/password")
@admin_required
def user_reset_password(user_id: int) -> Any:
    user = db.get_or_404(User, user_id)
    form = ResetPasswordForm()
    if not form.validate_on_submit():
        for errors in form.errors.values():
            flash("; ".join(errors), "error")
        return redirect(url_for("admin.user_detail", user_id=user.id))
    try:
        users.reset_password(user, form.password.data)
        audit_log.record(Action.PASSWORD_RESET, target=f"user:{user.username}")
        db.session.commit()
    except users.UserError as exc:
        db.session.rollback()
        flash(str(exc), "error")
        return redirect(url_for("admin.user_detail", user_id=user.id))
    if user.id == current_user.id:
        # Every session of the admin ended, this one too; this one re-logs in with
        # the new number, since the admin just proved who they are.
        login_user(user)
    flash(
        f"New password set for {user.username}; their open sessions are ended. "
        "API tokens are unchanged: revoke them below if they may be known.",
        "info",
    )
    return redirect(url_for("admin.user_detail", user_id=user.id))


@bp.post("/users/<int:user_id>/tokens/<int:token_id>/revoke")
@admin_required
def user_revoke_token(user_id: int, token_id: int) -> Any:
    user = db.get_or_404(User, user_id)
    token = db.session.get(ApiToken, token_id)
    if token is None or token.user_id != user.id:
        abort(404)
    if ActionForm().validate_on_submit():
        if users.revoke_tokens(user, token_id=token.id):
            audit_log.record(
                Action.TOKEN_REVOKE,
                target=f"user:{user.username}",
                details={"token_id": token.id, "name": token.name},
            )
            flash(f"Token {token.name!r} of {user.username} revoked.", "info")
        else:
            flash(f"Token {token.name!r} was already revoked.", "info")
        db.session.commit()
    return redirect(url_for("admin.user_detail", user_id=user.id))


@bp.post("/users/<int:user_id>/tokens/revoke")
@admin_required
def user_revoke_tokens(user_id: int) -> Any:
    user = db.get_or_404(User, user_id)
    if ActionForm().validate_on_submit():
        n = users.revoke_tokens(user)
        if n:
            audit_log.record(
                Action.TOKEN_REVOKE, target=f"user:{user.username}", details={"revoked": n}
            )
        db.session.commit()
        flash(f"Revoked {n} token{'' if n == 1 else 's'} of {user.username}.", "info")
    return redirect(url_for("admin.user_detail", user_id=user.id))


@bp.post("/users/<int:user_id>/tokens")
@admin_required
def user_token(user_id: int) -> Any:
    user = db.get_or_404(User, user_id)
    form = TokenForm()
    if not form.validate_on_submit():
        flash("Token name and a lifetime of 1 to 365 days are needed.", "error")
        return redirect(url_for("admin.user_list"))
    token = issue_token(user, form.name.data, form.days.data)
    audit_log.record(
        Action.TOKEN_ISSUE,
        target=f"user:{user.username}",
        details={"name": form.name.data, "days": form.days.data},
    )
    db.session.commit()
    return render_template("admin/token.html", user=user, token=token, days=form.days.data)


@bp.get("/export.<fmt>")
@admin_required
def export(fmt: str) -> Any:
    try:
        kind = ExportFormat(fmt)
    except ValueError:
        abort(404)
    return export_response(kind)


def _audit_filters() -> audit_log.Filters:
    """The audit log's filters from the query string; a malformed value is no filter."""

    def day(name: str) -> date | None:
        try:
            return date.fromisoformat(request.args.get(name, ""))
        except ValueError:
            return None

    action = request.args.get("action", "").strip()
    return audit_log.Filters(
        actor=request.args.get("user", "").strip() or None,
        action=action if action in {a.value for a in Action} else None,
        since=day("from"),
        until=day("to"),
        classification_id=request.args.get("item", type=int),
    )


def _audit_query(filters: audit_log.Filters) -> dict[str, Any]:
    """The filters as query-string arguments, for links that keep them."""
    args = {
        "user": filters.actor,
        "action": filters.action,
        "from": filters.since.isoformat() if filters.since else None,
        "to": filters.until.isoformat() if filters.until else None,
        "item": filters.classification_id,
    }
    return {k: v for k, v in args.items() if v is not None}


@bp.get("/audit-log")
@admin_required
def audit_log_page() -> Any:
    filters = _audit_filters()
    page, size = page_arg(), current_app.config["PAGE_SIZE"]
    rows = audit_log.page(filters, page, size)
    return render_template(
        "admin/audit_log.html",
        rows=rows[:size],
        page=page,
        has_next=len(rows) > size,
        filters=filters,
        query=_audit_query(filters),
        actions=[a.value for a in Action],
        retention_days=current_app.config["RA_AUDIT_RETENTION_DAYS"],
    )


@bp.get("/audit-log.csv")
@admin_required
def audit_log_csv() -> Any:
    filters = _audit_filters()
    # The export is itself audited, with the filters it was made with.
    audit_log.record(Action.AUDIT_LOG_EXPORT, target="ra_audit_log", details=filters.as_dict())
    db.session.commit()
    return Response(
        stream_with_context(audit_log_csv_lines(filters)),
        mimetype=MIME[ExportFormat.CSV],
        headers={"Content-Disposition": 'attachment; filename="ra_audit_log.csv"'},
    )


def export_response(kind: ExportFormat) -> Response:
    audit_log.record(Action.EXPORT, target="ra_labels", details={"format": kind.value})
    db.session.commit()  # logged before the first byte leaves
    lines = export_lines(kind, get_codebook())
    return Response(
        stream_with_context(lines),
        mimetype=MIME[kind],
        headers={"Content-Disposition": f'attachment; filename="ra_labels.{kind.value}"'},
    )
