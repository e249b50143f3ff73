"""Deploys cost nothing, and a hung job is noticed: real worker processes, real services.

The stop grace (WORKER_STOP_GRACE_S): the first SIGTERM lets the claim in hand go on
that long; then the claim is handed back to the head of its queue, untouched and in
order, at no attempt's cost, and the process exits 0. A fresh worker then does the
work once.
"""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import suppress
from pathlib import Path

import pytest
import redis

from audio_pipeline import s3_utils
from audio_pipeline.config import QUEUE_FAILED, QUEUE_UNPACK
from devtools.sample import make_speech_batch
from tests.support.workerkit.echo_worker import DONE_KEY, STARTED_KEY
from tests.support.workerkit.procs import finish, start_module, wait_for

pytestmark = pytest.mark.integration

UNPACK = "audio_pipeline.workers.unpack_worker"
ECHO = "tests.support.workerkit.echo_worker"
ECHO_QUEUE = "queue:echo"
HOST_QUEUE = "queue:transcribe:testhost"
GRACE_S = 1.0
# What the exit may take beyond the grace: unwinding, terminating ffmpeg, the
# hand-back, the heartbeat thread's join and the interpreter's exit.
EXIT_MARGIN_S = 8.0


def processing_items(r: redis.Redis) -> list[str]:
    return [item for key in r.scan_iter("processing:*") for item in r.lrange(key, 0, -1)]


def stopped_within(proc, seconds: float) -> tuple[int, str, float]:
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, timeout=seconds + 30)
    return code, out, time.monotonic() - sent


# -- the stop grace -------------------------------------------------------------------


def test_a_long_unpack_is_handed_back_when_the_grace_runs_out_and_redone_once(
    pipeline_env, settings, db_conn, redis_client, s3_client, tmp_path: Path
):
    batch = make_speech_batch(
        tmp_path / "c", "b-grace", n_files=10, seed=5, min_seconds=8, max_seconds=14
    )
    key = s3_utils.archive_key("b-grace")
    s3_utils.upload_file(s3_client, settings.s3_bucket, batch.tar_path, key)
    job = json.dumps({"batch_id": "b-grace", "s3_key": key, "file_count": 10})
    redis_client.rpush(QUEUE_UNPACK, job)
    behind = json.dumps({"batch_id": "b-behind", "s3_key": "archives/b-behind.tar"})
    redis_client.rpush(QUEUE_UNPACK, behind)
    # one ffmpeg at a time, so the batch is surely still converting when the grace ends
    proc = start_module(
        UNPACK,
        pipeline_env,
        extra_env={"UNPACK_FFMPEG_JOBS": "1", "WORKER_STOP_GRACE_S": str(GRACE_S)},
        log_path=tmp_path / "first.log",
    )

    def converting() -> bool:
        db_conn.commit()
        found = db_conn.execute(
            "SELECT count(*) AS n FROM audio_files WHERE batch_id = 'b-grace'"
        ).fetchone()
        return found["n"] == 10

    wait_for(converting, timeout=60, what="the batch's rows, converting")
    code, _, took = stopped_within(proc, GRACE_S + EXIT_MARGIN_S)
    out = (tmp_path / "first.log").read_text()
    assert code == 0, out
    assert took < GRACE_S + EXIT_MARGIN_S, out
    assert "event=worker.stop_grace_expired stage=unpack" in out
    assert "jobs_in_hand=1" in out
    # back at the head, byte for byte (no attempt counted), ahead of the job behind it
    assert redis_client.lrange(QUEUE_UNPACK, 0, -1) == [job, behind]
    assert processing_items(redis_client) == []
    assert redis_client.llen(HOST_QUEUE) == 0, "nothing is queued from a batch handed back"
    assert "event=job.retry" not in out
    scratch = settings.batch_scratch("b-grace")
    assert not (scratch / "archive.tar").exists()
    assert not (scratch / "files").exists()
    assert not [p for p in scratch.rglob(".*") if p.is_file()], "no half-written Opus left"

    redis_client.lrem(QUEUE_UNPACK, 0, behind)  # a fresh worker does b-grace alone
    code, out = finish(start_module(UNPACK, pipeline_env, ["--drain"]), timeout=120)
    assert code == 0, out
    assert "event=unpack.batch stage=unpack batch_id=b-grace files=10 converted=10" in out
    assert "attempt=1" in out  # the redo is the job's first attempt
    db_conn.commit()
    rows = db_conn.execute(
        "SELECT rel_path, status, id FROM audio_files WHERE batch_id = 'b-grace'"
    ).fetchall()
    assert sorted(r["rel_path"] for r in rows) == sorted(batch.manifest)  # each once
    assert {r["status"] for r in rows} == {"converted"}
    jobs = [json.loads(j) for j in redis_client.lrange(HOST_QUEUE, 0, -1)]
    assert sorted(j["audio_id"] for j in jobs) == sorted(r["id"] for r in rows)
    assert sorted(p.name for p in scratch.iterdir()) == ["opus"]
    assert len(list((scratch / "opus").rglob("*.opus"))) == 10
    assert redis_client.llen(QUEUE_FAILED) == 0


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text[text.rfind(")") + 2 :].split()[1] == str(pid):
            found.append(int(stat.parent.name))
    return found


