"""Text-only jobs: stored transcripts judged again without transcribing again.

``audio-pipeline reclassify`` records a run (records/reclassify.py) and RPUSHes one
job per file to ``queue:classify``::

    {"kind": "classify", "run_id": 7, "audio_id": 42, "policy_id": 3,
     "model": "classifier/cope-a-9b", "batch_id": "b-001"}

The gpu workers serve that queue after their transcribe queues (new audio first; a
re-classification is backfill), read the transcript from PostgreSQL and run only
the classifier, so a text-only job needs no audio and no ASR, and any gpu host can
take it. A job is text-only when it comes from ``queue:classify`` or says
``"kind": "classify"`` (so one LPUSHed onto a transcribe queue by hand is still
served as what it is, and never fails a file). Its dead letter fails the run's file
row only; the audio file, its transcript and its batch stay as they were.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from audio_pipeline.config import QUEUE_CLASSIFY
from audio_pipeline.queue import Job, PermanentJobError, require_fields, stamped
from audio_pipeline.records.reclassify import QueuedFile

CLASSIFY_KIND = "classify"
PAYLOAD_FIELDS: Mapping[str, type] = {
    "run_id": int,
    "audio_id": int,
    "policy_id": int,
    "model": str,
}
ENQUEUE_CHUNK = 1000  # jobs per Redis round trip


@dataclass(frozen=True)
class ClassifyJob:
    """A text-only job's payload, checked."""

    run_id: int
    audio_id: int
    policy_id: int
    model: str


def is_text_only(job: Job) -> bool:
    return job.queue == QUEUE_CLASSIFY or job.payload.get("kind") == CLASSIFY_KIND


def parse(payload: Mapping[str, Any]) -> ClassifyJob:
    """The payload's fields, or PermanentJobError naming every problem."""
    try:
        require_fields(payload, PAYLOAD_FIELDS)
    except PermanentJobError as exc:
        raise PermanentJobError(f"text-only (classify) job: {exc}") from None
    if not payload["model"].strip():
        raise PermanentJobError("text-only (classify) job: invalid job payload: 'model' is empty")
    return ClassifyJob(
        run_id=payload["run_id"],
        audio_id=payload["audio_id"],
        policy_id=payload["policy_id"],
        model=payload["model"],
    )


def payload(run_id: int, policy_id: int, model: str, file: QueuedFile) -> dict[str, Any]:
    return {
        "kind": CLASSIFY_KIND,
        "run_id": run_id,
        "audio_id": file.audio_id,
        "policy_id": policy_id,
        "model": model,
        "batch_id": file.batch_id,
    }


def enqueue(
    r: redis.Redis, run_id: int, policy_id: int, model: str, files: Sequence[QueuedFile]
) -> int:
    """RPUSH one text-only job per file to queue:classify; returns the jobs pushed."""
    for start in range(0, len(files), ENQUEUE_CHUNK):
        chunk = files[start : start + ENQUEUE_CHUNK]
        r.rpush(
            QUEUE_CLASSIFY,
            *(
                json.dumps(stamped(payload(run_id, policy_id, model, f)), separators=(",", ":"))
                for f in chunk
            ),
        )
    return len(files)
