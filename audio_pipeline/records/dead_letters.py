"""Rows of a dead letter put back in play when an operator requeues it.

A dead-lettered job's rows end terminal (the stages' ``on_job_failed`` hooks): its
file ``failed``, its batch ``done`` or ``failed``. ``audio-pipeline requeue`` calls
``reopen`` before the job goes back to its queue, so a worker that takes it at once
finds the rows already waiting again and finishes them the usual way. A text-only
(re-classification) job's dead letter failed only its run file, so only that reopens.
"""

from __future__ import annotations

from typing import Any

import psycopg

from audio_pipeline.batch_ids import is_valid_batch_id
from audio_pipeline.config import QUEUE_CLASSIFY, QUEUE_TRANSCRIBE, QUEUE_UNPACK
from audio_pipeline.records.batches import reopen_for_unpack
from audio_pipeline.records.reclassify import reopen_file
from audio_pipeline.records.results import reopen_job


def reopen(conn: psycopg.Connection, queue: str, payload: dict[str, Any]) -> str:
    """Put the rows of a job requeued to ``queue`` back in play; says what it reopened
    ("" when the job names no row, or its rows were not finished)."""
    if queue == QUEUE_CLASSIFY or payload.get("kind") == "classify":
        # A text-only job: only its run file was failed; the audio file never was.
        run_id, audio_id = payload.get("run_id"), payload.get("audio_id")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (run_id, audio_id)):
            return ""
        return (
            f"re-classification of file {audio_id} (run {run_id})"
            if reopen_file(conn, run_id, audio_id)
            else ""
        )
    if queue == QUEUE_UNPACK:
        batch_id = payload.get("batch_id")
        if is_valid_batch_id(batch_id) and reopen_for_unpack(conn, batch_id):
            return f"batch {batch_id}"
        return ""
    if queue == QUEUE_TRANSCRIBE or queue.startswith(QUEUE_TRANSCRIBE + ":"):
        audio_id, opus_path = payload.get("audio_id"), payload.get("opus_path")
        if isinstance(audio_id, bool) or not isinstance(audio_id, int):
            return ""
        row = reopen_job(conn, audio_id, opus_path if isinstance(opus_path, str) else "")
        return f"file {row.id} (batch {row.batch_id})" if row is not None else ""
    return ""