def test_an_ffmpeg_stopped_with_its_worker_hands_the_batch_back_unspent(
    pipeline_env, settings, db_conn, redis_client, s3_client, tmp_path: Path
):
    """A stop signal sent to the whole process group (Ctrl-C in a terminal) reaches
    ffmpeg too: the batch cannot finish, so it goes back at once, no attempt spent."""
    batch = make_speech_batch(
        tmp_path / "c", "b-group", n_files=6, seed=7, min_seconds=8, max_seconds=14
    )
    key = s3_utils.archive_key("b-group")
    s3_utils.upload_file(s3_client, settings.s3_bucket, batch.tar_path, key)
    job = json.dumps({"batch_id": "b-group", "s3_key": key})
    redis_client.rpush(QUEUE_UNPACK, job)
    proc = start_module(
        UNPACK,
        pipeline_env,
        extra_env={"UNPACK_FFMPEG_JOBS": "1", "WORKER_STOP_GRACE_S": "60"},
        log_path=tmp_path / "worker.log",
    )
    wait_for(lambda: children_of(proc.pid), timeout=60, what="an ffmpeg at work")
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 30  # well within the grace
    while proc.poll() is None and time.monotonic() < deadline:
        for child in children_of(proc.pid):  # the terminal signals the whole group
            with suppress(ProcessLookupError):
                os.kill(child, signal.SIGINT)
        time.sleep(0.05)
    code, _ = finish(proc, timeout=5)
    out = (tmp_path / "worker.log").read_text()
    assert code == 0, out
    assert "event=worker.stop_forced stage=unpack" in out
    assert "reason=" in out
    assert redis_client.lrange(QUEUE_UNPACK, 0, -1) == [job]
    assert processing_items(redis_client) == []
    assert "event=job.retry" not in out


def test_a_batched_claim_is_handed_back_in_order_when_the_grace_runs_out(
    pipeline_env, redis_client, tmp_path: Path
):
    jobs = [json.dumps({"id": i, "sleep": 30}) for i in "abc"] + [json.dumps({"id": "d"})]
    redis_client.rpush(ECHO_QUEUE, *jobs)
    proc = start_module(
        ECHO,
        pipeline_env,
        extra_env={"ECHO_BATCH_SIZE": "3", "WORKER_STOP_GRACE_S": str(GRACE_S)},
    )
    wait_for(lambda: redis_client.llen(STARTED_KEY) == 1, what="the claim's first job")
    code, out, took = stopped_within(proc, GRACE_S + EXIT_MARGIN_S)
    assert code == 0, out
    assert took < GRACE_S + EXIT_MARGIN_S, out
    assert redis_client.lrange(ECHO_QUEUE, 0, -1) == jobs  # untouched, in order
    assert redis_client.lrange(DONE_KEY, 0, -1) == []
    assert processing_items(redis_client) == []
    assert "event=worker.stop_grace_expired stage=echo" in out
    assert "jobs_in_hand=3" in out
    assert out.count("event=job.released") == 3


def test_a_claim_that_ends_within_the_grace_is_finished(pipeline_env, redis_client):
    redis_client.rpush(ECHO_QUEUE, json.dumps({"id": "short", "sleep": 1.0}))
    proc = start_module(ECHO, pipeline_env, extra_env={"WORKER_STOP_GRACE_S": "20"})
    wait_for(lambda: redis_client.llen(STARTED_KEY) == 1, what="job start")
    code, out, _ = stopped_within(proc, 10)
    assert code == 0, out
    assert redis_client.lrange(DONE_KEY, 0, -1) == ["short"]
    assert "event=worker.stop_grace_expired" not in out
    assert "event=job.released" not in out
