"""Re-classification runs: what ``audio-pipeline reclassify`` asks for and how far it got.

A run names one policy version and one model; each finished file with a stored
transcript gets a ``reclassify_files`` row ('queued') and a text-only job on
``queue:classify`` (audio_pipeline/reclassify.py). The gpu worker stores the verdict
and turns the row 'done' in one transaction (``save_verdicts``); a dead-lettered job
turns it 'failed' (``fail_file``) and leaves the file and its batch as they were;
``audio-pipeline requeue`` puts it back to 'queued' (``reopen_file``).

The functions take a connection with any row factory (see records/__init__.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from audio_pipeline.classify import TextSegment, Verdict
from audio_pipeline.records import select_all, select_one
from audio_pipeline.records.policies import PolicyVersion, get_version, versions
from audio_pipeline.records.results import upsert_classifications

RECENT_RUNS = 10  # runs `audio-pipeline status` lists (newest first)


class ReclassifyError(ValueError):
    """The request names nothing that can be re-classified; the message says why."""


@dataclass(frozen=True)
class StoredTranscript:
    audio_id: int
    batch_id: str
    text: str
    segments: list[TextSegment]


@dataclass(frozen=True)
class QueuedFile:
    audio_id: int
    batch_id: str


# -- what the operator names ----------------------------------------------------------


def resolve_policy(conn: psycopg.Connection, name: str, version: int | None) -> PolicyVersion:
    """The version to judge against: ``version`` of ``name``, else its newest active one."""
    found = versions(conn, name)
    if not found:
        raise ReclassifyError(f"no policy named {name!r} (see `audio-pipeline policy list`)")
    if version is not None:
        chosen = get_version(conn, name, version)
        if chosen is None:
            known = ", ".join(str(v.version) for v in found)
            raise ReclassifyError(f"policy {name!r} has no version {version} (versions: {known})")
        return chosen
    active = [v for v in found if v.active]
    if not active:
        raise ReclassifyError(f"policy {name!r} has no active version: name one with --version N")
    return active[-1]


def check_batch(conn: psycopg.Connection, batch_id: str) -> None:
    """Only a finished batch is re-classified: its files' transcripts are final."""
    row = select_one(conn, "SELECT status FROM batches WHERE batch_id = %s", (batch_id,))
    if row is None:
        raise ReclassifyError(f"no batch {batch_id!r}")
    if row["status"] != "done":
        raise ReclassifyError(
            f"batch {batch_id!r} is not finished (status {row['status']}): its files are "
            "classified as they are transcribed; re-classify it once it is done"
        )


def models_in_use(conn: psycopg.Connection) -> list[str]:
    """Every model that has stored a verdict, most recently used first."""
    rows = select_all(
        conn,
        "SELECT model FROM classifications GROUP BY model ORDER BY max(updated_at) DESC, model",
    )
    return [r["model"] for r in rows]


# -- a run ----------------------------------------------------------------------------


def create_run(
    conn: psycopg.Connection,
    policy_id: int,
    model: str,
    batch_id: str | None,
    *,
    again: bool = False,
) -> tuple[int, list[QueuedFile]]:
    """Record a run and its files ('queued'): every file that is done, has a stored
    transcript and belongs to a finished batch (``batch_id``'s, or any), and has no
    verdict of this policy version by this model yet (unless ``again``)."""
    with conn.transaction():
        run = select_one(
            conn,
            "INSERT INTO reclassify_runs (policy_id, model, batch_id, files) "
            "VALUES (%s, %s, %s, 0) RETURNING id",
            (policy_id, model, batch_id),
        )
        assert run is not None
        run_id = int(run["id"])
        rows = select_all(
            conn,
            """
            WITH queued AS (
                INSERT INTO reclassify_files (run_id, audio_id)
                SELECT %s, a.id
                  FROM audio_files a
                  JOIN transcripts t ON t.audio_id = a.id
                  JOIN batches b ON b.batch_id = a.batch_id
                 WHERE a.status = 'done' AND b.status = 'done'
                   AND (%s::text IS NULL OR a.batch_id = %s)
                   AND (%s OR NOT EXISTS (
                        SELECT 1 FROM classifications c
                         WHERE c.audio_id = a.id AND c.policy_id = %s AND c.model = %s))
                RETURNING audio_id
            )
            SELECT q.audio_id, a.batch_id FROM queued q JOIN audio_files a ON a.id = q.audio_id
            """,
            (run_id, batch_id, batch_id, again, policy_id, model),
        )
        if not rows:
            scope = f"batch {batch_id!r}" if batch_id else "any finished batch"
            more = (
                ""
                if again
                else (
                    " that lacks a verdict of this policy version by this model "
                    "(--again judges them again)"
                )
            )
            raise ReclassifyError(f"no finished file with a stored transcript in {scope}{more}")
        conn.execute("UPDATE reclassify_runs SET files = %s WHERE id = %s", (len(rows), run_id))
    files = sorted(
        (QueuedFile(int(r["audio_id"]), r["batch_id"]) for r in rows), key=lambda f: f.audio_id
    )
    return run_id, files


