"""The gpu stage's writes: transcripts, classifications and file/batch completion.

``save_results`` writes a whole claimed batch in one transaction: every transcript
(upsert on audio_id), every classification (upsert on (audio_id, policy_id, model)),
each file's status 'done', and each touched batch's status 'done' once none of its
files is still waiting. A redelivered job rewrites the same rows; it never adds any.

Hand-injected jobs name a path the database may not know; ``register_adhoc`` files
such a path under the batch ``adhoc`` (see gpu_worker for how its audio_id relates).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from audio_pipeline.asr import Transcript
from audio_pipeline.classify import Verdict
from audio_pipeline.records import select_one
from audio_pipeline.records.batches import complete_batches_if_finished, reopen_for_transcription

ADHOC_BATCH_ID = "adhoc"


_UPSERT_CLASSIFICATION = """
INSERT INTO classifications (audio_id, policy_id, model, score, label, threshold,
                             evidence, windows, truncated)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (audio_id, policy_id, model) DO UPDATE
   SET score = EXCLUDED.score, label = EXCLUDED.label,
       threshold = EXCLUDED.threshold, evidence = EXCLUDED.evidence,
       windows = EXCLUDED.windows, truncated = EXCLUDED.truncated,
       updated_at = now()
"""


def upsert_classifications(
    cur: psycopg.Cursor[Any], verdicts: Iterable[tuple[int, Verdict]]
) -> None:
    """(audio_id, verdict) pairs as classifications rows: one per file, policy version
    and model, so a verdict of another version or model is another row, kept; the
    same three again replace theirs (a retried or re-judged file)."""
    cur.executemany(
        _UPSERT_CLASSIFICATION,
        [
            (
                audio_id,
                v.policy_id,
                v.model,
                v.score,
                v.label,
                v.threshold,
                Jsonb(v.evidence_json()),
                v.windows,
                v.truncated,
            )
            for audio_id, v in verdicts
        ],
    )


@dataclass(frozen=True)
class AudioRow:
    """What the gpu stage needs from an audio_files row."""

    id: int
    batch_id: str
    rel_path: str
    opus_path: str | None
    opus_s3_key: str | None
    status: str
    has_transcript: bool


@dataclass(frozen=True)
class FileResult:
    audio_id: int
    transcript: Transcript
    verdicts: Sequence[Verdict]


_ROW_QUERY = """
    SELECT a.id, a.batch_id, a.rel_path, a.opus_path, a.opus_s3_key, a.status,
           (t.audio_id IS NOT NULL) AS has_transcript
      FROM audio_files a LEFT JOIN transcripts t ON t.audio_id = a.id
