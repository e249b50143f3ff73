"""The audit log for a review board: who did what, when, and from which address.

Everything that is audited calls ``record``. It writes in the caller's transaction,
so a row and the action it records are committed together, or neither is: a
review board prefers a refused action to an unlogged one, so a failed write fails
the action (the request ends in a 500 and the action's own changes roll back).

The table (migration 0006) is append-only: its UPDATE, DELETE and TRUNCATE
privileges are revoked from every role, the owner included, and triggers refuse
them anyway, since an owner can grant privileges back to itself. Old rows leave
only through ``prune`` (ra_audit_log_prune, a SECURITY DEFINER function).

Full separation needs the table to belong to a role the app cannot log in as.
On the fleet, after ``flask db upgrade``, a superuser runs ownership_sql() (with
PostgreSQL roles ra_audit_owner NOLOGIN and ra_audit_pruner LOGIN created first);
the prune command then logs in as ra_audit_pruner through
RA_AUDIT_PRUNE_DATABASE_URL. In development the app's role owns both.

Addresses are Flask's ``request.remote_addr``: behind the configured proxies
(RA_PROXY_HOPS, werkzeug's ProxyFix in the factory) the client's, never a
forwarded header the client wrote itself. Sessions are cookies, so each login gets
a random audit session id in the cookie, and the log keeps only its SHA-256
(enough to group one session's events, useless to replay the session). A bearer
token's session is the token itself, kept likewise as a hash.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import re
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from enum import StrEnum
from typing import Any

from flask import g, has_request_context, request, session
from flask_login import current_user
from sqlalchemy import create_engine, text

from ra_app.config import sqlalchemy_url
from ra_app.extensions import db
from ra_app.models import User

SESSION_KEY = "audit_sid"  # the random audit session id in the login cookie
CLI_ACTOR_PREFIX = "os:"  # actor_username of a CLI command: the operating-system user


class Action(StrEnum):
    LOGIN = "login"
    LOGIN_FAILED = "login.failed"
    LOGOUT = "logout"
    ITEM_VIEW = "item.view"
    AUDIO_PLAY = "audio.play"
    LABEL = "label"
    SKIP = "skip"
    EXPORT = "export"
    USER_CREATE = "user.create"
    USER_DEACTIVATE = "user.deactivate"
    USER_ACTIVATE = "user.activate"
    PASSWORD_RESET = "user.password_reset"  # noqa: S105 - an action's name
    TOKEN_ISSUE = "token.issue"  # noqa: S105 - an action's name
    TOKEN_REVOKE = "token.revoke"  # noqa: S105 - an action's name
    BATCH_ASSIGN = "batch.assign"
    ADJUDICATION = "adjudication"
    AUDIT_LOG_EXPORT = "audit_log.export"
    AUDIT_LOG_PRUNE = "audit_log.prune"  # written by ra_audit_log_prune itself
    DEAD_LETTER_REQUEUE = "dead_letter.requeue"  # the operator page
    DEAD_LETTER_PURGE = "dead_letter.purge"  # the operator page


_INSERT = """
INSERT INTO ra_audit_log (actor_id, actor_username, action, classification_id, target,
                          details, client_addr, session_hash)
VALUES (:actor_id, :actor_username, :action, :classification_id, :target,
        CAST(:details AS jsonb), :client_addr, :session_hash)
"""
# Range requests of one player, and replays, collapse into the first play.
_ONCE_PER_SESSION = """
 ON CONFLICT (session_hash, classification_id) WHERE action = 'audio.play' DO NOTHING
