"""bench/seed_ra_db.py against the real PostgreSQL of the local stack, at a tiny size."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from audio_pipeline.config import Settings
from bench import seed_ra_db

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SEEDER = [sys.executable, "-m", "bench.seed_ra_db"]  # run from REPO, as the benchmark runs it
FILES, CLASSIFICATIONS, PER_BATCH = 120, 1000, 50  # 1000 = 120 x 8 + 40: uneven on purpose


def _run(url: str, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    args = [
        *SEEDER,
        url,
        "--files",
        str(FILES),
        "--classifications",
        str(CLASSIFICATIONS),
        "--files-per-batch",
        str(PER_BATCH),
        "--flagged-share",
        "0.1",
        "--seed",
        "7",
        *extra,
    ]
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


def _counts(conn: psycopg.Connection) -> dict[str, int]:
    tables = ("batches", "audio_files", "transcripts", "policies", "classifications")
    return {t: conn.execute(f"SELECT count(*) AS n FROM {t}").fetchone()["n"] for t in tables}


def _schema_objects(conn: psycopg.Connection) -> list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT indexname AS name, indexdef AS def FROM pg_indexes WHERE schemaname = 'public' "
        "UNION ALL SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2"
    ).fetchall()
    return [(r["name"], r["def"]) for r in rows]


def test_seeds_the_counts_and_ra_queue_lists_the_flagged_rows(
    pipeline_env: dict[str, str], settings: Settings, db_conn: psycopg.Connection
) -> None:
    schema_before = _schema_objects(db_conn)
    db_conn.commit()

    done = _run(settings.database_url, pipeline_env, "--with-words")

    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    expected = {
        "batches": 3,
        "audio_files": FILES,
        "transcripts": FILES,
        "policies": 5,
        "classifications": CLASSIFICATIONS,
    }
    assert summary["counts"] == expected
    assert _counts(db_conn) == expected
    # keys and indexes set aside for the COPY are back exactly as schema.sql made them
    assert _schema_objects(db_conn) == schema_before

    per_file = db_conn.execute(
        "SELECT count(*) AS n FROM classifications GROUP BY audio_id ORDER BY 1"
    ).fetchall()
    assert {r["n"] for r in per_file} == {8, 9}
    flagged = db_conn.execute(
        "SELECT count(*) AS n, bool_and(score >= threshold) AS ok FROM classifications "
        "WHERE label = 1"
    ).fetchone()
    assert flagged["ok"]
    assert summary["flagged"] == flagged["n"]
    assert 50 <= flagged["n"] <= 150  # 10% of 1000, loosely
    assert db_conn.execute(
        "SELECT bool_and(score < threshold) AS ok FROM classifications WHERE label = 0"
    ).fetchone()["ok"]

    # the RA app reads the queue as its own role
    with psycopg.connect(pipeline_env["DATABASE_URL"]) as ra:
        queue = ra.execute(
            "SELECT q.classification_id, q.evidence, q.policy_name, q.policy_version, "
            "q.opus_s3_key, t.segments FROM ra_queue q JOIN transcripts t "
            "ON t.audio_id = q.audio_id ORDER BY q.score DESC, q.classification_id"
        ).fetchall()
    assert len(queue) == flagged["n"]
    for _, evidence, policy, version, opus_key, segments in queue:
        (hit,) = evidence
        segment = segments[hit["segment"]]
        assert (hit["start"], hit["end"]) == (segment["start"], segment["end"])
        assert segment["words"], "--with-words gives word timings"
        assert (policy, version) in {
            ("hate_speech", 1),
            ("hate_speech", 2),
            ("harassment", 1),
            ("violent_threats", 1),
            ("self_harm", 1),
        }
        assert opus_key.startswith("audio/seed-")
        assert opus_key.endswith(".opus")

    # new rows from the pipeline get ids after the seeded ones
    next_id = db_conn.execute("SELECT nextval('classifications_id_seq') AS n").fetchone()["n"]
    assert next_id == CLASSIFICATIONS + 1


def test_rows_in_the_database_are_the_seeds_deterministic_rows(
    pipeline_env: dict[str, str], settings: Settings, db_conn: psycopg.Connection
) -> None:
    assert _run(settings.database_url, pipeline_env).returncode == 0
    spec = seed_ra_db.SeedSpec(
        files=FILES,
        classifications=CLASSIFICATIONS,
        files_per_batch=PER_BATCH,
        flagged_share=0.1,
        seed=7,
    )
    policy_ids = [
        r["id"] for r in db_conn.execute("SELECT id FROM policies ORDER BY id").fetchall()
    ]
    generated = dict(seed_ra_db.table_rows(spec, policy_ids))
    # everything but the JSON column, which jsonb re-serialises
    expected = "".join(line.rsplit("\t", 1)[0] + "\n" for line in generated.pop("classifications"))
    query = (
        "COPY (SELECT id, audio_id, policy_id, model, score, label, threshold "
        "FROM classifications ORDER BY id) TO STDOUT"
    )
    with db_conn.cursor() as cur, cur.copy(query) as copy:
        stored = b"".join(bytes(data) for data in copy).decode()
    assert hashlib.sha256(stored.encode()).hexdigest() == (
        hashlib.sha256(expected.encode()).hexdigest()
    )


def test_same_seed_gives_the_same_rows_and_another_seed_does_not() -> None:

    def digest(n: int) -> str:
        spec = seed_ra_db.SeedSpec(files=40, classifications=300, files_per_batch=16, seed=n)
        h = hashlib.sha256()
        for table, lines in seed_ra_db.table_rows(spec, [1, 2, 3, 4, 5]):
            h.update(table.encode())
            for line in lines:
                h.update(line.encode())
        return h.hexdigest()

    assert digest(3) == digest(3)
    assert digest(3) != digest(4)


def test_a_database_with_data_is_refused_and_left_as_it_was(
    pipeline_env: dict[str, str], settings: Settings, db_conn: psycopg.Connection
) -> None:
    assert _run(settings.database_url, pipeline_env).returncode == 0
    before = _counts(db_conn)
    db_conn.commit()

    again = _run(settings.database_url, pipeline_env)

    assert again.returncode == 1
    assert "already holds pipeline rows" in again.stderr
    assert _counts(db_conn) == before


def test_ra_app_role_cannot_seed(pipeline_env: dict[str, str], db_conn: psycopg.Connection) -> None:
    done = _run(pipeline_env["DATABASE_URL"], pipeline_env)
    assert done.returncode == 1
    assert "permission denied" in done.stderr
    assert sum(_counts(db_conn).values()) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--files", "0"], "files must be at least 1"),
        (["--classifications", "2000"], "classifications must be 0..1200"),
        (
            ["--classifications", "10", "--flagged-share", "1.5"],
            "flagged_share must be within 0..1",
        ),
    ],
)
def test_impossible_sizes_are_rejected_before_connecting(args: list[str], message: str) -> None:
    done = subprocess.run(
        [*SEEDER, "postgresql://nobody@127.0.0.1:1/none", "--files", "120", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert message in done.stderr
