"""Pure parts of the queue library and the logfmt lines."""

from __future__ import annotations

import logging

import pytest

from audio_pipeline.config import ConfigError
from audio_pipeline.logs import format_fields, log_event
from audio_pipeline.queue import (
    Job,
    PermanentJobError,
    RetryPolicy,
    parse_processing_key,
    processing_key,
    reap_destination,
    require_fields,
)


def test_require_fields_accepts_a_good_payload():
    require_fields({"audio_id": 3, "opus_path": "/a.opus"}, {"audio_id": int, "opus_path": str})
    require_fields({"file_count": None, "n": 1.5}, {"n": (int, float)})


def test_require_fields_names_every_problem():
    with pytest.raises(PermanentJobError) as info:
        require_fields(
            {"audio_id": "3", "flag": True},
            {"audio_id": int, "opus_path": str, "flag": int},
        )
    message = str(info.value)
    assert "key 'audio_id' must be int, got str" in message
    assert "missing key 'opus_path'" in message
    assert "key 'flag' must be int, got bool" in message


def test_processing_keys_round_trip_with_colons_everywhere():
    key = processing_key("gpu:gpu-01:1234", "queue:transcribe:gpu-01")
    assert key == "processing:gpu:gpu-01:1234:from:queue:transcribe:gpu-01"
    assert parse_processing_key(key) == ("gpu:gpu-01:1234", "queue:transcribe:gpu-01")
    with pytest.raises(ValueError, match="not a processing list key"):
        parse_processing_key("queue:unpack")


def test_reap_destination_moves_host_queues_to_the_shared_one():
    assert reap_destination("queue:transcribe:gpu-01") == "queue:transcribe"
    assert reap_destination("queue:transcribe") == "queue:transcribe"
    assert reap_destination("queue:unpack") == "queue:unpack"


def test_retry_policy_reads_env_and_rejects_nonsense():
    policy = RetryPolicy.from_env({"QUEUE_MAX_ATTEMPTS": "2", "QUEUE_RETRY_BASE_S": "0.5"})
    assert (policy.max_attempts, policy.base_s, policy.cap_s) == (2, 0.5, 900.0)
    with pytest.raises(ConfigError, match="QUEUE_RETRY_CAP_S='soon' is not a number"):
        RetryPolicy.from_env({"QUEUE_RETRY_CAP_S": "soon"})
    with pytest.raises(ConfigError, match="QUEUE_MAX_ATTEMPTS=0 is below the minimum"):
        RetryPolicy.from_env({"QUEUE_MAX_ATTEMPTS": "0"})


def test_job_short_id_is_stable_per_raw_payload():
    a = Job(queue="q", raw='{"n":1}', payload={"n": 1})
    b = Job(queue="q", raw='{"n":1}', payload={"n": 1}, attempts=2)
    assert a.short_id == b.short_id
    assert len(a.short_id) == 8


def test_logfmt_line_quotes_what_needs_quoting():
    line = format_fields(
        "job.failed",
        {
            "stage": "unpack",
            "duration_s": 1.2,
            "score": 0.123456,
            "error": 'bad "tar"\nx',
            "ok": True,
            "none": None,
        },
    )
    assert line == (
        "event=job.failed stage=unpack duration_s=1.20 score=0.1235 "
        'error="bad \\"tar\\"\\nx" ok=true none=""'
    )


def test_log_event_emits_one_line(caplog):
    logger = logging.getLogger("test.logs")
    with caplog.at_level(logging.INFO, logger="test.logs"):
        log_event(logger, "job.done", stage="gpu", job="ab12", duration_s=0.5)
        log_event(logger, "job.debug", level=logging.DEBUG, stage="gpu")
    assert [r.getMessage() for r in caplog.records] == [
        "event=job.done stage=gpu job=ab12 duration_s=0.50"
    ]
