"""Blind review: a blind item's page and API responses show no score, flag, threshold or
evidence, so an audit item looks like a flagged one; the export keeps everything."""

from __future__ import annotations

import csv
import io
import re
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from ra_app.extensions import db
from ra_app.models import User
from ra_app.security import issue_token
from tests.support.web import add_user, login, make_app, seed_scored

pytestmark = pytest.mark.integration

FLAGGED_SCORE = 0.93
AUDIT_SCORE = 0.07
# What would give the classifier's verdict away on a page.
VERDICT_MARKS = (
    "Score</dt>",
    "threshold",
    "0.93",
    "0.07",
    "0.50",
    'class="segment evidence"',
    'class="why"',
    "flagged",
    "drove the flag",
    "audit",
    "vermin</span>",  # the evidence term is shown only beside a highlighted segment
)


def _app(ra_env: dict[str, str], db_conn: Any, blind: str) -> tuple[Flask, list[int]]:
    """One flagged and one unflagged item, the latter drawn into the audit sample."""
    ids = seed_scored(db_conn, [FLAGGED_SCORE, AUDIT_SCORE])
    app = make_app({**ra_env, "RA_AUDIT_SHARE": "1", "RA_BLIND": blind})
    add_user(app, "ann")
    add_user(app, "boss", "admin")
    return app, ids


def _review_pages(client: FlaskClient, token: str) -> dict[str, str]:
    """Claim every item through "Next item": page URL -> HTML (score order, so the
    flagged item comes first)."""
    pages = {}
    for _ in range(2):
        url = client.post("/next", data={"csrf_token": token}).headers["Location"]
        pages[url] = client.get(url).get_data(as_text=True)
        client.post(f"{url}/skip", data={"csrf_token": token})
    return pages


def _token(app: Flask, name: str) -> str:
    with app.app_context():
        user = db.session.execute(db.select(User).where(User.username == name)).scalar_one()
        token = issue_token(user, "test", 1)
        db.session.commit()
        return token


def _normalised(html: str, ids: list[int], aids: list[str]) -> str:
    """The page without what differs between any two items: ids, file names, tokens."""
    html = re.sub(r"<input[^>]*csrf_token[^>]*>", "", html)
    html = re.sub(r"scored\d+", "FILE", html)
    for n in (*ids, *aids):
        html = re.sub(rf"\b{n}\b", "ID", html)
    return html


def test_audit_items_are_blind_by_default(ra_env: dict[str, str], db_conn: Any) -> None:
    app, _ = _app(ra_env, db_conn, "audit")
    client = app.test_client()
    flagged_page, audit_page = _review_pages(client, login(client, "ann")).values()
    # the flagged item shows its verdict ...
    assert "Score</dt>" in flagged_page
    assert "0.93" in flagged_page
    assert 'class="segment evidence"' in flagged_page
    # ... the audit item nothing of it, not even that it was not flagged
    for mark in VERDICT_MARKS:
        assert mark not in audit_page, mark
    assert "You people are vermin." in audit_page  # the transcript is all there


def test_with_blind_all_an_audit_item_looks_like_a_flagged_one(
    ra_env: dict[str, str], db_conn: Any
) -> None:
    app, ids = _app(ra_env, db_conn, "all")
    client = app.test_client()
    pages = _review_pages(client, login(client, "ann"))
    aids = [u.rsplit("/", 1)[1] for u in pages]
    flagged_page, audit_page = (_normalised(p, ids, aids) for p in pages.values())
    for mark in VERDICT_MARKS:
        assert mark not in flagged_page, mark
    assert flagged_page == audit_page

    # the API's next-item answer: the same keys and values but for ids and names
    add_user(app, "bob")
    api = app.test_client()
    token = _token(app, "bob")
    items = []
    for _ in range(2):
        got = api.post("/api/v1/next", headers={"Authorization": f"Bearer {token}"}).get_json()
        assignment = got["assignment"]
        items.append(assignment["item"])
        api.post(
            f"/api/v1/assignments/{assignment['assignment_id']}/skip",
            headers={"Authorization": f"Bearer {token}"},
        )
    for item in items:
        assert "score" not in item
        assert "threshold" not in item
        assert all(set(s) == {"index", "start", "end", "text"} for s in item["segments"])
        for key in ("classification_id", "audio_id", "rel_path"):
            item.pop(key)
    assert items[0] == items[1]


def test_blind_none_shows_every_verdict(ra_env: dict[str, str], db_conn: Any) -> None:
    app, _ = _app(ra_env, db_conn, "none")
    client = app.test_client()
    _, audit_page = _review_pages(client, login(client, "ann")).values()
    assert "Score</dt>" in audit_page
    assert "0.07" in audit_page


def test_the_export_keeps_everything_of_a_blind_label(ra_env: dict[str, str], db_conn: Any) -> None:
    app, ids = _app(ra_env, db_conn, "audit")
    client = app.test_client()
    token = login(client, "ann")
    for _ in range(2):
        url = client.post("/next", data={"csrf_token": token}).headers["Location"]
        client.post(f"{url}/label", data={"csrf_token": token, "violates": "no"})
    admin = app.test_client()
    login(admin, "boss")
    rows = list(csv.DictReader(io.StringIO(admin.get("/admin/export.csv").get_data(as_text=True))))
    by_id = {int(r["classification_id"]): r for r in rows}
    flagged, audit = by_id[ids[0]], by_id[ids[1]]
    assert (flagged["entered_as"], flagged["sample_probability"], flagged["reviewed_blind"]) == (
        "flagged",
        "1.0",
        "False",
    )
    assert (audit["entered_as"], audit["sample_probability"], audit["reviewed_blind"]) == (
        "audit",
        "1.0",
        "True",
    )
    assert float(audit["score"]) == pytest.approx(AUDIT_SCORE)
    assert float(audit["threshold"]) == pytest.approx(0.5)
    # the admin's item page shows the full item
    page = admin.get(f"/admin/items/{ids[1]}").get_data(as_text=True)
    assert "0.07" in page
