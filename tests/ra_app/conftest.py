"""Fixtures for the RA app: the real app on the test's own PostgreSQL database.

``pipeline_env`` (tests/conftest.py) gives a fresh database holding the pipeline
schema and a DATABASE_URL for the ra_app role; pipeline rows are seeded through
the pipeline-role ``db_conn``, as the pipeline itself would write them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from flask_migrate import upgrade

from ra_app.extensions import db
from ra_app.factory import create_app
from ra_app.models import Role
from ra_app.users import create_user

PASSWORD = "correct-horse-battery"
CSRF_RE = re.compile(
    r'name="csrf_token" type="hidden" value="([^"]+)"|'
    r'type="hidden" name="csrf_token" value="([^"]+)"|'
    r'name="csrf_token" value="([^"]+)"'
)


@pytest.fixture
def ra_env(pipeline_env: dict[str, str]) -> dict[str, str]:
    return {**pipeline_env, "SECRET_KEY": "test-secret", "RA_DOUBLE_CODED_SHARE": "0"}


def make_app(env: dict[str, str], **overrides: Any) -> Flask:
    app = create_app({"ENVIRON": env, "TESTING": True, **overrides})
    with app.app_context():
        upgrade()
    return app


@pytest.fixture
def app(ra_env: dict[str, str]) -> Iterator[Flask]:
    application = make_app(ra_env)
    yield application
    with application.app_context():
        db.engine.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


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


@pytest.fixture
def admin_client(app: Flask) -> tuple[FlaskClient, str]:
    add_user(app, "boss", Role.ADMIN.value)
    c = app.test_client()
    return c, login(c, "boss")


@pytest.fixture
def ra_client(app: Flask) -> tuple[FlaskClient, str]:
    add_user(app, "ann")
    c = app.test_client()
    return c, login(c, "ann")


SEGMENTS = [
    {"start": 0.0, "end": 2.5, "text": " Hello and welcome.", "words": []},
    {"start": 2.5, "end": 5.0, "text": " You people are vermin.", "words": []},
    {"start": 5.0, "end": 7.0, "text": " Goodbye.", "words": []},
]


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
    conn.execute(
        "INSERT INTO batches (batch_id, s3_key, status) VALUES (%s, %s, 'done') "
        "ON CONFLICT DO NOTHING",
        (batch, f"archives/{batch}.tar"),
    )
    policy_id = conn.execute(
        "INSERT INTO policies (name, version, text) VALUES (%s, 1, 'No hate speech.') "
        "ON CONFLICT (name, version) DO UPDATE SET text = EXCLUDED.text RETURNING id",
        (policy,),
    ).fetchone()["id"]
    ids = []
    for i in range(n):
        rel = f"calls/clip{i:04d}.mp3"
        audio_id = conn.execute(
            "INSERT INTO audio_files (batch_id, rel_path, duration_s, opus_s3_key, status) "
            "VALUES (%s, %s, 7.0, %s, 'done') RETURNING id",
            (batch, rel, f"audio/{batch}/calls/clip{i:04d}.opus"),
        ).fetchone()["id"]
        conn.execute(
            "INSERT INTO transcripts (audio_id, text, language, segments, model, backend) "
            "VALUES (%s, %s, 'en', %s, 'tiny.en', 'faster-whisper')",
            (audio_id, " ".join(s["text"].strip() for s in SEGMENTS), json.dumps(SEGMENTS)),
        )
        score = scores[i] if scores else 0.9
        evidence = [{"segment": 1, "start": 2.5, "end": 5.0, "score": score, "terms": ["vermin"]}]
        cid = conn.execute(
            "INSERT INTO classifications (audio_id, policy_id, model, score, label, threshold, "
            "evidence) VALUES (%s, %s, 'cope-a-tiny', %s, 1, 0.5, %s) RETURNING id",
            (audio_id, policy_id, score, json.dumps(evidence)),
        ).fetchone()["id"]
        ids.append(cid)
    conn.commit()
    return ids
