"""Account rules shared by the CLI and the admin pages."""

from __future__ import annotations

import re

from ra_app.extensions import db
from ra_app.models import Role, User
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
