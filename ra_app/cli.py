"""Operator commands: ``flask --app ra_app <command>``."""

from __future__ import annotations

import json

import click
from flask import Flask, current_app
from flask.cli import with_appcontext
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from ra_app import assignment, audit_log, users
from ra_app.audit_log import Action
from ra_app.codebook_support import get_codebook
from ra_app.config import API_TOKEN_DAYS
from ra_app.evaluation import DEFAULT_TARGET_PRECISION
from ra_app.evaluation_source import evaluate_study
from ra_app.extensions import db
from ra_app.models import Role, User
from ra_app.security import issue_token


def _user(username: str) -> User:
    user = db.session.execute(
        db.select(User).where(User.username == username.strip().lower())
    ).scalar_one_or_none()
    if user is None:
        raise click.ClickException(f"no user {username!r}")
    return user


@click.command("create-user")
@with_appcontext
@click.argument("username")
@click.option(
    "--role", type=click.Choice([r.value for r in Role]), default=Role.RA.value, show_default=True
)
@click.option(
    "--password",
    envvar="RA_NEW_PASSWORD",
    prompt=True,
    hide_input=True,
    confirmation_prompt=True,
    help="prompted for if not given",
)
def create_user(username: str, role: str, password: str) -> None:
    """Create a user, e.g. the first admin: flask --app ra_app create-user alice --role admin"""
    try:
        user = users.create_user(username, password, role)
        audit_log.record(Action.USER_CREATE, target=f"user:{user.username}", details={"role": role})
        db.session.commit()
    except users.UserError as exc:
        raise click.ClickException(str(exc)) from exc
    except IntegrityError as exc:  # created concurrently
        db.session.rollback()
        raise click.ClickException(f"user {username!r} already exists") from exc
    click.echo(f"created {role} {user.username!r}")


@click.command("deactivate-user")
@with_appcontext
@click.argument("username")
def deactivate_user(username: str) -> None:
    """Stop a user from logging in; their labels stay."""
    user = _user(username)
    user.active = False
    audit_log.record(Action.USER_DEACTIVATE, target=f"user:{user.username}")
    db.session.commit()
    click.echo(f"deactivated {user.username!r}")


@click.command("reset-password")
@with_appcontext
@click.argument("username")
@click.option(
    "--password",
    envvar="RA_NEW_PASSWORD",
    prompt="New password",
    hide_input=True,
    confirmation_prompt=True,
    help="prompted for if not given",
)
def reset_password(username: str, password: str) -> None:
    """Set a new password for USERNAME and log them out everywhere (API tokens stay)."""
    user = _user(username)
    try:
        users.reset_password(user, password)
    except users.UserError as exc:
        raise click.ClickException(str(exc)) from exc
    audit_log.record(Action.PASSWORD_RESET, target=f"user:{user.username}")
    db.session.commit()
    click.echo(f"password of {user.username!r} reset; their open sessions are ended")


@click.command("list-tokens")
@with_appcontext
@click.argument("username")
def list_tokens(username: str) -> None:
    """List USERNAME's working API tokens (id, name, expiry, last use)."""
    for token in users.live_tokens(_user(username)):
        expires = token.expires_at.isoformat(timespec="seconds")
        used = token.last_used_at.isoformat(timespec="seconds") if token.last_used_at else "never"
        click.echo(f"{token.id}\t{token.name}\texpires {expires}\tlast used {used}")


@click.command("revoke-token")
@with_appcontext
@click.argument("username")
@click.option("--id", "token_id", type=int, help="only this token (see list-tokens)")
@click.option("--name", help="only the tokens with this name")
def revoke_token(username: str, token_id: int | None, name: str | None) -> None:
    """Revoke USERNAME's API tokens (all of them unless --id or --name); at once."""
    user = _user(username)
    n = users.revoke_tokens(user, token_id, name)
    if n:
        audit_log.record(
            Action.TOKEN_REVOKE,
            target=f"user:{user.username}",
            details={"revoked": n, "token_id": token_id, "name": name},
        )
    db.session.commit()
    if not n:
        raise click.ClickException(f"no unrevoked token of {user.username!r} matched")
    click.echo(f"revoked {n} token{'s' if n != 1 else ''} of {user.username!r}")


@click.command("create-token")
@with_appcontext
@click.argument("username")
@click.option("--name", default="script", show_default=True, help="what the token is for")
@click.option("--days", type=click.IntRange(1, 365), default=API_TOKEN_DAYS, show_default=True)
def create_token(username: str, name: str, days: int) -> None:
    """Print a new bearer token for USERNAME (shown once; only its hash is stored)."""
    user = _user(username)
    token = issue_token(user, name, days)
    audit_log.record(
        Action.TOKEN_ISSUE, target=f"user:{user.username}", details={"name": name, "days": days}
    )
    db.session.commit()
    click.echo(token)


