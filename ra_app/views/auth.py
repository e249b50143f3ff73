"""Login and logout."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, flash, redirect, render_template, request, session, url_for
from flask_login import current_user, login_required, login_user, logout_user

from ra_app import audit_log, metrics
from ra_app.audit_log import Action
from ra_app.config import LOGIN_RATE_LIMIT
from ra_app.extensions import db, limiter
from ra_app.forms import ActionForm, LoginForm
from ra_app.models import User
from ra_app.security import verify_password

bp = Blueprint("auth", __name__)


def _safe_next(target: str | None) -> str | None:
    """Only a local path: never redirect a fresh login to another site."""
    if not target:
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return None
    return target


@bp.route("/login", methods=["GET", "POST"])
@limiter.limit(LOGIN_RATE_LIMIT, methods=["POST"])
def login() -> Any:
    if current_user.is_authenticated:
        return redirect(url_for("queue.index"))
    form = LoginForm()
    if form.validate_on_submit():
        name = form.username.data.strip().lower()
        user = db.session.execute(db.select(User).where(User.username == name)).scalar_one_or_none()
        password_ok = verify_password(user, form.password.data)
        if password_ok and user is not None and user.active:
            session.clear()  # no session fixation: a fresh session for the new login
            login_user(user)
            audit_log.start_session()
            session.permanent = True
            user.last_login_at = datetime.now(UTC)
            audit_log.record(Action.LOGIN, actor=user)
            db.session.commit()
            metrics.login_succeeded(user.role)
            return redirect(_safe_next(request.args.get("next")) or url_for("queue.index"))
        # The name tried, never the password; no user id, even when the name exists.
        audit_log.record(Action.LOGIN_FAILED, actor_username=name)
        db.session.commit()  # and a rehash on verify, if any
        inactive = password_ok and user is not None
        metrics.login_failed(
            metrics.LoginFailure.INACTIVE if inactive else metrics.LoginFailure.CREDENTIALS
        )
        flash("Wrong username or password, or the account is deactivated.", "error")
        return render_template("login.html", form=form), 401
    return render_template("login.html", form=form)


@bp.post("/logout")
@login_required
def logout() -> Any:
    if ActionForm().validate_on_submit():
        # Recorded while the user and the audit session are still known: the end of
        # what the board sees as one sitting.
        audit_log.record(Action.LOGOUT)
        db.session.commit()
        logout_user()
        session.clear()
        flash("Logged out.", "info")
    return redirect(url_for("auth.login"))
