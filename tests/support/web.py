"""The RA app under test: the real app on the test's own PostgreSQL database, real
logins through its forms, and flagged items seeded as the pipeline writes them.

The fixtures built on these (``app``, ``client``, ``admin_client``, ``ra_client``)
are tests/web/conftest.py's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import psycopg
from flask import Flask
from flask.testing import FlaskClient
from flask_migrate import upgrade

from ra_app import assignment
from ra_app.extensions import db
from ra_app.factory import create_app
from ra_app.models import Role, User
from ra_app.users import create_user
from tests.support.rows import (
    add_audio_file,
    add_batch,
    add_classification,
    add_policy,
    add_transcript,
)

PASSWORD = "correct-horse-battery"
CSRF_RE = re.compile(
    r'name="csrf_token" type="hidden" value="([^"]+)"|'
    r'type="hidden" name="csrf_token" value="([^"]+)"|'
    r'name="csrf_token" value="([^"]+)"'
)


def make_app(env: dict[str, str], **overrides: Any) -> Flask:
    app = create_app({"ENVIRON": env, "TESTING": True, **overrides})
    with app.app_context():
        upgrade()
    return app


def add_user(app: Flask, name: str, role: str = Role.RA.value) -> int:
    with app.app_context():
        user = create_user(name, PASSWORD, role)
        db.session.commit()
        return user.id


def csrf_token(client: FlaskClient, url: str = "/") -> str:
    html = client.get(url).get_data(as_text=True)
    match = CSRF_RE.search(html)
    assert match, f"no CSRF token on {url}"
    return next(g for g in match.groups() if g)


def login(client: FlaskClient, name: str, password: str = PASSWORD) -> str:
    """Log in through the real form; returns the session's CSRF token."""
    token = csrf_token(client, "/login")
    response = client.post(
        "/login", data={"username": name, "password": password, "csrf_token": token}
    )
    assert response.status_code == 302, response.get_data(as_text=True)
    return csrf_token(client, "/")


def seed_items(
    conn: psycopg.Connection,
    n: int,
    batch: str = "batch-1",
    *,
    scores: list[float] | None = None,
    policy: str = "hate",
) -> list[int]:
    """Insert ``n`` flagged classifications (with audio rows and transcripts) in
    ``batch``; returns the classification ids in insertion order."""
    add_batch(conn, batch, "done", exist_ok=True)
    policy_id = add_policy(conn, policy, "No hate speech.")
    ids = []
    for i in range(n):
        audio_id = _transcribed_file(conn, batch, f"calls/clip{i:04d}")
        score = scores[i] if scores else 0.9
        evidence = [{"segment": 1, "start": 2.5, "end": 5.0, "score": score, "terms": ["vermin"]}]
        cid = add_classification(conn, audio_id, policy_id, score, label=1, evidence=evidence)
        ids.append(cid)
    conn.commit()
    return ids


def _transcribed_file(conn: psycopg.Connection, batch: str, stem: str) -> int:
    """A done audio file ``{stem}.mp3`` of ``batch`` with its (English) transcript."""
    audio_id = add_audio_file(
        conn,
        batch,
        f"{stem}.mp3",
        "done",
        duration_s=7.0,
        opus_s3_key=f"audio/{batch}/{stem}.opus",
    )
    add_transcript(conn, audio_id, language="en")
    return audio_id


def seed_scored(
    conn: psycopg.Connection,
    scores: list[float],
    batch: str = "batch-1",
    *,
    threshold: float = 0.5,
    policy: str = "hate",
    version: int = 1,
    model: str = "cope-a-tiny",
    active: bool = True,
) -> list[int]:
    """One classification per score, flagged when score >= threshold as the pipeline
    decides (flagged ones with evidence), each on its own audio file in ``batch``;
    returns the classification ids in the order of ``scores``."""
    add_batch(conn, batch, "done", exist_ok=True)
    policy_id = add_policy(conn, policy, "No hate speech.", version=version, active=active)
    row: Any = conn.execute(
        "SELECT count(*) AS n FROM audio_files WHERE batch_id = %s", [batch]
    ).fetchone()
    first = row["n"] if isinstance(row, Mapping) else row[0]  # dict or tuple rows alike
    ids = []
    for n, score in enumerate(scores, start=first):
        audio_id = _transcribed_file(conn, batch, f"calls/scored{n:05d}")
        flagged = score >= threshold
        evidence = (
            [{"segment": 1, "start": 2.5, "end": 5.0, "score": score, "terms": ["vermin"]}]
            if flagged
            else []
        )
        ids.append(
            add_classification(
                conn,
                audio_id,
                policy_id,
                score,
                threshold=threshold,
                model=model,
                evidence=evidence,
            )
        )
    conn.commit()
    return ids


def user_named(name: str) -> User:
    """The RA app's user ``name`` (inside an app context)."""
    return db.session.execute(db.select(User).where(User.username == name)).scalar_one()


def claim_all(app: Flask, name: str) -> list[int]:
    """Claim and label items one by one as ``name``; the classification ids in order."""
    got = []
    with app.app_context():
        user = user_named(name)
        while (a := assignment.next_assignment(user)) is not None:
            got.append(a.classification_id)
            a.status = "done"
            db.session.commit()
    return got