def delete_run(conn: psycopg.Connection, run_id: int) -> None:
    """Withdraw a run whose jobs could not be queued (its files go with it)."""
    conn.execute("DELETE FROM reclassify_runs WHERE id = %s", (run_id,))


def run_progress(conn: psycopg.Connection, limit: int = RECENT_RUNS) -> list[dict[str, Any]]:
    """The newest runs with their files queued, done and failed."""
    return select_all(
        conn,
        """
        SELECT r.id AS run_id, p.name AS policy, p.version AS policy_version, r.model,
               r.batch_id, r.files,
               count(*) FILTER (WHERE f.status = 'queued') AS queued,
               count(*) FILTER (WHERE f.status = 'done') AS done,
               count(*) FILTER (WHERE f.status = 'failed') AS failed,
               r.created_at
          FROM reclassify_runs r
          JOIN policies p ON p.id = r.policy_id
          LEFT JOIN reclassify_files f ON f.run_id = r.id
         GROUP BY r.id, p.name, p.version
         ORDER BY r.id DESC
         LIMIT %s
        """,
        (limit,),
    )


# -- the gpu worker's side ------------------------------------------------------------


def stored_transcript(conn: psycopg.Connection, audio_id: int) -> StoredTranscript | None:
    row = select_one(
        conn,
        "SELECT a.id, a.batch_id, t.text, t.segments FROM audio_files a "
        "JOIN transcripts t ON t.audio_id = a.id WHERE a.id = %s",
        (audio_id,),
    )
    if row is None:
        return None
    segments = [
        TextSegment(float(s.get("start", 0.0)), float(s.get("end", 0.0)), str(s.get("text", "")))
        for s in row["segments"]
        if isinstance(s, dict)
    ]
    return StoredTranscript(int(row["id"]), row["batch_id"], row["text"], segments)


def save_verdicts(
    conn: psycopg.Connection, verdicts: Sequence[Verdict], done: Sequence[tuple[int, int]]
) -> None:
    """New verdicts (upserts on (audio_id, policy_id, model): a verdict of another
    version or model is another row, kept) and their run files 'done', atomically.
    ``done`` holds (run_id, audio_id) pairs."""
    with conn.transaction(), conn.cursor() as cur:
        upsert_classifications(cur, ((v.key, v) for v in verdicts))
        cur.executemany(
            "UPDATE reclassify_files SET status = 'done', error = NULL, updated_at = now() "
            "WHERE run_id = %s AND audio_id = %s",
            list(done),
        )


def fail_file(conn: psycopg.Connection, run_id: int, audio_id: int, error: str) -> bool:
    """A dead-lettered text-only job: its run file 'failed' (a done one stays done).
    The audio file and its batch are not touched: their transcript stands."""
    return bool(
        conn.execute(
            "UPDATE reclassify_files SET status = 'failed', error = %s, updated_at = now() "
            "WHERE run_id = %s AND audio_id = %s AND status <> 'done'",
            (error, run_id, audio_id),
        ).rowcount
    )


def reopen_file(conn: psycopg.Connection, run_id: int, audio_id: int) -> bool:
    """A requeued text-only job: its failed run file 'queued' again."""
    return bool(
        conn.execute(
            "UPDATE reclassify_files SET status = 'queued', error = NULL, updated_at = now() "
            "WHERE run_id = %s AND audio_id = %s AND status = 'failed'",
            (run_id, audio_id),
        ).rowcount
    )
