"""audio_files rows: the writes the unpack stage owns.

Every write is an upsert on the natural key (batch_id, rel_path), so a
redelivered unpack job never duplicates a row. The unpack stage moves a file
through pending -> converted | failed; the gpu stage takes it on to
transcribing -> done. An unpack write never drags a file back from the gpu
stage's states: a redelivered unpack job must not undo finished work.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

import psycopg

from audio_pipeline.records import select_all


class AudioFileStatus(StrEnum):
    PENDING = "pending"  # found in the archive, not converted yet
    CONVERTED = "converted"  # Opus on this host and in S3; a transcribe job is queued
    TRANSCRIBING = "transcribing"
    DONE = "done"
    FAILED = "failed"


# States owned by the gpu stage: the unpack stage leaves such rows alone.
GPU_STATES = (AudioFileStatus.TRANSCRIBING, AudioFileStatus.DONE)


@dataclass(frozen=True)
class FoundFile:
    rel_path: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class FileState:
    id: int
    status: AudioFileStatus


_GPU_STATE_VALUES = [s.value for s in GPU_STATES]


def register_found(
    conn: psycopg.Connection, batch_id: str, files: Iterable[FoundFile], host: str
) -> dict[str, FileState]:
    """Upsert one pending row per file found in the archive; returns every row's state.

    Rows already in a gpu state keep it (and are returned with it), so the
    caller knows which files need no work at all.
    """
    files = list(files)
    with conn.cursor() as cur:
        cur.executemany(
            """
            INSERT INTO audio_files (batch_id, rel_path, size_bytes, sha256, host, status)
            VALUES (%s, %s, %s, %s, %s, 'pending')
            ON CONFLICT (batch_id, rel_path) DO UPDATE
               SET size_bytes = EXCLUDED.size_bytes, sha256 = EXCLUDED.sha256,
                   host = EXCLUDED.host, status = 'pending', error = NULL,
                   updated_at = now()
             WHERE audio_files.status <> ALL(%s)
            """,
            [
                (batch_id, f.rel_path, f.size_bytes, f.sha256, host, _GPU_STATE_VALUES)
                for f in files
            ],
        )
    return states(conn, batch_id, [f.rel_path for f in files])


def states(
    conn: psycopg.Connection, batch_id: str, rel_paths: list[str] | None = None
) -> dict[str, FileState]:
    """rel_path -> (id, status) for the batch's rows (or just ``rel_paths``)."""
    query = "SELECT id, rel_path, status FROM audio_files WHERE batch_id = %s"
    params: list[object] = [batch_id]
    if rel_paths is not None:
        query += " AND rel_path = ANY(%s)"
        params.append(rel_paths)
    rows = select_all(conn, query, params)
    return {r["rel_path"]: FileState(r["id"], AudioFileStatus(r["status"])) for r in rows}


def mark_converted(
    conn: psycopg.Connection,
    batch_id: str,
    rel_path: str,
    *,
    duration_s: float,
    opus_s3_key: str,
    opus_path: str,
    host: str,
) -> bool:
    """pending/failed/converted -> converted; False if the gpu stage already owns the row."""
    cur = conn.execute(
        """
        UPDATE audio_files
           SET status = 'converted', duration_s = %s, opus_s3_key = %s, opus_path = %s,
               host = %s, error = NULL, updated_at = now()
         WHERE batch_id = %s AND rel_path = %s AND status <> ALL(%s)
        """,
        (duration_s, opus_s3_key, opus_path, host, batch_id, rel_path, _GPU_STATE_VALUES),
    )
    return cur.rowcount == 1


def mark_failed(
    conn: psycopg.Connection, batch_id: str, rel_path: str, error: str, host: str
) -> bool:
    """-> failed with the reason (ffmpeg's words); False if the gpu stage owns the row."""
    cur = conn.execute(
        """
        UPDATE audio_files
           SET status = 'failed', error = %s, host = %s, opus_path = NULL,
               opus_s3_key = NULL, updated_at = now()
         WHERE batch_id = %s AND rel_path = %s AND status <> ALL(%s)
        """,
        (error, host, batch_id, rel_path, _GPU_STATE_VALUES),
    )
    return cur.rowcount == 1
