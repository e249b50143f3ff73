"""schema.sql: constraints, the ra_queue view, the ownership model, idempotency."""

import psycopg
import pytest
from psycopg.rows import dict_row

from audio_pipeline.db import SCHEMA_PATH, apply_schema
from tests.support.rows import (
    add_audio_file,
    add_batch,
    add_classification,
    add_policy,
    add_transcript,
)

pytestmark = pytest.mark.integration


def _seed(conn) -> dict[str, int]:
    add_batch(conn, "b-1")
    ids = {path: add_audio_file(conn, "b-1", path, "done") for path in ("a.mp3", "dir/b.mp3")}
    pol = add_policy(conn, "harassment", "# Policy", lexicon=["idiot"])
    add_transcript(conn, ids["a.mp3"], "hi", model="tiny.en", backend="fw")
    for path, score in (("a.mp3", 0.9), ("dir/b.mp3", 0.1)):
        add_classification(conn, ids[path], pol, score, model="lexicon")
    conn.commit()
    return ids


def _snapshot(conn) -> dict[str, list]:
    tables = ["batches", "audio_files", "transcripts", "policies", "classifications"]
    return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}


def test_applying_twice_changes_nothing_and_loses_nothing(settings, db_conn):
    _seed(db_conn)
    before = _snapshot(db_conn)
    catalog = "SELECT count(*) AS n FROM pg_class WHERE relnamespace = 'public'::regnamespace"
    objects_before = db_conn.execute(catalog).fetchone()["n"]
    db_conn.commit()
    apply_schema(settings.database_url)
    apply_schema(settings.database_url)
    assert _snapshot(db_conn) == before
    assert db_conn.execute(catalog).fetchone()["n"] == objects_before


def test_ra_queue_lists_only_flagged_items(db_conn):
    ids = _seed(db_conn)
    rows = db_conn.execute("SELECT * FROM ra_queue").fetchall()
    assert [r["audio_id"] for r in rows] == [ids["a.mp3"]]
    row = rows[0]
    assert (row["policy_name"], row["policy_version"], row["model"]) == ("harassment", 1, "lexicon")
    assert row["score"] == pytest.approx(0.9)
    assert row["batch_id"] == "b-1"


def test_natural_keys_reject_duplicates(db_conn):
    _seed(db_conn)
    with pytest.raises(psycopg.errors.UniqueViolation):
        db_conn.execute("INSERT INTO audio_files (batch_id, rel_path) VALUES ('b-1', 'a.mp3')")


@pytest.mark.parametrize(
    ("statement", "error"),
    [
        ("INSERT INTO batches (batch_id, s3_key) VALUES ('../evil', 'k')", "CheckViolation"),
        ("INSERT INTO batches (batch_id, s3_key) VALUES ('b/1', 'k')", "CheckViolation"),
        ("INSERT INTO audio_files (batch_id, rel_path) VALUES ('b-1', '/etc/x')", "CheckViolation"),
        (
            "INSERT INTO classifications (audio_id, policy_id, model, score, label, threshold) "
            "SELECT id, (SELECT id FROM policies), 'm', 1.5, 1, 0.5 FROM audio_files LIMIT 1",
            "CheckViolation",
        ),
        ("INSERT INTO policies (name, version, text) VALUES ('p', 0, 'x')", "CheckViolation"),
    ],
)
def test_constraints_reject_bad_rows(db_conn, statement, error):
    _seed(db_conn)
    with pytest.raises(getattr(psycopg.errors, error)):
        db_conn.execute(statement)


def test_ra_app_role_reads_pipeline_tables_but_cannot_write_them(settings, pipeline_env, db_conn):
    _seed(db_conn)
    with psycopg.connect(pipeline_env["DATABASE_URL"], row_factory=dict_row) as ra:
        assert ra.execute("SELECT count(*) AS n FROM ra_queue").fetchone()["n"] == 1
        assert ra.execute("SELECT count(*) AS n FROM transcripts").fetchone()["n"] == 1
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            ra.execute("DELETE FROM classifications")
        ra.rollback()
        # the RA app owns what it creates
        ra.execute("CREATE TABLE ra_probe (id int)")
        ra.execute("INSERT INTO ra_probe VALUES (1)")
        ra.commit()


def test_schema_never_names_ra_tables():
    text = SCHEMA_PATH.read_text().lower()
    code = "\n".join(line.split("--")[0] for line in text.splitlines())
    assert "ra_users" not in code
    assert "ra_assignments" not in code
    assert "ra_labels" not in code
