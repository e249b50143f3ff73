"""A lost GPU host: its queue and the retries routed to it go to the shared queue.

The reaper (queue.move_lost_hosts) moves ``queue:transcribe:{H}`` and every delayed
retry routed there once no worker of H has a heartbeat; a host that is only slow
(its heartbeat alive) keeps its queue. End to end: two gpu "hosts" (two gpu-worker
processes with their own WORKER_HOST and SCRATCH_ROOT) on the real services; host 1
holds the batch's files and is killed -9 mid-batch; host 2 finishes every file from
S3, with nothing lost and no row written twice.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from audio_pipeline.config import QUEUE_FAILED, QUEUE_TRANSCRIBE, QUEUE_UNPACK
from audio_pipeline.queue import (
    DELAYED_KEY,
    JobQueue,
    RetryPolicy,
    host_alive_key,
    reap_dead_workers,
)
from devtools.dev_models import install_whisper
from devtools.sample import make_speech_batch
from tests.support.workerkit.procs import finish, start_module, wait_for

pytestmark = pytest.mark.integration

H1, H2 = "gpu-host-1", "gpu-host-2"
Q1, Q2 = f"{QUEUE_TRANSCRIBE}:{H1}", f"{QUEUE_TRANSCRIBE}:{H2}"
TTL = {"WORKER_HEARTBEAT_TTL_S": "2", "WORKER_HEARTBEAT_INTERVAL_S": "0.3"}


def retry_member(queue: str, payload: dict) -> str:
    return json.dumps({"queue": queue, "raw": json.dumps(payload), "id": payload["n"]})


def beat(redis_client, host: str) -> JobQueue:
    q = JobQueue(redis_client, f"gpu:{host}:1", "gpu", retry_policy=RetryPolicy())
    q.heartbeat(30, {"stage": "gpu", "host": host})
    return q


def test_a_slow_host_keeps_its_queue_and_a_lost_one_is_moved_once(redis_client):
    r = redis_client
    r.rpush(Q1, *[json.dumps({"n": f"q1-{i}"}) for i in range(3)])
    r.rpush(Q2, json.dumps({"n": "q2-0"}))
    due = time.time() + 3600  # a retry keeps its due time
    r.zadd(DELAYED_KEY, {retry_member(Q1, {"n": "r1"}): due, retry_member(Q2, {"n": "r2"}): due})
    slow = beat(r, H1)  # alive, however slowly it works
    beat(r, H2)

    reap_dead_workers(r, max_attempts=5)
    assert r.llen(Q1) == 3
    assert r.llen(QUEUE_TRANSCRIBE) == 0

    slow.unregister()  # a graceful stop (a deploy): back within the TTL, the queue stays
    reap_dead_workers(r, max_attempts=5)
    assert r.llen(Q1) == 3

    r.delete(host_alive_key(H1))  # a TTL of silence from every worker of host 1
    results: list[object] = []
    reapers = [
        threading.Thread(target=lambda: results.append(reap_dead_workers(r, max_attempts=5)))
        for _ in range(4)
    ]
    for t in reapers:
        t.start()
    for t in reapers:
        t.join()
    reap_dead_workers(r, max_attempts=5)  # and again after the lock: nothing left to move

    shared = [json.loads(x)["n"] for x in r.lrange(QUEUE_TRANSCRIBE, 0, -1)]
    assert shared == ["q1-0", "q1-1", "q1-2"]  # each once, in order
    assert r.llen(Q1) == 0
    assert r.llen(Q2) == 1  # host 2 is alive
    delayed = {
        json.loads(m)["id"]: (json.loads(m)["queue"], s)
        for m, s in r.zrange(DELAYED_KEY, 0, -1, withscores=True)
    }
    assert delayed == {"r1": (QUEUE_TRANSCRIBE, due), "r2": (Q2, due)}


def host_env(pipeline_env: dict[str, str], root: Path, host: str) -> dict[str, str]:
    scratch = root / host
    scratch.mkdir()
    return {**pipeline_env, "WORKER_HOST": host, "SCRATCH_ROOT": str(scratch)}


def statuses(db) -> dict[int, str]:
    db.commit()
    return {r["id"]: r["status"] for r in db.execute("SELECT id, status FROM audio_files")}


@pytest.mark.slow
def test_host_killed_mid_batch_its_files_finish_on_another_host_from_s3(
    pipeline_env, settings, db_conn, redis_client, s3_client, tmp_path
):
    from audio_pipeline import s3_utils

    install_whisper(settings.models_root)
    r = redis_client
    env1 = host_env(pipeline_env, tmp_path, H1)
    env2 = host_env(pipeline_env, tmp_path, H2)
    sample = make_speech_batch(
        tmp_path / "sample", "b-lost", n_files=8, seed=5, min_seconds=2, max_seconds=4
    )
    key = s3_utils.archive_key("b-lost")
    s3_utils.upload_file(s3_client, settings.s3_bucket, sample.tar_path, key)
    r.rpush(QUEUE_UNPACK, json.dumps({"batch_id": "b-lost", "s3_key": key}))
    code, out = finish(start_module("audio_pipeline.workers.unpack_worker", env1, ["--drain"]), 180)
    assert code == 0, out
    assert r.llen(Q1) == 8  # every file is on host 1's scratch and in its queue
    # one of them failed once and waits as a retry routed back to host 1
    r.zadd(DELAYED_KEY, {json.dumps({"queue": Q1, "raw": r.lpop(Q1), "id": "x"}): time.time() + 2})

    one = start_module(
        "audio_pipeline.workers.gpu_worker",
        env1,
        extra_env={**TTL, "BATCH_SIZE": "1"},
        log_path=tmp_path / "h1.log",
    )
    # host 2 starts once host 1 beats, or its first reaper would already find 1 lost
    wait_for(lambda: list(r.scan_iter(f"worker:gpu:{H1}:*")), 30, "host 1's heartbeat")
    two = start_module(
        "audio_pipeline.workers.gpu_worker", env2, extra_env=TTL, log_path=tmp_path / "h2.log"
    )
    try:
        wait_for(lambda: "done" in statuses(db_conn).values(), 120, "host 1's first file")
        one.send_signal(signal.SIGKILL)
        one.wait(timeout=10)
        shutil.rmtree(tmp_path / H1)  # its disk is gone with it: host 2 must use S3
        left = sum(1 for s in statuses(db_conn).values() if s != "done")
        assert left >= 3, "host 1 was killed mid-batch"
        wait_for(lambda: set(statuses(db_conn).values()) == {"done"}, 180, "host 2 finishing")
    finally:
        one.kill()
        two.send_signal(signal.SIGTERM)
        code2, _ = finish(two, 30)
    log2 = (tmp_path / "h2.log").read_text()
    assert code2 == 0, log2
    assert f"event=queue.host_lost host={H1}" in log2
    assert "event=gpu.fetched" in log2  # from S3: host 1's scratch is not here
    db_conn.commit()
    counts = db_conn.execute(
        "SELECT (SELECT count(*) FROM audio_files) AS files,"
        " (SELECT count(*) FROM transcripts) AS transcripts,"
        " (SELECT count(DISTINCT audio_id) FROM transcripts) AS distinct_ids"
    ).fetchone()
    assert counts == {"files": 8, "transcripts": 8, "distinct_ids": 8}
    b = db_conn.execute("SELECT * FROM batches WHERE batch_id = 'b-lost'").fetchone()
    assert (b["status"], b["files_failed"]) == ("done", 0)
    for queue in (Q1, Q2, QUEUE_TRANSCRIBE, QUEUE_FAILED):
        assert r.llen(queue) == 0, queue
    assert r.zcard(DELAYED_KEY) == 0
    assert not list(r.scan_iter("processing:*"))
    assert not (tmp_path / H2 / "b-lost").exists()  # host 2 cleaned what it fetched
