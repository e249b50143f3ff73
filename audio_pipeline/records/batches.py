"""batches rows: one per archive, keyed by batch_id (upserts on the natural key).

Owned by the transfer stage; later stages append the small functions for the
status transitions they own at the end of this file.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import psycopg
from psycopg.rows import dict_row, tuple_row

from audio_pipeline.records import select_all, select_one


class BatchStatus(StrEnum):
    TRANSFERRING = "transferring"
    TRANSFERRED = "transferred"
    UNPACKING = "unpacking"
    UNPACKED = "unpacked"
    DONE = "done"
    FAILED = "failed"


# --- transfer stage: (new) -> transferring -> transferred | failed ---------------

# A batch whose archive copy finished has transferred_at set, whatever later stages
# did to its status since; the transfer worker never copies such a batch again.


def transfer_state(conn: psycopg.Connection, batch_id: str) -> dict[str, Any] | None:
    """status, transferred_at, archive_sha256 and archive_bytes of a batch, or None."""
    return select_one(
        conn,
        "SELECT status, transferred_at, archive_sha256, archive_bytes "
        "FROM batches WHERE batch_id = %s",
        (batch_id,),
    )


def begin_transfer(
    conn: psycopg.Connection,
    batch_id: str,
    s3_key: str,
    source_host: str,
    source_path: str,
    archive_bytes: int,
) -> bool:
    """Record (or resume) the copy of a batch; False if the batch is already known
    in another state (copied before, or injected by hand), so it must not be copied.
    """
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            """
            INSERT INTO batches (batch_id, s3_key, source_host, source_path, archive_bytes,
                                 status)
            VALUES (%s, %s, %s, %s, %s, 'transferring')
            ON CONFLICT (batch_id) DO UPDATE
               SET s3_key = EXCLUDED.s3_key, source_host = EXCLUDED.source_host,
                   source_path = EXCLUDED.source_path,
                   archive_bytes = EXCLUDED.archive_bytes, status = 'transferring',
                   error = NULL, updated_at = now()
             WHERE batches.transferred_at IS NULL
               AND batches.status IN ('transferring', 'failed')
            RETURNING batch_id
            """,
            (batch_id, s3_key, source_host, source_path, archive_bytes),
        ).fetchone()
    return row is not None


def mark_transferred(
    conn: psycopg.Connection, batch_id: str, archive_bytes: int, archive_sha256: str
) -> None:
    """transferring -> transferred: the archive is in S3 and verified."""
    conn.execute(
        """
        UPDATE batches
           SET status = 'transferred', transferred_at = now(), archive_bytes = %s,
               archive_sha256 = %s, error = NULL, updated_at = now()
         WHERE batch_id = %s AND status = 'transferring'
        """,
        (archive_bytes, archive_sha256, batch_id),
    )


def mark_transfer_failed(conn: psycopg.Connection, batch_id: str, error: str) -> None:
    """transferring -> failed with the reason; a later scan may try again."""
    conn.execute(
        """
        UPDATE batches SET status = 'failed', error = %s, updated_at = now()
         WHERE batch_id = %s AND status = 'transferring'
        """,
        (error, batch_id),
    )


def transferred_batches(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Batches copied but not yet picked up by an unpack worker (for reconciling)."""
    return select_all(
        conn,
        "SELECT batch_id, s3_key, file_count, transferred_at FROM batches "
        "WHERE status = 'transferred' ORDER BY transferred_at",
    )


# --- unpack stage: unpacking -> unpacked | failed ------------------------------


def mark_unpacking(
    conn: psycopg.Connection, batch_id: str, s3_key: str, host: str
) -> BatchStatus | None:
    """Claim the batch for unpacking on ``host``; returns the status it had before.

    Creates the row when the job was injected by hand (no transfer recorded it).
    A batch already done is left as it is: the caller skips it.
    """
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "SELECT status FROM batches WHERE batch_id = %s FOR UPDATE", (batch_id,)
        ).fetchone()
        previous = BatchStatus(row["status"]) if row else None
        if previous is BatchStatus.DONE:
            return previous
        cur.execute(
            """
            INSERT INTO batches (batch_id, s3_key, status, unpack_host)
            VALUES (%s, %s, 'unpacking', %s)
            ON CONFLICT (batch_id) DO UPDATE
               SET status = 'unpacking', unpack_host = EXCLUDED.unpack_host,
                   error = NULL, updated_at = now()
            """,
            (batch_id, s3_key, host),
        )
    return previous


def mark_unpacked(conn: psycopg.Connection, batch_id: str, file_count: int) -> None:
    """unpacking -> unpacked with the number of audio files found."""
    conn.execute(
        """
        UPDATE batches
           SET status = 'unpacked', file_count = %s, unpacked_at = now(), error = NULL,
               updated_at = now()
         WHERE batch_id = %s AND status <> 'done'
        """,
        (file_count, batch_id),
    )


