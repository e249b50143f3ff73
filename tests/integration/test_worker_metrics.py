"""A worker's /metrics while it works, against what it did.

A real echo worker (tests/support/workerkit) with METRICS_PORT set works a queue with
good jobs, one that fails once and one that fails for good; the scrape's counters
must equal what the queue and the done list say happened.
"""

from __future__ import annotations

import json
import time

import pytest
import redis

from audio_pipeline.queue import stamped
from tests.support.metrics_scrape import free_port, scrape
from tests.support.workerkit.echo_worker import DONE_KEY
from tests.support.workerkit.procs import finish, start_module, wait_for

pytestmark = pytest.mark.integration

ECHO = "tests.support.workerkit.echo_worker"
WAITED_S = 120


def test_counters_match_what_the_worker_did(pipeline_env, redis_client: redis.Redis) -> None:
    # The good jobs as a producer pushes them, stamped two minutes ago; the others as
    # an operator pushes them by hand, unstamped (no queue wait to tell).
    jobs = [stamped({"id": f"ok-{i}"}, at=time.time() - WAITED_S) for i in range(5)]
    jobs += [{"id": "flaky", "fail": "transient", "fail_times": 1}]
    jobs += [{"id": "bad", "fail": "permanent"}]
    redis_client.rpush("queue:echo", *[json.dumps(j) for j in jobs])
    port = free_port()
    proc = start_module(
        ECHO,
        pipeline_env,
        extra_env={"METRICS_PORT": str(port), "WORKER_HOST": "metrics-host"},
    )
    try:
        wait_for(lambda: redis_client.llen(DONE_KEY) == 6, timeout=60, what="6 jobs done")
        wait_for(lambda: redis_client.llen("queue:failed") == 1, timeout=30, what="dead letter")
        m = scrape(port, "echo")
    finally:
        proc.terminate()
        code, out = finish(proc, 60)
    assert code == 0, out
    assert "event=worker.metrics" in out
    assert m["audio_pipeline_jobs_done_total"] == 6
    assert m["audio_pipeline_jobs_retried_total"] == 1  # flaky, once
    assert m["audio_pipeline_jobs_dead_lettered_total"] == 1  # bad
    assert m["audio_pipeline_jobs_claimed_total"] == 8  # 7 jobs, flaky twice
    assert m["audio_pipeline_job_duration_seconds_count"] == 8  # every settle observed
    # Queue waits: the five stamped jobs (two minutes each) and the flaky job's retry,
    # stamped when it fell due, so claimed moments later.
    assert m["audio_pipeline_queue_wait_seconds_count"] == 6
    assert m["audio_pipeline_queue_wait_seconds_bucket/60.0"] == 1
    assert m["audio_pipeline_queue_wait_seconds_bucket/300.0"] == 6
    assert m["audio_pipeline_queue_wait_seconds_sum"] >= 5 * WAITED_S
    assert m["audio_pipeline_backend_up/redis"] == 1
    assert m["audio_pipeline_backend_up/postgres"] == 1


def test_no_endpoint_unless_asked(pipeline_env, redis_client: redis.Redis) -> None:
    redis_client.rpush("queue:echo", json.dumps({"id": "one"}))
    proc = start_module(ECHO, pipeline_env, ["--drain"])
    code, out = finish(proc, 60)
    assert code == 0, out
    assert "worker.metrics" not in out
