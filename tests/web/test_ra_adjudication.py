"""Adjudication: an admin records an item's final label from the disagreements list.

The study: three flagged items (scores 0.9, 0.8, 0.7, threshold 0.5), each coded by
ann and bob: 0.9 yes/no (a tie), 0.8 yes/yes, 0.7 no/no.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, NamedTuple

import pytest
from flask import Flask
from flask.testing import FlaskClient

from ra_app import assignment, pipeline, reports
from ra_app.codebook_support import get_codebook
from ra_app.evaluation_source import evaluate_study
from ra_app.extensions import db
from ra_app.labels import record_label
from ra_app.models import Adjudication, User
from tests.support.web import add_user, csrf_token, login, make_app, seed_scored

pytestmark = pytest.mark.integration

# score -> (ann's, bob's) verdict
PLAN = {0.9: ("yes", "no"), 0.8: ("yes", "yes"), 0.7: ("no", "no")}


class Study(NamedTuple):
    app: Flask
    ids: dict[float, int]  # score -> classification id


@pytest.fixture
def study(ra_env: dict[str, str], db_conn: Any) -> Study:
    scores = list(PLAN)
    ids = dict(zip(scores, seed_scored(db_conn, scores), strict=True))
    app = make_app({**ra_env, "RA_DOUBLE_CODED_SHARE": "1"})
    add_user(app, "ann")
    add_user(app, "bob")
    add_user(app, "boss", "admin")
    with app.app_context():
        for who, name in enumerate(("ann", "bob")):
            user = db.session.execute(db.select(User).where(User.username == name)).scalar_one()
            while (a := assignment.next_assignment(user)) is not None:
                item = pipeline.item_detail(a.classification_id)
                assert item is not None
                verdict = PLAN[round(item.score, 2)][who]
                record_label(a.id, user, {"violates": verdict}, 1000)
    return Study(app, ids)


def _adjudicate(client: FlaskClient, cid: int, **form: Any) -> Any:
    token = csrf_token(client, f"/admin/items/{cid}")
    return client.post(f"/admin/items/{cid}/adjudicate", data={"csrf_token": token, **form})


def _flagged_figures(app: Flask) -> dict[str, Any]:
    with app.app_context():
        groups = evaluate_study(get_codebook(), 0.9)
    assert groups is not None
    assert len(groups) == 1
    return groups[0].as_json()


def test_an_admin_records_the_final_label_from_the_disagreements_list(study: Study) -> None:
    app, tie = study.app, study.ids[0.9]
    admin = app.test_client()
    login(admin, "boss")
    listing = admin.get("/admin/disagreements").get_data(as_text=True)
    assert f'href="/admin/items/{tie}#adjudication">Adjudicate</a>' in listing
    page = admin.get(f"/admin/items/{tie}").get_data(as_text=True)
    assert 'id="adjudication-form"' in page
    assert "No final label yet" in page

    # validated like a coder's label: an unknown option and a missing note are refused
    bad = _adjudicate(admin, tie, violates="perhaps", adjudication_note=" ")
    assert bad.status_code == 400
    html = bad.get_data(as_text=True)
    assert "A note saying why is required." in html
    with app.app_context():
        assert db.session.execute(db.select(Adjudication)).first() is None

    # a form without its CSRF token saves nothing
    forged = admin.post(
        f"/admin/items/{tie}/adjudicate", data={"violates": "yes", "adjudication_note": "x"}
    )
    assert forged.status_code == 400  # CSRFProtect refuses it before the view
    with app.app_context():
        assert db.session.execute(db.select(Adjudication)).first() is None

    ok = _adjudicate(
        admin, tie, violates="yes", severity="medium", adjudication_note="Slur at 0:04."
    )
    assert ok.status_code == 302
    assert ok.headers["Location"] == f"/admin/items/{tie}"
    page = admin.get(f"/admin/items/{tie}").get_data(as_text=True)
    assert '<strong class="decided-by">boss</strong>' in page
    assert "Slur at 0:04." in page
    listing = admin.get("/admin/disagreements").get_data(as_text=True)
    assert '<span class="tag">violates: yes</span>' in listing
    assert "<small>by boss</small>" in listing

    # a later decision replaces it as the current one; the first stays as history
    again = _adjudicate(admin, tie, violates="no", adjudication_note="Reconsidered: quoted.")
    assert again.status_code == 302
    with app.app_context():
        rows = db.session.execute(db.select(Adjudication).order_by(Adjudication.id)).scalars()
        decisions = [(d.answer["violates"], d.answer["severity"], d.note) for d in rows]
    assert decisions == [
        ("yes", "medium", "Slur at 0:04."),
        ("no", None, "Reconsidered: quoted."),
    ]
    page = admin.get(f"/admin/items/{tie}").get_data(as_text=True)
    assert "Earlier decisions" in page
    assert "Reconsidered: quoted." in page


def test_exports_carry_the_final_label_who_and_when(study: Study) -> None:
    app, tie = study.app, study.ids[0.9]
    admin = app.test_client()
    login(admin, "boss")
    assert _adjudicate(admin, tie, violates="yes", adjudication_note="=clear").status_code == 302
    with app.app_context():
        decided_at = db.session.execute(db.select(Adjudication.decided_at)).scalar_one()

    rows = list(csv.DictReader(io.StringIO(admin.get("/admin/export.csv").get_data(as_text=True))))
    assert len(rows) == 6  # two coders x three items
    by_item: dict[int, list[dict[str, str]]] = {}
    for r in rows:
        by_item.setdefault(int(r["classification_id"]), []).append(r)
    for r in by_item[tie]:
        assert r["final_violates"] == "yes"
        assert r["final_decided_by"] == "boss"
        assert r["final_decided_at"] == decided_at.isoformat()
        assert r["final_note"] == "'=clear"  # neutralised like every exported note
    assert sorted(r["answer_violates"] for r in by_item[tie]) == ["no", "yes"]  # coders kept
    for cid in (study.ids[0.8], study.ids[0.7]):
        for r in by_item[cid]:
            assert (r["final_violates"], r["final_decided_by"], r["final_decided_at"]) == (
                "",
                "",
                "",
            )

    lines = admin.get("/admin/export.jsonl").get_data(as_text=True).splitlines()
    records = [json.loads(line) for line in lines]
    tied = [r for r in records if r["classification_id"] == tie]
    assert len(tied) == 2
    for r in tied:
        assert r["final_answer"]["violates"] == "yes"
        assert r["final_decided_by"] == "boss"
        assert r["final_decided_at"] == decided_at.isoformat()
    other = [r for r in records if r["classification_id"] != tie]
    assert all(r["final_answer"] is None and r["final_decided_by"] is None for r in other)


def test_evaluation_takes_the_final_label_and_agreement_ignores_it(study: Study) -> None:
    app, tie = study.app, study.ids[0.9]
    with app.app_context():
        agreement_before = reports.agreement_figures(get_codebook())
    before = _flagged_figures(app)
    # by hand: decided 0.8 (yes/yes: positive) and 0.7 (no/no: negative); 0.9 is a tie
    assert (before["decided_flagged"], before["positives_flagged"]) == (2, 1)
    assert before["undecided_ties"] == 1
    assert before["precision"] == pytest.approx(0.5)

    admin = app.test_client()
    login(admin, "boss")
    assert _adjudicate(admin, tie, violates="yes", adjudication_note="Clear.").status_code == 302
    after = _flagged_figures(app)
    # by hand: the tie is now a positive: 2 positives of 3 decided
    assert (after["decided_flagged"], after["positives_flagged"]) == (3, 2)
    assert (after["undecided_ties"], after["adjudicated"]) == (0, 1)
    assert after["precision"] == pytest.approx(2 / 3)

    with app.app_context():
        agreement_after = reports.agreement_figures(get_codebook())
    assert agreement_after == agreement_before
    violates = agreement_after.field("violates").overall
    # by hand: 2 of the 3 double-coded items agree
    assert violates.observed_agreement == pytest.approx(2 / 3)
    assert violates.items == 3


def test_research_assistants_may_not_adjudicate(study: Study) -> None:
    app, tie = study.app, study.ids[0.9]
    ra = app.test_client()
    token = login(ra, "ann")
    assert ra.get(f"/admin/items/{tie}").status_code == 403
    response = ra.post(
        f"/admin/items/{tie}/adjudicate",
        data={"csrf_token": token, "violates": "yes", "adjudication_note": "mine"},
    )
    assert response.status_code == 403
    with app.app_context():
        assert db.session.execute(db.select(Adjudication)).first() is None
