"""Workers ride out a Redis outage and then a PostgreSQL outage, each of a minute.

The services are this module's own (a private Redis and PostgreSQL on their own
ports and directory; S3 is the shared stack's), since stopping the shared ones
would break every other test running. Real worker processes (two echo workers, one
with look-ahead, and an unpack worker) run throughout with jobs flowing. Redis is
stopped as a server with persistence stops (SHUTDOWN SAVE: its data comes back),
PostgreSQL with ``pg_ctl stop -m fast`` (connections cut). Afterwards no worker has
exited, each logged one ``*.unavailable`` and one ``*.recovered`` line, every job is
done exactly once and every queue and processing list is empty.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg_pool import PoolTimeout

from audio_pipeline import s3_utils
from audio_pipeline.config import (
    QUEUE_FAILED,
    QUEUE_UNPACK,
)
from audio_pipeline.queue import JobQueue
from audio_pipeline.runtime.heartbeat import Heartbeat, HeartbeatTimings
from audio_pipeline.runtime.outage import Backend, Backoff, backend_unavailable
from devtools import devstack
from devtools.sample import make_speech_batch
from tests.support.private_stack import (
    backend_env,
    pipeline_url,
    redis_client,
    running_private_stack,
    stop_postgres,
    stop_redis,
)
from tests.support.workerkit.echo_worker import DONE_KEY
from tests.support.workerkit.procs import start_module, wait_for

pytestmark = pytest.mark.integration

OUTAGE_S = 60.0
ECHO = "tests.support.workerkit.echo_worker"
UNPACK = "audio_pipeline.workers.unpack_worker"
HOST_QUEUE = "queue:transcribe:outagehost"
ECHO_JOBS = 150
BATCHES = 12
FILES_PER_BATCH = 3


@pytest.fixture(scope="module")
def private_stack() -> Iterator[devstack.Stack]:
    with running_private_stack("outage-stack-") as stack:
        yield stack


def stop_all(procs: dict[str, subprocess.Popen[str]]) -> dict[str, int]:
    """SIGTERM each worker; exit codes, -9 for one that had to be killed. Never raises,
    so a failure earlier in the test is the one reported."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    codes: dict[str, int] = {}
    for name, proc in procs.items():
        try:
            codes[name] = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            codes[name] = proc.wait()
    return codes


def events(log: Path, event: str) -> int:
    return sum(f"event={event} " in line for line in log.read_text().splitlines())


def test_an_outage_error_is_told_from_a_job_error() -> None:
    assert backend_unavailable(redis.exceptions.TimeoutError("read timed out")) == "redis"
    assert backend_unavailable(redis.exceptions.ConnectionError("refused")) == "redis"
    assert backend_unavailable(redis.exceptions.ResponseError("WRONGTYPE")) is None
    assert backend_unavailable(psycopg.OperationalError("connection failed")) == "postgres"
    assert backend_unavailable(PoolTimeout("no connection in 30 s")) == "postgres"
    assert backend_unavailable(psycopg.errors.AdminShutdown("terminating")) == "postgres"
    assert backend_unavailable(psycopg.errors.DeadlockDetected("deadlock")) is None
    assert backend_unavailable(psycopg.errors.UniqueViolation("dup")) is None
    wrapped = RuntimeError("writing results failed")
    wrapped.__cause__ = psycopg.OperationalError("server closed the connection")
    assert backend_unavailable(wrapped) == "postgres"