@click.command("sync-queue")
@with_appcontext
@click.option("--full", is_flag=True, help="re-read all of ra_queue and refresh scores")
def sync_queue(full: bool) -> None:
    """Copy newly flagged items from the pipeline's ra_queue into the RA queue."""
    click.echo(f"synced {assignment.sync_queue(full=full)} items")


@click.command("expire-assignments")
@with_appcontext
def expire_assignments() -> None:
    """Return abandoned assignments to the pool (also done on every "Next item")."""
    click.echo(f"expired {assignment.expire_abandoned()} assignments")


@click.command("assign-batch")
@with_appcontext
@click.argument("batch_id")
@click.argument("username")
def assign_batch(batch_id: str, username: str) -> None:
    """Assign every open item of BATCH_ID to USERNAME."""
    user = _user(username)
    # In assign_batch's transaction: it commits both, or neither.
    audit_log.record(Action.BATCH_ASSIGN, target=f"batch:{batch_id}", details={"to": user.username})
    n = assignment.assign_batch(batch_id, user)
    click.echo(f"assigned {n} items of {batch_id!r} to {username!r}")


EVALUATION_COLUMNS = (
    "policy",
    "version",
    "model",
    "flagged reviewed/in queue",
    "audit reviewed/in queue",
    "precision",
    "95% CI",
    "recall",
    "prevalence",
    "F1",
)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@click.command("evaluate")
@with_appcontext
@click.option("--json", "as_json", is_flag=True, help="one JSON list, one object per group")
@click.option(
    "--precision",
    "target",
    type=click.FloatRange(0.0, 1.0),
    default=DEFAULT_TARGET_PRECISION,
    show_default=True,
    help="the precision the suggested threshold must reach",
)
def evaluate(as_json: bool, target: float) -> None:
    """Precision, recall, prevalence and F1 of the classifier per policy version x model,
    measured with the RAs' labels (recall and prevalence from the audit sample)."""
    groups = evaluate_study(get_codebook(), target)
    if groups is None:
        raise click.ClickException(
            "the codebook declares no verdict field (see ra_app/codebook.py: verdict)"
        )
    if as_json:
        click.echo(json.dumps([g.as_json() for g in groups], indent=2))
        return
    click.echo("\t".join(EVALUATION_COLUMNS))
    for g in groups:
        ci = f"{g.precision_ci[0]:.3f}-{g.precision_ci[1]:.3f}" if g.precision_ci else "-"
        cells = [g.policy, str(g.policy_version), g.model]
        cells += [
            f"{g.reviewed_flagged}/{g.entered_flagged}",
            f"{g.reviewed_audit}/{g.entered_audit}",
        ]
        cells += [_figure(g.precision), ci, _figure(g.recall)]
        cells += [_figure(g.prevalence), _figure(g.f1)]
        click.echo("\t".join(cells))


@click.group("audit-log")
def audit_log_group() -> None:
    """The audit log (ra_app.audit_log): retention."""


@audit_log_group.command("prune")
@with_appcontext
@click.option(
    "--days",
    type=click.IntRange(min=1),
    help="keep this many days instead of RA_AUDIT_RETENTION_DAYS",
)
def audit_log_prune(days: int | None) -> None:
    """Delete audit log rows older than the retention (RA_AUDIT_RETENTION_DAYS).

    The only way rows leave the log; the prune is itself logged. With a retention
    of 0 (the default: keep for ever) and no --days, nothing is deleted.
    """
    keep = days or current_app.config["RA_AUDIT_RETENTION_DAYS"]
    if not keep:
        click.echo("RA_AUDIT_RETENTION_DAYS is 0 (keep for ever): nothing pruned")
        return
    url = current_app.config["RA_AUDIT_PRUNE_DATABASE_URL"] or None
    deleted = audit_log.prune(keep, url)
    click.echo(f"pruned {deleted} audit log rows older than {keep} days")


@audit_log_group.command("ownership-sql")
@with_appcontext
@click.option(
    "--app-role",
    help="the RA app's database role (default: the user of DATABASE_URL)",
)
def audit_log_ownership_sql(app_role: str | None) -> None:
    """Print the SQL a database superuser runs to hand the audit log to its own role
    (ra_audit_owner) and leave the app reading and appending only; the prune
    function then belongs to ra_audit_pruner alone. Idempotent."""
    role = app_role or make_url(current_app.config["SQLALCHEMY_DATABASE_URI"]).username
    if not role:
        raise click.UsageError("no user in DATABASE_URL: name the role with --app-role")
    try:
        click.echo(audit_log.ownership_sql(role))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


def init_app(app: Flask) -> None:
    for command in (
        create_user,
        deactivate_user,
        reset_password,
        create_token,
        list_tokens,
        revoke_token,
        sync_queue,
        expire_assignments,
        assign_batch,
        evaluate,
        audit_log_group,
    ):
        app.cli.add_command(command)