"""


def _row(r: dict[str, Any] | None) -> AudioRow | None:
    return AudioRow(**r) if r else None


def audio_by_id(conn: psycopg.Connection, audio_id: int) -> AudioRow | None:
    return _row(select_one(conn, _ROW_QUERY + " WHERE a.id = %s", (audio_id,)))


def audio_by_opus_path(conn: psycopg.Connection, opus_path: str) -> AudioRow | None:
    return _row(
        select_one(conn, _ROW_QUERY + " WHERE a.opus_path = %s ORDER BY a.id LIMIT 1", (opus_path,))
    )


def register_adhoc(conn: psycopg.Connection, opus_path: str, host: str) -> AudioRow:
    """The row for a hand-injected path, created under batch 'adhoc' if need be.

    Keyed on (adhoc, the path without its leading '/'), so injecting the same path
    twice finds the same row.
    """
    rel_path = opus_path.lstrip("/") or opus_path
    with conn.transaction():
        conn.execute(
            """
            INSERT INTO batches (batch_id, s3_key, status, source_path)
            VALUES (%s, '', 'unpacked', 'jobs injected by hand (no archive)')
            ON CONFLICT (batch_id) DO NOTHING
            """,
            (ADHOC_BATCH_ID,),
        )
        conn.execute(
            """
            INSERT INTO audio_files (batch_id, rel_path, opus_path, host, status)
            VALUES (%s, %s, %s, %s, 'converted')
            ON CONFLICT (batch_id, rel_path) DO UPDATE
               SET opus_path = EXCLUDED.opus_path, host = EXCLUDED.host, updated_at = now()
            """,
            (ADHOC_BATCH_ID, rel_path, opus_path, host),
        )
    row = conn.execute(
        _ROW_QUERY + " WHERE a.batch_id = %s AND a.rel_path = %s", (ADHOC_BATCH_ID, rel_path)
    ).fetchone()
    assert row is not None  # just upserted
    return AudioRow(**row)


def mark_transcribing(conn: psycopg.Connection, audio_ids: Sequence[int], host: str) -> None:
    """Files this worker is working on now (never drags a finished file back)."""
    conn.execute(
        """
        UPDATE audio_files SET status = 'transcribing', host = %s, attempts = attempts + 1,
               updated_at = now()
         WHERE id = ANY(%s) AND status <> 'done'
        """,
        (host, list(audio_ids)),
    )


def mark_failed(conn: psycopg.Connection, audio_id: int, error: str) -> list[str]:
    """One file failed for good; returns the batches this completed."""
    with conn.transaction():
        row = conn.execute(
            """
            UPDATE audio_files SET status = 'failed', error = %s, updated_at = now()
             WHERE id = %s AND status <> 'done'
            RETURNING batch_id
            """,
            (error, audio_id),
        ).fetchone()
        if row is None:
            return []
        return complete_batches_if_finished(conn, _real_batches([row["batch_id"]]))


def resolve_job_row(conn: psycopg.Connection, audio_id: int, opus_path: str) -> AudioRow | None:
    """The row a transcribe job means, by the gpu worker's rule: the payload's id when
    that row records the same opus_path (or none), else the row of that path."""
    row = audio_by_id(conn, audio_id)
    if row is None or row.opus_path not in (None, opus_path):
        row = audio_by_opus_path(conn, opus_path)
    return row


def fail_job(
    conn: psycopg.Connection, audio_id: int, opus_path: str, error: str
) -> tuple[AudioRow | None, list[str]]:
    """A dead-lettered transcribe job: its file -> failed with the error (a done file
    stays done). Returns the row (None if the job names no known file) and the batches
    this finished."""
    row = resolve_job_row(conn, audio_id, opus_path)
    if row is None:
        return None, []
    return row, mark_failed(conn, row.id, error)


def reopen_job(conn: psycopg.Connection, audio_id: int, opus_path: str) -> AudioRow | None:
    """A transcribe job requeued from queue:failed: its failed file -> converted and
    its batch no longer done. Returns the row, or None if the job names no file."""
    row = resolve_job_row(conn, audio_id, opus_path)
    if row is None:
        return None
    with conn.transaction():
        conn.execute(
            """
            UPDATE audio_files SET status = 'converted', error = NULL, updated_at = now()
             WHERE id = %s AND status = 'failed'
            """,
            (row.id,),
        )
        if row.batch_id != ADHOC_BATCH_ID:
            reopen_for_transcription(conn, row.batch_id)
    return row


def save_results(conn: psycopg.Connection, results: Sequence[FileResult]) -> list[str]:
    """Transcripts, classifications and 'done' for a batch of files, atomically.

    Returns the batch ids that this write finished (every file done or failed).
    """
    if not results:
        return []
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            """
            INSERT INTO transcripts (audio_id, text, language, language_probability, segments,
                                     model, backend, audio_seconds, processing_seconds)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (audio_id) DO UPDATE
               SET text = EXCLUDED.text, language = EXCLUDED.language,
                   language_probability = EXCLUDED.language_probability,
                   segments = EXCLUDED.segments, model = EXCLUDED.model,
                   backend = EXCLUDED.backend, audio_seconds = EXCLUDED.audio_seconds,
                   processing_seconds = EXCLUDED.processing_seconds, updated_at = now()
            """,
            [
                (
                    r.audio_id,
                    r.transcript.text,
                    r.transcript.language,
                    r.transcript.language_probability,
                    Jsonb(r.transcript.segments_json()),
                    r.transcript.model,
                    r.transcript.backend,
                    r.transcript.audio_seconds,
                    r.transcript.processing_seconds,
                )
                for r in results
            ],
        )
        upsert_classifications(cur, ((r.audio_id, v) for r in results for v in r.verdicts))
        rows = cur.execute(
            """
            UPDATE audio_files SET status = 'done', error = NULL, updated_at = now()
             WHERE id = ANY(%s)
            RETURNING batch_id
            """,
            ([r.audio_id for r in results],),
        ).fetchall()
        return complete_batches_if_finished(conn, _real_batches(r["batch_id"] for r in rows))


def _real_batches(batch_ids: Iterable[str]) -> list[str]:
    """Batches that can finish: 'adhoc' is an open bucket for hand-injected files."""
    return sorted({b for b in batch_ids if b != ADHOC_BATCH_ID})


def count_flagged(conn: psycopg.Connection) -> int:
    """Flagged files waiting for the RA window (the view ra_queue)."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute("SELECT count(*) FROM ra_queue").fetchone()
    assert row is not None
    return int(row[0])
