"""Pure parts of the queue library, the worker runtime's rules for failed claims
(out-of-memory recognition, the claim size after one) and the logfmt lines."""

from __future__ import annotations

import logging
import random

import pytest

from audio_pipeline.config import ConfigError
from audio_pipeline.logs import format_fields, log_event
from audio_pipeline.queue import (
    Job,
    PermanentJobError,
    RetryPolicy,
    backoff_delay_s,
    jittered_backoff_s,
    parse_processing_key,
    processing_key,
    reap_destination,
    require_fields,
)
from audio_pipeline.runtime.claim_size import ClaimSize
from audio_pipeline.runtime.out_of_memory import is_out_of_memory


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


def test_retry_delays_are_jittered_within_the_upper_half_of_the_backoff():
    rng = random.Random(12)
    for retries in range(8):
        ceiling = backoff_delay_s(2.0, 30.0, retries)
        delays = [jittered_backoff_s(2.0, 30.0, retries, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), retries
        # spread over the whole half, not bunched: jobs retried together come due apart
        assert min(delays) < ceiling * 0.55
        assert max(delays) > ceiling * 0.95
        assert len(set(delays)) == len(delays)
    assert [backoff_delay_s(2.0, 30.0, n) for n in range(6)] == [2, 4, 8, 16, 30, 30]


def test_retry_jitter_is_reproducible_with_a_seeded_source():
    policy = RetryPolicy(max_attempts=5, base_s=30, cap_s=900)
    first = [policy.jittered_delay_s(n, random.Random(7)) for n in range(4)]
    again = [policy.jittered_delay_s(n, random.Random(7)) for n in range(4)]
    assert first == again
    assert all(policy.delay_s(n) / 2 <= d <= policy.delay_s(n) for n, d in enumerate(first))
    assert RetryPolicy(base_s=0, cap_s=0).jittered_delay_s(3) == 0  # tests may ask for none


class OutOfMemoryError(RuntimeError):
    """Named as torch.OutOfMemoryError (torch.cuda.OutOfMemoryError) is."""


class CudaOutOfMemory(OutOfMemoryError):
    """A subclass still counts: the name is looked up along the class hierarchy."""


@pytest.mark.parametrize(
    "error",
    [
        OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        CudaOutOfMemory("allocation failed"),
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.75 GiB)"),
        RuntimeError("CUDA failed with error out of memory"),  # ctranslate2, faster-whisper
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    ],
)
def test_gpu_out_of_memory_is_recognised(error):
    assert is_out_of_memory(error)


def test_torchs_own_out_of_memory_error_is_recognised():
    torch = pytest.importorskip("torch")
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert is_out_of_memory(torch.OutOfMemoryError("Tried to allocate 2.00 GiB"))


def test_an_out_of_memory_wrapped_in_another_error_is_recognised():
    wrapped = ValueError("transcribing the claim failed")
    wrapped.__cause__ = RuntimeError("CUDA failed with error out of memory")
    assert is_out_of_memory(wrapped)
    during = ValueError("cleanup failed")
    during.__context__ = OutOfMemoryError("Tried to allocate 2.00 GiB")
    assert is_out_of_memory(during)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA error: device-side assert triggered"),
        MemoryError(),  # host memory: the unit's MemoryMax and the reaper deal with it
        ValueError("memory of the speaker is out of date"),
        PermanentJobError("undecodable audio"),
    ],
)
def test_other_errors_are_not_taken_for_out_of_memory(error):
    assert not is_out_of_memory(error)


def test_a_lowered_claim_size_holds_for_a_while_then_the_configured_one_returns():
    now = [100.0]
    claims = ClaimSize(hold_s=60.0, clock=lambda: now[0])
    assert claims.size(8) == (8, False)
    assert claims.lower(4)
    assert claims.lower(2)
    assert not claims.lower(4)  # not lower than in force; renews the hold
    assert claims.lowered_to == 2
    now[0] += 59.0
    assert claims.size(8) == (2, False)
    assert claims.size(1) == (1, False)  # never more than configured
    now[0] += 1.0
    assert claims.size(8) == (8, True)  # the hold is over: said once
    assert claims.size(8) == (8, False)
    assert claims.lowered_to is None
    assert claims.lower(0)
    assert claims.size(8) == (1, False)  # at least one job per claim


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