def test_backoff_is_capped_and_jittered() -> None:
    backoff = Backoff(base_s=0.5, cap_s=10.0)
    delays = [backoff.next_delay() for _ in range(30)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(5.0 <= d <= 10.0 for d in delays[10:])
    assert len(set(delays[10:])) > 1  # jittered, so a fleet does not retry in step
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = Backend("redis", logging.getLogger("test.outage"), stage="echo")
    with caplog.at_level(logging.INFO, logger="test.outage"):
        backend.succeeded()
        backend.failed(redis.exceptions.ConnectionError("a pooled connection dropped"))
        backend.succeeded()  # one failure alone (a stale connection) is no outage
        for _ in range(5):
            backend.failed(redis.exceptions.ConnectionError("refused"))
        backend.succeeded()
        backend.succeeded()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("event=redis.unavailable stage=echo error=")
    assert lines[1].startswith("event=redis.recovered stage=echo down_s=")
    assert "failed_calls=5" in lines[1]


def test_the_heartbeat_thread_survives_any_error(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    calls = {"n": 0}

    def fields() -> dict[str, str]:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise ValueError("a bug in a heartbeat field")
        return {"state": "idle"}

    queue = JobQueue(redis_client, "echo:testhost:1", "echo")
    timings = HeartbeatTimings(interval_s=0.05, ttl_s=5.0, reaper_interval_s=60.0)
    heartbeat = Heartbeat(queue, timings, fields, logging.getLogger("test.heartbeat"))
    with caplog.at_level(logging.INFO, logger="test.heartbeat"):
        heartbeat.start()
        try:
            wait_for(lambda: redis_client.exists("worker:echo:testhost:1"), 10, "a heartbeat")
            assert heartbeat._thread is not None
            assert heartbeat._thread.is_alive()
        finally:
            heartbeat.stop()
    assert sum("heartbeat thread error" in r.getMessage() for r in caplog.records) == 3


@pytest.mark.slow
def test_workers_ride_out_a_redis_then_a_postgres_outage(
    private_stack: devstack.Stack, stack_env: dict[str, str], bucket: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    st = private_stack
    env = {
        **{k: v for k, v in stack_env.items() if k.startswith("S3_")},
        "S3_BUCKET": bucket,
        **backend_env(st),
        "SCRATCH_ROOT": str(tmp_path / "scratch"),
        "MODELS_ROOT": str(tmp_path / "models"),
        "WORKER_HOST": "outagehost",
        "UNPACK_MIN_FREE_BYTES": "0",
    }
    (tmp_path / "scratch").mkdir()
    (tmp_path / "models").mkdir()
    r = redis_client(st)
    r.flushall()

    # The archives, uploaded before any outage (S3 is not under test here).
    speech = make_speech_batch(
        tmp_path / "collection", "b-src", n_files=FILES_PER_BATCH, seed=3, max_seconds=3
    )
    s3 = s3_utils.client_from_env(env)
    batch_ids = [f"b-out-{i:02d}" for i in range(BATCHES)]
    for batch_id in batch_ids:
        s3_utils.upload_file(s3, bucket, speech.tar_path, s3_utils.archive_key(batch_id))

    log_dir = Path(os.environ.get("OUTAGE_TEST_LOG_DIR") or tmp_path)
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = {name: log_dir / f"{name}.log" for name in ("echo-1", "echo-2", "unpack")}
    procs = {
        "echo-1": start_module(ECHO, env, log_path=logs["echo-1"]),
        "echo-2": start_module(
            ECHO,
            env,
            extra_env={"ECHO_LOOK_AHEAD": "1", "ECHO_BATCH_SIZE": "2"},
            log_path=logs["echo-2"],
        ),
        "unpack": start_module(UNPACK, env, log_path=logs["unpack"]),
    }
    try:
        wait_for(
            lambda: all(events(log, "worker.started") for log in logs.values()),
            timeout=60,
            what="every worker started",
        )
        # -- Redis goes away for a minute under flowing echo jobs ---------------------
        for i in range(ECHO_JOBS):
            r.rpush("queue:echo", json.dumps({"id": f"j{i:03d}", "sleep": 0.2}))
        wait_for(lambda: r.llen(DONE_KEY) >= 10, timeout=60, what="echo jobs flowing")
        stop_redis(st)
        time.sleep(OUTAGE_S)
        assert all(p.poll() is None for p in procs.values()), "a worker exited during the outage"
        devstack.start_redis(st)
        redis_back = time.monotonic()
        wait_for(
            lambda: r.llen(DONE_KEY) >= ECHO_JOBS and r.llen("queue:echo") == 0,
            timeout=120,
            what="every echo job done after Redis came back",
        )
        redis_resumed_s = time.monotonic() - redis_back
        done = r.lrange(DONE_KEY, 0, -1)
        assert sorted(done) == [f"j{i:03d}" for i in range(ECHO_JOBS)], "lost or duplicated"

        # -- PostgreSQL goes away for a minute under flowing unpack jobs --------------
        for batch_id in batch_ids:
            r.rpush(
                QUEUE_UNPACK,
                json.dumps({"batch_id": batch_id, "s3_key": s3_utils.archive_key(batch_id)}),
            )
        db = pipeline_url(st)

        def unpacked() -> int:
            with psycopg.connect(db) as conn:
                row = conn.execute("SELECT count(*) FROM batches WHERE status = 'unpacked'")
                return int(row.fetchone()[0])  # type: ignore[index]

        wait_for(lambda: unpacked() >= 2, timeout=120, what="unpack jobs flowing")
        stop_postgres(st)
        time.sleep(OUTAGE_S)
        assert all(p.poll() is None for p in procs.values()), "a worker exited during the outage"
        devstack.start_postgres(st)
        pg_back = time.monotonic()
        wait_for(lambda: unpacked() == BATCHES, timeout=240, what="every batch unpacked")
        wait_for(lambda: r.llen(QUEUE_UNPACK) == 0, timeout=30, what="queue:unpack empty")
        wait_for(lambda: not list(r.scan_iter("processing:*")), timeout=30, what="processing empty")
        pg_resumed_s = time.monotonic() - pg_back

        # -- nothing lost, nothing twice, nothing left ----------------------------------
        with psycopg.connect(db) as conn:
            files = conn.execute(
                "SELECT batch_id, count(*), count(*) FILTER (WHERE status = 'converted') "
                "FROM audio_files GROUP BY batch_id ORDER BY batch_id"
            ).fetchall()
        assert files == [(b, FILES_PER_BATCH, FILES_PER_BATCH) for b in batch_ids]
        pushed = [json.loads(raw)["audio_id"] for raw in r.lrange(HOST_QUEUE, 0, -1)]
        assert len(pushed) == len(set(pushed)) == BATCHES * FILES_PER_BATCH
        assert r.llen("queue:echo") == 0
        assert r.zcard("retry:delayed") == 0
        assert r.llen(QUEUE_FAILED) == 0, r.lrange(QUEUE_FAILED, 0, -1)
        assert all(p.poll() is None for p in procs.values()), "a worker exited"
    finally:
        codes = stop_all(procs)
    assert codes == {name: 0 for name in procs}

    for name, log in logs.items():
        text = log.read_text()
        assert events(log, "redis.unavailable") == 1, f"{name}:\n{text[-4000:]}"
        assert events(log, "redis.recovered") == 1, f"{name}:\n{text[-4000:]}"
    assert events(logs["unpack"], "postgres.unavailable") == 1, logs["unpack"].read_text()[-4000:]
    assert events(logs["unpack"], "postgres.recovered") == 1, logs["unpack"].read_text()[-4000:]
    print(
        f"outages: Redis back -> all echo jobs done in {redis_resumed_s:.1f} s; "
        f"PostgreSQL back -> all batches unpacked in {pg_resumed_s:.1f} s; "
        f"test wall time {time.monotonic() - started:.0f} s"
    )
