"""Bearer API, admin figures (agreement checked by hand), export, audio, health."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from ra_app.extensions import db
from ra_app.models import ApiToken, User
from ra_app.security import issue_token
from tests.support.web import add_user, login, make_app, seed_items

pytestmark = pytest.mark.integration


def _token(app: Flask, name: str, days: int = 30) -> str:
    with app.app_context():
        user = db.session.execute(db.select(User).where(User.username == name)).scalar_one()
        token = issue_token(user, "test", days)
        db.session.commit()
        return token


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_api_next_label_export(app: Flask, client: FlaskClient, db_conn: Any) -> None:
    seed_items(db_conn, 2)
    add_user(app, "ann")
    add_user(app, "boss", "admin")
    ann, boss = _token(app, "ann"), _token(app, "boss")
    with app.app_context():
        stored = db.session.execute(db.select(ApiToken.token_hash)).scalars().all()
    assert ann not in stored
    assert all(len(h) == 64 for h in stored)

    assert client.post("/api/v1/next").status_code == 401
    assert client.post("/api/v1/next", headers=_auth("ra_forged")).status_code == 401
    got = client.post("/api/v1/next", headers=_auth(ann)).get_json()["assignment"]
    aid = got["assignment_id"]
    assert got["item"]["policy"] == {"name": "hate", "version": 1}
    assert [s["evidence"] for s in got["item"]["segments"]] == [False, True, False]

    bad = client.post(
        f"/api/v1/assignments/{aid}/label",
        headers=_auth(ann),
        json={"answer": {"violates": "perhaps"}},
    )
    assert bad.status_code == 422
    assert "violates" in bad.get_json()["fields"]
    assert (
        client.post(
            f"/api/v1/assignments/{aid}/label", headers=_auth(ann), data="not json"
        ).status_code
        == 400
    )
    assert (
        client.post(
            f"/api/v1/assignments/{aid}/label",
            headers=_auth(boss),
            json={"answer": {"violates": "no"}},
        ).status_code
        == 404
    )
    ok = client.post(
        f"/api/v1/assignments/{aid}/label",
        headers=_auth(ann),
        json={"answer": {"violates": "no"}, "time_on_task_ms": 1500},
    )
    assert ok.status_code == 201
    again = client.post(
        f"/api/v1/assignments/{aid}/label", headers=_auth(ann), json={"answer": {"violates": "no"}}
    )
    assert again.status_code == 409

    assert client.get("/api/v1/export", headers=_auth(ann)).status_code == 403
    lines = client.get("/api/v1/export?format=jsonl", headers=_auth(boss)).get_data(as_text=True)
    [record] = [json.loads(line) for line in lines.splitlines()]
    assert record["assignment_id"] == aid
    assert record["coder"] == "ann"
    assert record["answer"]["violates"] == "no"
    assert record["language"] == "en"
    assert client.get("/api/v1/export?format=xml", headers=_auth(boss)).status_code == 400


def test_api_ignores_session_cookies_and_refuses_expired_tokens(app: Flask) -> None:
    add_user(app, "ann")
    client = app.test_client()
    login(client, "ann")
    assert client.post("/api/v1/next").status_code == 401  # a cookie alone is not enough
    token = _token(app, "ann")
    with app.app_context():
        db.session.execute(text("UPDATE ra_api_tokens SET expires_at = now() - interval '1 s'"))
        db.session.commit()
    assert client.post("/api/v1/next", headers=_auth(token)).status_code == 401


def _label(
    app: Flask, cid: int, name: str, answer: dict[str, Any], codebook_version: str = "1"
) -> None:
    """Store a finished assignment and label directly (the form path is tested elsewhere)."""
    with app.app_context():
        uid = db.session.execute(db.select(User.id).where(User.username == name)).scalar_one()
        aid = db.session.execute(
            text("""INSERT INTO ra_assignments (classification_id, user_id, batch_id, status,
                    source, completed_at) VALUES (:cid, :uid, 'batch-1', 'done', 'queue', now())
                    RETURNING id"""),
            {"cid": cid, "uid": uid},
        ).scalar_one()
        db.session.execute(
            text("""INSERT INTO ra_labels (assignment_id, classification_id, user_id, answer,
                    time_on_task_ms, codebook_version)
                    VALUES (:aid, :cid, :uid, CAST(:answer AS jsonb), 1000, :version)"""),
            {
                "aid": aid,
                "cid": cid,
                "uid": uid,
                "answer": json.dumps(answer),
                "version": codebook_version,
            },
        )
        db.session.commit()


def test_agreement_disagreements_progress_and_export(ra_env: dict[str, str], db_conn: Any) -> None:
    ids = seed_items(db_conn, 5)
    app = make_app({**ra_env, "RA_DOUBLE_CODED_SHARE": "1"})
    for name in ("ann", "bob"):
        add_user(app, name)
    add_user(app, "boss", "admin")
    # violates: ann yes,yes,no,no / bob yes,no,no,no
    # p_o = 3/4; ann marginals yes 2 no 2, bob yes 1 no 3 -> p_e = (2*1 + 2*3)/16 = 1/2
    # Cohen's kappa = (3/4 - 1/2) / (1 - 1/2) = 0.5.
    # Krippendorff's alpha (nominal): coincidences n=8, yes 3, no 5; D_o = 2/8 disagreeing,
    # D_e = 2*3*5/(8*7) = 30/56 -> alpha = 1 - (2/8)/(30/56) = 1 - 14/30 = 0.5333...
    ann = ["yes", "yes", "no", "no"]
    bob = ["yes", "no", "no", "no"]
    client = app.test_client()
    login(client, "boss")
    with app.app_context():
        from ra_app import assignment

        assignment.sync_queue()
    for cid, a, b in zip(ids[:4], ann, bob, strict=True):
        _label(app, cid, "ann", {"violates": a, "severity": None, "categories": [], "notes": "x"})
        _label(app, cid, "bob", {"violates": b, "severity": None, "categories": [], "notes": "y"})
    # labels under an older codebook (an option since removed) are never compared
    old = ids[4]
    _label(app, old, "ann", {"violates": "maybe"}, codebook_version="0")
    _label(app, old, "bob", {"violates": "no"}, codebook_version="0")

    page = client.get("/admin/agreement").get_data(as_text=True)
    assert "0.500" in page
    assert "0.533" in page
    with app.app_context():
        from ra_app import reports
        from ra_app.codebook_support import get_codebook

        report = reports.agreement_figures(get_codebook())
    overall = report.field("violates").overall
    assert overall.kappa == pytest.approx(0.5)
    assert overall.alpha == pytest.approx(1 - 14 / 30)
    assert overall.items == 4
    assert overall.coders == 2

    dis = client.get("/admin/disagreements").get_data(as_text=True)
    assert f"/admin/items/{ids[1]}" in dis  # the one item they differ on ...
    for cid in (ids[0], ids[2], ids[3], old):  # ... notes differ but do not count
        assert f"/admin/items/{cid}" not in dis
    assert "ann" in client.get(f"/admin/items/{ids[1]}").get_data(as_text=True)

    progress = client.get("/admin/").get_data(as_text=True)
    assert "ann" in progress
    assert "bob" in progress
    assert "batch-1" in client.get("/admin/batches").get_data(as_text=True)

    exported = client.get("/admin/export.csv")
    assert exported.headers["Content-Disposition"].endswith('ra_labels.csv"')
    rows = list(csv.DictReader(io.StringIO(exported.get_data(as_text=True))))
    assert len(rows) == 10  # export keeps every label, each with its codebook version
    assert {r["coder"] for r in rows} == {"ann", "bob"}
    assert sorted(r["codebook_version"] for r in rows) == ["0", "0"] + ["1"] * 8
    assert rows[0]["rel_path"] == "calls/clip0000.mp3"
    assert rows[0]["coders_needed"] == "2"
    assert client.get("/admin/export.xml").status_code == 404


def test_admin_creates_and_deactivates_users(
    admin_client: tuple[FlaskClient, str], app: Flask
) -> None:
    client, token = admin_client
    created = client.post(
        "/admin/users",
        data={"csrf_token": token, "username": "newra", "password": "long-enough-pw", "role": "ra"},
    )
    assert created.status_code == 302
    dup = client.post(
        "/admin/users",
        data={"csrf_token": token, "username": "newra", "password": "long-enough-pw", "role": "ra"},
        follow_redirects=True,
    )
    assert "already exists" in dup.get_data(as_text=True)
    ra = app.test_client()
    login(ra, "newra", "long-enough-pw")
    with app.app_context():
        uid = db.session.execute(db.select(User.id).where(User.username == "newra")).scalar_one()
    client.post(f"/admin/users/{uid}/active", data={"csrf_token": token, "active": "0"})
    assert ra.get("/").status_code == 302
    page = client.post(
        f"/admin/users/{uid}/tokens", data={"csrf_token": token, "name": "script", "days": "7"}
    )
    assert "ra_" in page.get_data(as_text=True)


def test_audio_streams_with_range_after_access_check(
    app: Flask, db_conn: Any, s3_client: Any, pipeline_env: dict[str, str]
) -> None:
    seed_items(db_conn, 1)
    key = db_conn.execute("SELECT opus_s3_key FROM audio_files").fetchone()["opus_s3_key"]
    payload = bytes(range(256)) * 40
    s3_client.put_object(Bucket=pipeline_env["S3_BUCKET"], Key=key, Body=payload)
    add_user(app, "ann")
    add_user(app, "bob")
    ann, bob = app.test_client(), app.test_client()
    token = login(ann, "ann")
    login(bob, "bob")
    aid = ann.post("/next", data={"csrf_token": token}).headers["Location"].rsplit("/", 1)[1]
    whole = ann.get(f"/audio/{aid}")
    assert whole.status_code == 200
    assert whole.data == payload
    assert whole.headers["Accept-Ranges"] == "bytes"
    part = ann.get(f"/audio/{aid}", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.data == payload[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(payload)}"
    assert ann.get(f"/audio/{aid}", headers={"Range": "bytes=99999-"}).status_code == 416
    assert bob.get(f"/audio/{aid}").status_code == 404


def test_healthz(app: Flask, client: FlaskClient, ra_env: dict[str, str]) -> None:
    ok = client.get("/healthz")
    assert ok.status_code == 200
    assert ok.get_json() == {"status": "ok", "database": "ok"}
    down = create_down_app(ra_env)
    response = down.test_client().get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["database"] == "unreachable"


def create_down_app(env: dict[str, str]) -> Flask:
    from ra_app.factory import create_app

    dead = env["DATABASE_URL"].rsplit("@", 1)[0] + "@127.0.0.1:1/nowhere"
    return create_app({"ENVIRON": {**env, "DATABASE_URL": dead}, "TESTING": True})


def test_token_expiry_is_stored(app: Flask) -> None:
    add_user(app, "ann")
    _token(app, "ann", days=3)
    with app.app_context():
        expires = db.session.execute(db.select(ApiToken.expires_at)).scalar_one()
    assert timedelta(days=2.9) < expires - datetime.now(UTC) <= timedelta(days=3)