def mark_unpack_failed(conn: psycopg.Connection, batch_id: str, error: str) -> bool:
    """-> failed with the reason (an unsafe or corrupt archive, no convertible audio, a
    dead-lettered unpack job), with its files still waiting for conversion.

    False (nothing written) for a batch already done or failed: a dead letter of a
    redelivered job never undoes finished work, and the first reason stays.
    """
    cur = conn.execute(
        """
        UPDATE batches SET status = 'failed', error = %s, updated_at = now()
         WHERE batch_id = %s AND status NOT IN ('done', 'failed')
        """,
        (error, batch_id),
    )
    if cur.rowcount != 1:
        return False
    conn.execute(
        """
        UPDATE audio_files SET status = 'failed', error = %s, updated_at = now()
         WHERE batch_id = %s AND status IN ('pending', 'converted')
        """,
        (f"batch failed: {error}", batch_id),
    )
    return True


def reopen_for_unpack(conn: psycopg.Connection, batch_id: str) -> bool:
    """failed -> transferred: its unpack job is requeued (``audio-pipeline requeue``).

    The unpack worker then takes it to unpacking, and its failed files back to
    pending. False when the batch is not failed (nothing to reopen).
    """
    cur = conn.execute(
        """
        UPDATE batches SET status = 'transferred', error = NULL, updated_at = now()
         WHERE batch_id = %s AND status = 'failed'
        """,
        (batch_id,),
    )
    return cur.rowcount == 1


def reopen_for_transcription(conn: psycopg.Connection, batch_id: str) -> bool:
    """done -> unpacked: one of its files is requeued for the gpu stage, so the
    batch is no longer finished until that file is. False when it was not done."""
    cur = conn.execute(
        """
        UPDATE batches SET status = 'unpacked', completed_at = NULL, files_failed = NULL,
               updated_at = now()
         WHERE batch_id = %s AND status = 'done'
        """,
        (batch_id,),
    )
    return cur.rowcount == 1


# --- gpu stage: -> done once every file is done or failed -----------------------


def complete_batches_if_finished(conn: psycopg.Connection, batch_ids: list[str]) -> list[str]:
    """Mark done each batch none of whose files is still waiting; returns those batches.

    ``files_failed`` records how many of its files ended failed.

    Runs inside the caller's transaction. Only an unpacked batch that has files and
    none left pending, converted or transcribing completes; one already done is not
    returned again, so exactly one writer sees it finish (and cleans its scratch).
    A batch a redelivered unpack job has taken back to 'unpacking' is left alone, so
    its scratch is never removed under the unpack worker.
    """
    if not batch_ids:
        return []
    rows = conn.execute(
        """
        UPDATE batches b SET status = 'done', completed_at = now(), error = NULL,
               updated_at = now(),
               files_failed = (SELECT count(*) FROM audio_files a
                                WHERE a.batch_id = b.batch_id AND a.status = 'failed')
         WHERE b.batch_id = ANY(%s) AND b.status = 'unpacked'
           AND EXISTS (SELECT 1 FROM audio_files a WHERE a.batch_id = b.batch_id)
           AND NOT EXISTS (SELECT 1 FROM audio_files a WHERE a.batch_id = b.batch_id
                           AND a.status IN ('pending', 'converted', 'transcribing'))
        RETURNING b.batch_id
        """,
        (batch_ids,),
    ).fetchall()
    return sorted(r["batch_id"] if isinstance(r, dict) else r[0] for r in rows)


# --- operators: `audio-pipeline status` ------------------------------------------


def status_summary(conn: psycopg.Connection, in_flight_limit: int) -> dict[str, Any]:
    """Batches per status, and the oldest ``in_flight_limit`` not yet done or failed
    with their files' progress (the counts cover every batch)."""
    with conn.cursor(row_factory=tuple_row) as cur:
        counts = dict(cur.execute("SELECT status, count(*) FROM batches GROUP BY status"))
        rows = cur.execute(
            """
            SELECT b.batch_id, b.status, b.file_count, b.unpack_host,
                   count(a.id) FILTER (WHERE a.status = 'done') AS files_done,
                   count(a.id) FILTER (WHERE a.status = 'failed') AS files_failed,
                   extract(epoch FROM now() - b.updated_at) AS idle_s
            FROM batches b LEFT JOIN audio_files a ON a.batch_id = b.batch_id
            WHERE b.status NOT IN ('done', 'failed')
            GROUP BY b.batch_id ORDER BY b.created_at LIMIT %s
            """,
            (in_flight_limit,),
        ).fetchall()
        failed_files, with_failures = cur.execute(
            """
            SELECT count(*),
                   count(DISTINCT a.batch_id) FILTER (WHERE b.status = 'done')
            FROM audio_files a JOIN batches b USING (batch_id) WHERE a.status = 'failed'
            """
        ).fetchone() or (0, 0)
    in_flight = [
        {
            "batch_id": b,
            "status": s,
            "file_count": fc,
            "unpack_host": h,
            "files_done": d,
            "files_failed": f,
            "idle_s": float(idle),
        }
        for b, s, fc, h, d, f, idle in rows
    ]
    return {
        "by_status": counts,
        "in_flight": in_flight,
        # every batch, finished or not: a batch can end `done` with some files failed
        "files_failed": int(failed_files),
        "done_with_failures": int(with_failures),
    }
