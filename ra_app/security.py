"""Passwords, bearer tokens and role checks."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import wraps
from typing import Any, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from flask import abort, g, jsonify, request
from flask_login import current_user, login_required

from ra_app.extensions import db
from ra_app.models import ApiToken, User

TOKEN_PREFIX = "ra_"  # noqa: S105 - a marker, not a secret
TOKEN_BYTES = 32  # entropy of a bearer token; enough that a fast hash is safe
MIN_PASSWORD_LENGTH = 10

# argon2-cffi's defaults are RFC 9106's low-memory Argon2id profile.
_hasher = PasswordHasher()
# Verified when the username is unknown, so a login takes as long either way.
_DUMMY_HASH = _hasher.hash("not-a-real-password")

F = TypeVar("F", bound=Callable[..., Any])


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
    return _hasher.hash(password)


def verify_password(user: User | None, password: str) -> bool:
    """True if ``password`` is ``user``'s; rehashes when the parameters changed."""
    if user is None:
        with contextlib.suppress(VerificationError):
            _hasher.verify(_DUMMY_HASH, password)
        return False
    try:
        _hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        return False
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    return True


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(user: User, name: str, days: int) -> str:
    """Create a token for ``user``; the plain value is returned once, never stored."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    db.session.add(
        ApiToken(
            user_id=user.id,
            name=name,
            token_hash=hash_token(token),
            expires_at=datetime.now(UTC) + timedelta(days=days),
        )
    )
    return token


def user_for_token(token: str) -> User | None:
    row = db.session.execute(
        db.select(ApiToken).where(
            ApiToken.token_hash == hash_token(token),
            ApiToken.revoked_at.is_(None),
            ApiToken.expires_at > db.func.now(),
        )
    ).scalar_one_or_none()
    if row is None or not row.user.active:
        return None
    row.last_used_at = datetime.now(UTC)
    return row.user


def _api_error(status: int, message: str) -> Any:
    response = jsonify(error=message)
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="ra_app"'
    return response


def token_required(role: str | None = None) -> Callable[[F], F]:
    """Authenticate an API call by its Authorization: Bearer header only.

    Session cookies are ignored on purpose: the API is exempt from CSRF, so it
    must never act on the ambient credentials a browser sends.
    """

    def decorator(view: F) -> F:
        @wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return _api_error(401, "missing bearer token")
            user = user_for_token(token.strip())
            if user is None:
                return _api_error(401, "invalid, expired or revoked token")
            if role is not None and user.role != role:
                return _api_error(403, f"this endpoint needs the {role} role")
            g.api_user = user
            db.session.commit()  # last_used_at
            return view(*args, **kwargs)

        return wrapped  # type: ignore[return-value]

    return decorator


def admin_required(view: F) -> F:
    """login_required plus the admin role (403 for an RA)."""

    @wraps(view)
    @login_required
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not current_user.is_admin:
            abort(403)
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]
