"""Exports: safe to open in a spreadsheet, and complete after the pipeline deletes a batch."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from flask_migrate import upgrade
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError

from ra_app.export import unneutralise
from ra_app.extensions import db
from ra_app.factory import create_app
from ra_app.models import User
from ra_app.security import issue_token
from tests.support.web import add_user, login, seed_items

pytestmark = pytest.mark.integration

EVIL_NAME = '=HYPERLINK("http://x","y").mp3'
EVIL_TRANSCRIPT = "-2+3 call me at once"


def _label_all_by_api(app: Flask, name: str, notes: list[str]) -> list[int]:
    """``name`` labels one item per note through the API; the assignment ids."""
    with app.app_context():
        user = db.session.execute(db.select(User).where(User.username == name)).scalar_one()
        token = issue_token(user, "export-test", 1)
        db.session.commit()
    client, auth = app.test_client(), {"Authorization": f"Bearer {token}"}
    done = []
    for note in notes:
        got = client.post("/api/v1/next", headers=auth).get_json()["assignment"]
        answer = {"violates": "yes", "categories": ["hate_speech"], "notes": note}
        saved = client.post(
            f"/api/v1/assignments/{got['assignment_id']}/label",
            headers=auth,
            json={"answer": answer, "time_on_task_ms": 1000},
        )
        assert saved.status_code == 201, saved.get_json()
        done.append(int(got["assignment_id"]))
    return done


def _export(admin: FlaskClient, fmt: str) -> str:
    response = admin.get(f"/admin/export.{fmt}")
    assert response.status_code == 200
    return response.get_data(as_text=True)


def test_exports_neutralise_spreadsheet_formulas(
    app: Flask, admin_client: tuple[FlaskClient, str], db_conn: Any
) -> None:
    admin, _ = admin_client
    ids = seed_items(db_conn, 4, scores=[0.9, 0.8, 0.7, 0.6])
    audio = db_conn.execute(
        "SELECT audio_id FROM classifications WHERE id = %s", (ids[0],)
    ).fetchone()["audio_id"]
    db_conn.execute("UPDATE audio_files SET rel_path = %s WHERE id = %s", (EVIL_NAME, audio))
    db_conn.execute(
        "UPDATE transcripts SET text = %s WHERE audio_id = %s", (EVIL_TRANSCRIPT, audio)
    )
    db_conn.commit()
    add_user(app, "ann")
    for cid, spoken in ((ids[1], "\tindented"), (ids[2], "\rreturned")):
        db_conn.execute(
            "UPDATE transcripts t SET text = %s FROM classifications c "
            "WHERE c.id = %s AND t.audio_id = c.audio_id",
            (spoken, cid),
        )
    db_conn.commit()
    # The codebook strips a note's surrounding blanks, so tab and CR come from transcripts.
    notes = ["@SUM(1+1)*cmd|' /C calc'!A0", "+1", "'quoted already", "plain words"]
    _label_all_by_api(app, "ann", notes)  # score order: ids[0] first

    text = _export(admin, "csv")
    assert text.splitlines()[1].startswith('"')  # every cell quoted, numbers too
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["classification_id"] for r in rows] == [str(i) for i in ids]
    first = rows[0]
    assert first["rel_path"] == "'" + EVIL_NAME
    assert first["transcript"] == "'" + EVIL_TRANSCRIPT
    assert [r["answer_notes"] for r in rows] == [
        "'@SUM(1+1)*cmd|' /C calc'!A0",
        "'+1",
        "''quoted already",
        "plain words",
    ]
    assert first["score"] == "0.9"  # numbers are left as they are
    assert rows[1]["rel_path"] == "calls/clip0001.mp3"
    assert [r["transcript"] for r in rows[1:3]] == ["'\tindented", "'\rreturned"]
    for row in rows:  # no cell a spreadsheet would run
        assert not any(v.startswith(("=", "+", "-", "@", "\t", "\r")) for v in row.values())

    records = [json.loads(line) for line in _export(admin, "jsonl").splitlines()]
    assert records[0]["rel_path"] == "'" + EVIL_NAME
    assert records[0]["transcript"] == "'" + EVIL_TRANSCRIPT
    assert records[0]["score"] == pytest.approx(0.9)
    assert [r["answer"]["notes"] for r in records] == [r["answer_notes"] for r in rows]
    assert [r["transcript"] for r in records[1:3]] == ["'\tindented", "'\rreturned"]
    assert records[0]["answer"]["categories"] == ["hate_speech"]
    # A program gets every raw value back by dropping one leading quote.
    assert unneutralise(records[0]["rel_path"]) == EVIL_NAME
    assert [unneutralise(r["answer"]["notes"]) for r in records] == notes
    assert unneutralise(records[1]["rel_path"]) == "calls/clip0001.mp3"


def test_api_export_is_neutralised_too(app: Flask, db_conn: Any) -> None:
    seed_items(db_conn, 1)
    add_user(app, "ann")
    add_user(app, "boss", "admin")
    _label_all_by_api(app, "ann", ["=1+1"])
    with app.app_context():
        boss = db.session.execute(db.select(User).where(User.username == "boss")).scalar_one()
        token = issue_token(boss, "export", 1)
        db.session.commit()
    client = app.test_client()
    auth = {"Authorization": f"Bearer {token}"}
    [line] = (
        client.get("/api/v1/export?format=jsonl", headers=auth).get_data(as_text=True).splitlines()
    )
    assert json.loads(line)["answer"]["notes"] == "'=1+1"
    rows = list(
        csv.DictReader(
            io.StringIO(
                client.get("/api/v1/export?format=csv", headers=auth).get_data(as_text=True)
            )
        )
    )
    assert rows[0]["answer_notes"] == "'=1+1"
    login(client, "ann")  # an RA's session never reaches the export
    assert client.get("/admin/export.csv").status_code == 403


def test_deleting_a_batch_keeps_its_labels_in_the_export(
    app: Flask, admin_client: tuple[FlaskClient, str], db_conn: Any
) -> None:
    admin, _ = admin_client
    gone = seed_items(db_conn, 2, "b-gone", scores=[0.9, 0.8])
    [kept] = seed_items(db_conn, 1, "b-kept", scores=[0.7])
    add_user(app, "ann")
    _label_all_by_api(app, "ann", ["first", "second", "third"])

    # The pipeline, as its own role, deletes one batch and re-scores the other's item.
    db_conn.execute("DELETE FROM batches WHERE batch_id = 'b-gone'")
    db_conn.execute("UPDATE classifications SET score = 0.55 WHERE id = %s", (kept,))
    db_conn.commit()
    assert (
        db_conn.execute(
            "SELECT count(*) AS n FROM classifications WHERE id = ANY(%s)", (gone,)
        ).fetchone()["n"]
        == 0
    )

    rows = list(csv.DictReader(io.StringIO(_export(admin, "csv"))))
    records = [json.loads(line) for line in _export(admin, "jsonl").splitlines()]
    assert [r["classification_id"] for r in records] == [*gone, kept]
    assert [r["answer"]["notes"] for r in records] == ["first", "second", "third"]
    facts = zip(records, [0.9, 0.8, 0.7], ["clip0000", "clip0001", "clip0000"], strict=True)
    for record, score, rel in facts:
        assert record["rel_path"] == f"calls/{rel}.mp3"
        assert record["score"] == pytest.approx(score)  # what the coder saw, not the re-score
        assert record["threshold"] == pytest.approx(0.5)
        assert record["policy_name"] == "hate"
        assert record["policy_version"] == 1
        assert record["classifier_model"] == "cope-a-tiny"
        assert record["language"] == "en"
        assert record["asr_model"] == "tiny.en"
        assert record["duration_s"] == pytest.approx(7.0)
        assert record["audio_id"] is not None
    assert [r["batch_id"] for r in records] == ["b-gone", "b-gone", "b-kept"]
    assert [r["pipeline_deleted"] for r in records] == [True, True, False]
    # The transcript text is the pipeline's: deleting a batch removes its content.
    assert [bool(r["transcript"]) for r in records] == [False, False, True]
    assert [r["pipeline_deleted"] for r in rows] == ["True", "True", "False"]
    assert [r["batch_id"] for r in rows] == ["b-gone", "b-gone", "b-kept"]
    assert [r["score"] for r in rows] == ["0.9", "0.8", "0.7"]


def test_the_ra_app_role_cannot_guard_pipeline_tables(app: Flask) -> None:
    """Why labels carry their facts instead of refusing a batch's deletion."""
    with app.app_context():
        db.session.execute(
            text(
                "CREATE FUNCTION ra_guard() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RETURN NULL; END $$"
            )
        )
        with pytest.raises(ProgrammingError, match="permission denied for table batches"):
            db.session.execute(
                text(
                    "CREATE TRIGGER ra_guard BEFORE DELETE ON batches FOR EACH ROW "
                    "EXECUTE FUNCTION ra_guard()"
                )
            )
        db.session.rollback()
        with pytest.raises(ProgrammingError, match="permission denied"):
            db.session.execute(text("DELETE FROM batches"))
        db.session.rollback()


