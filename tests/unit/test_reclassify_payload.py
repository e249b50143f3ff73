"""Text-only (re-classification) job payloads: which jobs are text-only, what is checked."""

from __future__ import annotations

import json

import pytest

from audio_pipeline import reclassify
from audio_pipeline.config import QUEUE_CLASSIFY, QUEUE_TRANSCRIBE, host_transcribe_queue
from audio_pipeline.queue import Job, PermanentJobError
from audio_pipeline.records.reclassify import QueuedFile


def job(queue: str, payload: dict) -> Job:
    return Job(queue=queue, raw=json.dumps(payload), payload=payload)


def test_a_job_is_text_only_by_its_queue_or_its_kind() -> None:
    assert reclassify.is_text_only(job(QUEUE_CLASSIFY, {}))
    assert reclassify.is_text_only(job(QUEUE_TRANSCRIBE, {"kind": "classify"}))
    assert reclassify.is_text_only(job(host_transcribe_queue("h"), {"kind": "classify"}))
    assert not reclassify.is_text_only(job(QUEUE_TRANSCRIBE, {"audio_id": 1, "opus_path": "/a"}))
    assert not reclassify.is_text_only(job(QUEUE_TRANSCRIBE, {"kind": "transcribe"}))


def test_the_payload_it_builds_parses_back() -> None:
    body = reclassify.payload(7, 3, "classifier/cope-a-9b", QueuedFile(42, "b-1"))
    assert body == {
        "kind": "classify",
        "run_id": 7,
        "audio_id": 42,
        "policy_id": 3,
        "model": "classifier/cope-a-9b",
        "batch_id": "b-1",
    }
    assert reclassify.parse(body) == reclassify.ClassifyJob(7, 42, 3, "classifier/cope-a-9b")


@pytest.mark.parametrize(
    ("body", "problems"),
    [
        ({}, ["missing key 'run_id'", "missing key 'audio_id'", "missing key 'model'"]),
        (
            {"run_id": True, "audio_id": "1", "policy_id": 1.0, "model": 5},
            [
                "key 'run_id' must be int, got bool",
                "key 'audio_id' must be int, got str",
                "key 'policy_id' must be int, got float",
                "key 'model' must be str, got int",
            ],
        ),
        ({"run_id": 1, "audio_id": 1, "policy_id": 1, "model": "  "}, ["'model' is empty"]),
    ],
)
def test_a_bad_payload_is_a_permanent_error_naming_every_problem(
    body: dict, problems: list[str]
) -> None:
    with pytest.raises(PermanentJobError) as caught:
        reclassify.parse(body)
    message = str(caught.value)
    assert message.startswith("text-only (classify) job: invalid job payload")
    for problem in problems:
        assert problem in message
