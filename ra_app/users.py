"""Account rules shared by the CLI and the admin pages."""

from __future__ import annotations

import re

from sqlalchemy import func, update

from ra_app.extensions import db
from ra_app.models import ApiToken, Role, User
from ra_app.security import hash_password

USERNAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")


class UserError(ValueError):
    """A username or password breaks the account rules; the message says which."""


def normalize_username(username: str) -> str:
    name = username.strip().lower()
    if not USERNAME_PATTERN.match(name):
        raise UserError(
            f"username {username!r} must be 2-64 characters: letters, digits, '.', '_' or '-'"
        )
    return name


def create_user(username: str, password: str, role: str = Role.RA.value) -> User:
    """Add a user to the session (the caller commits); raises UserError."""
    name = normalize_username(username)
    if role not in {r.value for r in Role}:
        raise UserError(f"role must be one of {[r.value for r in Role]}")
    if db.session.execute(db.select(User.id).where(User.username == name)).first():
        raise UserError(f"user {name!r} already exists")
    try:
        password_hash = hash_password(password)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    user = User(username=name, password_hash=password_hash, role=role, active=True)
    db.session.add(user)
    return user


def reset_password(user: User, password: str) -> None:
    """Give ``user`` a new password and end all their sessions (the caller commits).

    The tokens for scripts are left alone: they are revoked on their own
    (revoke_tokens), so a forgotten password does not break a running script.
    """
    try:
        user.password_hash = hash_password(password)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    # In SQL, not in Python: two resets at once still end up with a new number each.
    user.session_version = User.session_version + 1  # type: ignore[assignment]


def live_tokens(user: User) -> list[ApiToken]:
    """``user``'s tokens that still work: neither revoked nor expired."""
    return list(
        db.session.execute(
            db.select(ApiToken)
            .where(
                ApiToken.user_id == user.id,
                ApiToken.revoked_at.is_(None),
                ApiToken.expires_at > func.now(),
            )
            .order_by(ApiToken.id)
        ).scalars()
    )


def revoke_tokens(user: User, token_id: int | None = None, name: str | None = None) -> int:
    """Revoke ``user``'s unrevoked tokens (all, or the one id, or those of a name).

    Returns how many were revoked (the caller commits). The API looks a token up
    on every request with ``revoked_at IS NULL``, so a revoked token fails on the
    very next call, in every app process.
    """
    stmt = (
        update(ApiToken)
        .where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=func.now())
    )
    if token_id is not None:
        stmt = stmt.where(ApiToken.id == token_id)
    if name is not None:
        stmt = stmt.where(ApiToken.name == name)
    return int(db.session.execute(stmt).rowcount)  # type: ignore[attr-defined]