def test_labels_made_before_the_copy_get_the_facts_on_upgrade(
    ra_env: dict[str, str], db_conn: Any
) -> None:
    [cid] = seed_items(db_conn, 1, "b-old", scores=[0.65])
    app = create_app({"ENVIRON": ra_env, "TESTING": True})
    with app.app_context():
        upgrade(revision="0002")
        uid = add_user(app, "ann")
        db.session.execute(
            text("""
            INSERT INTO ra_items (classification_id, audio_id, batch_id, policy_id, score,
                                  shuffle_key, coders_needed, open_slots)
            SELECT id, audio_id, 'b-old', policy_id, score, 0, 1, 0 FROM classifications""")
        )
        db.session.execute(
            text("""
            WITH a AS (INSERT INTO ra_assignments (classification_id, user_id, batch_id,
                       status, source) VALUES (:cid, :uid, 'b-old', 'done', 'queue')
                       RETURNING id)
            INSERT INTO ra_labels (assignment_id, classification_id, user_id, answer,
                                   time_on_task_ms)
            SELECT id, :cid, :uid, '{"violates": "no"}', 10 FROM a"""),
            {"cid": cid, "uid": uid},
        )
        db.session.commit()
        upgrade()
        row = db.session.execute(
            text("SELECT batch_id, rel_path, score, policy_name, asr_model FROM ra_labels")
        ).one()
    assert tuple(row) == ("b-old", "calls/clip0000.mp3", pytest.approx(0.65), "hate", "tiny.en")
    db_conn.execute("DELETE FROM batches")
    db_conn.commit()
    admin = app.test_client()
    add_user(app, "boss", "admin")
    login(admin, "boss")
    [record] = [json.loads(line) for line in _export(admin, "jsonl").splitlines()]
    assert record["rel_path"] == "calls/clip0000.mp3"
    assert record["pipeline_deleted"] is True
    with app.app_context():
        db.engine.dispose()