"""

# For a superuser on the fleet (the orchestrator role runs it after each migration,
# through `flask --app ra_app audit-log ownership-sql`); see the module docstring.
AUDIT_OWNER_ROLE = "ra_audit_owner"
AUDIT_PRUNER_ROLE = "ra_audit_pruner"
_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def ownership_sql(app_role: str) -> str:
    """The statements that hand the log to its owner role and leave ``app_role`` (the
    RA app's database role) reading and appending only. Idempotent."""
    if not _ROLE_NAME.fullmatch(app_role):
        raise ValueError(f"not a plain PostgreSQL role name: {app_role!r}")
    owner, pruner = AUDIT_OWNER_ROLE, AUDIT_PRUNER_ROLE
    return f"""
ALTER TABLE ra_audit_log OWNER TO {owner};
ALTER FUNCTION ra_audit_log_prune(integer, text) OWNER TO {owner};
ALTER FUNCTION ra_audit_log_refuse() OWNER TO {owner};
ALTER FUNCTION ra_audit_log_stamp() OWNER TO {owner};
REVOKE ALL ON ra_audit_log FROM {app_role};
GRANT SELECT, INSERT ON ra_audit_log TO {app_role};
REVOKE EXECUTE ON FUNCTION ra_audit_log_prune(integer, text) FROM PUBLIC, {app_role};
GRANT EXECUTE ON FUNCTION ra_audit_log_prune(integer, text) TO {pruner};
"""


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def start_session() -> None:
    """Give a fresh login its audit session id (call after the session is cleared)."""
    session[SESSION_KEY] = secrets.token_urlsafe(16)


def _session_hash() -> str | None:
    api_user = g.get("api_user")
    if api_user is not None:
        _, _, token = request.headers.get("Authorization", "").partition(" ")
        return _hash("token:" + token.strip()) if token.strip() else None
    if SESSION_KEY not in session:  # a session from before the audit log, or no login yet
        start_session()
    return _hash(session[SESSION_KEY])


def _request_actor() -> User | None:
    api_user = g.get("api_user")
    if api_user is not None:
        return api_user  # type: ignore[no-any-return]
    if current_user.is_authenticated:
        return current_user  # type: ignore[return-value]
    return None


def cli_actor() -> str:
    """The actor of a CLI command: the operating-system user who ran it."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no user name in the environment or passwd
        name = "unknown"
    return CLI_ACTOR_PREFIX + name


def record(
    action: Action,
    *,
    actor: User | None = None,
    actor_username: str | None = None,
    classification_id: int | None = None,
    target: str | None = None,
    details: Mapping[str, Any] | None = None,
    once_per_session: bool = False,
) -> None:
    """Add an audit row in the current transaction (the caller commits).

    In a request the actor defaults to the logged-in user (or the API token's),
    and the client address and session come from the request; outside one (a CLI
    command) the actor is the operating-system user and both are empty.
    ``actor_username`` alone names an actor that is no user (a failed login's name).
    ``once_per_session`` keeps only the first row per session and item (audio plays).
    """
    client_addr = session_hash = None
    if has_request_context():
        actor = actor if actor is not None else _request_actor()
        client_addr = request.remote_addr
        session_hash = _session_hash()
    elif actor is None and actor_username is None:
        actor_username = cli_actor()
    if actor is not None and actor_username is None:
        actor_username = actor.username
    sql = _INSERT + (_ONCE_PER_SESSION if once_per_session else "")
    db.session.execute(
        text(sql),
        {
            "actor_id": actor.id if actor is not None else None,
            "actor_username": actor_username,
            "action": action.value,
            "classification_id": classification_id,
            "target": target,
            "details": json.dumps(details, default=str) if details is not None else None,
            "client_addr": client_addr,
            "session_hash": session_hash,
        },
    )


# --- reading: the admin page and its CSV ------------------------------------------


@dataclass(frozen=True)
class Filters:
    """The admin page's filters; None means "any"."""

    actor: str | None = None
    action: str | None = None
    since: date | None = None  # from this day on (UTC)
    until: date | None = None  # up to and including this day (UTC)
    classification_id: int | None = None

    def where(self) -> tuple[str, dict[str, Any]]:
        clauses, params = [], {}
        if self.actor:
            clauses.append("actor_username = :actor")
            params["actor"] = self.actor
        if self.action:
            clauses.append("action = :action")
            params["action"] = self.action
        if self.since:
            clauses.append("at >= CAST(:since AS date)")
            params["since"] = self.since.isoformat()
        if self.until:
            clauses.append("at < CAST(:until AS date)")
            params["until"] = (self.until + timedelta(days=1)).isoformat()
        if self.classification_id is not None:
            clauses.append("classification_id = :cid")
            params["cid"] = self.classification_id
        return (" AND ".join(clauses) or "true"), params

    def as_dict(self) -> dict[str, Any]:
        return {
            "actor": self.actor,
            "action": self.action,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "classification_id": self.classification_id,
        }


COLUMNS = [
    "id",
    "at",
    "actor_id",
    "actor_username",
    "action",
    "classification_id",
    "target",
    "details",
    "client_addr",
    "session_hash",
]
# The WHERE clause is Filters.where's fixed text; values are bound parameters.
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM ra_audit_log WHERE {{where}} ORDER BY id DESC"  # noqa: S608


def page(filters: Filters, number: int, size: int) -> list[Any]:
    """One page of matching rows, newest first (one more than ``size``: is there a next?)."""
    where, params = filters.where()
    sql = _SELECT.format(where=where) + " LIMIT :limit OFFSET :offset"
    params.update(limit=size + 1, offset=(number - 1) * size)
    return list(db.session.execute(text(sql), params).all())


def rows(filters: Filters) -> Iterator[Any]:
    """Every matching row, newest first, streamed."""
    where, params = filters.where()
    result = db.session.execute(
        text(_SELECT.format(where=where)).execution_options(stream_results=True, yield_per=1000),
        params,
    )
    yield from result


# --- retention --------------------------------------------------------------------


def prune(keep_days: int, database_url: str | None = None) -> int:
    """Delete rows older than ``keep_days`` through ra_audit_log_prune; how many went.

    With ``database_url`` (RA_AUDIT_PRUNE_DATABASE_URL) the function is called as
    that role, the only one allowed to on a fleet with separate ownership.
    """
    params = {"days": keep_days, "actor": cli_actor()}
    sql = text("SELECT ra_audit_log_prune(:days, :actor)")
    if database_url:
        engine = create_engine(sqlalchemy_url(database_url))
        try:
            with engine.begin() as conn:
                return int(conn.execute(sql, params).scalar_one())
        finally:
            engine.dispose()
    deleted = int(db.session.execute(sql, params).scalar_one())
    db.session.commit()
    return deleted
