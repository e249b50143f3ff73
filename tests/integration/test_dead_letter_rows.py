"""Every path that dead-letters a job leaves its rows terminal, never working.

Retries used up, the reaper's dead letter (the worker died holding the job too
often) and a bad payload: for an unpack job the batch and its unconverted files end
``failed`` with the error and its scratch is gone; for a transcribe job the file
ends ``failed`` and its batch ``done`` with the failures counted. ``audio-pipeline
requeue`` then puts those rows back in play. Real worker processes, real services.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from audio_pipeline import s3_utils
from audio_pipeline.config import QUEUE_FAILED, QUEUE_UNPACK, host_transcribe_queue
from audio_pipeline.queue import ATTEMPTS_FIELD, processing_key, unsettled_key
from devtools.dev_models import install_whisper
from tests.support.rows import add_audio_file, add_batch
from tests.support.workerkit.procs import finish, start_module

pytestmark = pytest.mark.integration

UNPACK = "audio_pipeline.workers.unpack_worker"
GPU = "audio_pipeline.workers.gpu_worker"
CLI = Path(sys.executable).parent / "audio-pipeline"
DEAD_S3 = "http://127.0.0.1:9"  # nothing listens: every S3 call fails, transiently
WORKING = {"pending", "converted", "transcribing"}


def drain(module: str, env: dict[str, str], **extra_env: str) -> str:
    code, out = finish(start_module(module, env, ["--drain"], extra_env=extra_env), 240)
    assert code == 0, out
    return out


def requeue_all(env: dict[str, str]) -> dict:
    result = subprocess.run(
        [str(CLI), "requeue", "--all", "--json"],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def files(db, batch_id: str) -> dict[str, dict]:
    db.commit()
    cur = db.execute("SELECT * FROM audio_files WHERE batch_id = %s", (batch_id,))
    return {r["rel_path"]: r for r in cur.fetchall()}


def batch(db, batch_id: str) -> dict:
    db.commit()
    return db.execute("SELECT * FROM batches WHERE batch_id = %s", (batch_id,)).fetchone()


def letters(r) -> list[dict]:
    return [json.loads(e) for e in r.lrange(QUEUE_FAILED, 0, -1)]


def held_by_dead_worker(r, worker_id: str, queue: str, payload: dict) -> None:
    """The job as a worker killed mid-job leaves it: in its processing list, no heartbeat."""
    r.rpush(processing_key(worker_id, queue), json.dumps(payload))


def leftover_scratch(settings, batch_id: str) -> Path:
    root = settings.batch_scratch(batch_id)
    (root / "files").mkdir(parents=True)
    (root / "files" / "half.mp3").write_bytes(b"left by the try that failed")
    return root


def test_unpack_retries_used_up_fail_the_batch_and_its_waiting_files(
    pipeline_env, settings, db_conn, redis_client
):
    add_batch(db_conn, "b-dl-retries", "unpacking")
    for name in ("a.mp3", "b.mp3"):
        add_audio_file(db_conn, "b-dl-retries", name, "pending")
    db_conn.commit()
    scratch = leftover_scratch(settings, "b-dl-retries")
    redis_client.rpush(QUEUE_UNPACK, json.dumps({"batch_id": "b-dl-retries", "s3_key": "x.tar"}))

    drain(UNPACK, pipeline_env, S3_ENDPOINT=DEAD_S3, QUEUE_MAX_ATTEMPTS="2")

    [letter] = letters(redis_client)
    assert "gave up after 2 attempts" in letter["error"]
    row = batch(db_conn, "b-dl-retries")
    assert row["status"] == "failed"
    assert "gave up after 2 attempts" in row["error"]
    rows = files(db_conn, "b-dl-retries")
    assert {r["status"] for r in rows.values()} == {"failed"}
    assert all("gave up after 2 attempts" in r["error"] for r in rows.values())
    assert not scratch.exists()


def test_unpack_reaper_dead_letter_and_bad_payload_end_failed_then_requeue_reopens(
    pipeline_env, settings, db_conn, redis_client
):
    add_batch(db_conn, "b-dl-reaped", "unpacking")
    add_audio_file(db_conn, "b-dl-reaped", "a.mp3", "pending")
    add_audio_file(db_conn, "b-dl-reaped", "b.mp3", "converted", opus_path="/x/b.opus")
    add_audio_file(db_conn, "b-dl-reaped", "c.mp3", "done")
    add_batch(db_conn, "b-dl-bad", "transferred")
    add_batch(db_conn, "b-dl-orphan", "unpacking")
    db_conn.commit()
    scratch = leftover_scratch(settings, "b-dl-reaped")
    held_by_dead_worker(
        redis_client,
        "unpack:testhost:999999",
        QUEUE_UNPACK,
        {"batch_id": "b-dl-reaped", "s3_key": "archives/b-dl-reaped.tar", ATTEMPTS_FIELD: 1},
    )
    redis_client.rpush(QUEUE_UNPACK, json.dumps({"batch_id": "b-dl-bad", "s3_key": " "}))
    # a worker that dead-lettered a job and died before its hook ran
    orphan = json.dumps(
        {
            "job": json.dumps({"batch_id": "b-dl-orphan", "s3_key": "archives/b-dl-orphan.tar"}),
            "queue": QUEUE_UNPACK,
            "stage": "unpack",
            "worker": "unpack:testhost:999998",
            "error": "ConnectionError: S3 away (gave up after 5 attempts)",
            "attempts": 5,
            "failed_at": "2026-01-01T00:00:00+00:00",
        }
    )
    redis_client.rpush(QUEUE_FAILED, orphan)
    redis_client.rpush(unsettled_key("unpack"), orphan)

    out = drain(UNPACK, pipeline_env, QUEUE_MAX_ATTEMPTS="2")

    assert "event=reaper.dead_lettered" in out
    assert "event=job.failed_settled" in out
    by_batch = {json.loads(e["job"])["batch_id"]: e for e in letters(redis_client)}
    assert by_batch["b-dl-reaped"]["error"].startswith("WorkerDied")
    reaped = batch(db_conn, "b-dl-reaped")
    assert reaped["status"] == "failed"
    assert "WorkerDied" in reaped["error"]
    rows = files(db_conn, "b-dl-reaped")
    assert {k: r["status"] for k, r in rows.items()} == {
        "a.mp3": "failed",
        "b.mp3": "failed",
        "c.mp3": "done",  # the gpu stage's finished work is never undone
    }
    assert not scratch.exists()
    assert redis_client.llen(unsettled_key("unpack")) == 0
    bad = batch(db_conn, "b-dl-bad")
    assert bad["status"] == "failed"
    assert "'s3_key' is empty" in bad["error"]
    assert batch(db_conn, "b-dl-orphan")["error"] == (
        "ConnectionError: S3 away (gave up after 5 attempts)"
    )

    report = requeue_all(pipeline_env)
    assert report["requeued"] == 3
    assert {e["rows"] for e in report["entries"]} == {
        "batch b-dl-reaped",
        "batch b-dl-bad",
        "batch b-dl-orphan",
    }
    for batch_id in ("b-dl-reaped", "b-dl-bad", "b-dl-orphan"):
        row = batch(db_conn, batch_id)
        assert (row["status"], row["error"]) == ("transferred", None)


@pytest.mark.slow
def test_gpu_dead_letters_of_every_path_fail_the_file_and_finish_the_batch(
    pipeline_env, settings, db_conn, redis_client
):
    install_whisper(settings.models_root)
    add_batch(db_conn, "b-dl-gpu", "unpacked", file_count=4)
    scratch = settings.batch_scratch("b-dl-gpu")
    ids = {
        # an earlier try marked it and died in the model; this one cannot fetch it
        "retries": add_audio_file(
            db_conn,
            "b-dl-gpu",
            "retries.mp3",
            "transcribing",
            opus_path=str(scratch / "opus" / "retries.opus"),
            opus_s3_key=s3_utils.opus_key("b-dl-gpu", "retries.mp3"),
        ),
        # no path recorded yet, so the payload's id is trusted (gpu_worker's rule)
        "bad": add_audio_file(db_conn, "b-dl-gpu", "bad.mp3", "converted"),
        "reaped": add_audio_file(
            db_conn,
            "b-dl-gpu",
            "reaped.mp3",
            "transcribing",
            opus_path="/data/scratch/b-dl-gpu/opus/reaped.opus",
            host="lost-host",
        ),
        "done": add_audio_file(db_conn, "b-dl-gpu", "done.mp3", "done"),
    }
    db_conn.commit()
    leftover_scratch(settings, "b-dl-gpu")
    host_q = host_transcribe_queue("testhost")
    redis_client.rpush(
        host_q,
        json.dumps(
            {"audio_id": ids["retries"], "opus_path": str(scratch / "opus" / "retries.opus")}
        ),
        json.dumps({"audio_id": ids["bad"], "opus_path": ""}),
    )
    lost_q = host_transcribe_queue("lost-host")
    held_by_dead_worker(
        redis_client,
        "gpu:lost-host:4242",
        lost_q,
        {
            "audio_id": ids["reaped"],
            "opus_path": "/data/scratch/b-dl-gpu/opus/reaped.opus",
            "host": "lost-host",
            ATTEMPTS_FIELD: 1,
        },
    )

    out = drain(GPU, pipeline_env, S3_ENDPOINT=DEAD_S3, QUEUE_MAX_ATTEMPTS="2")

    assert "event=gpu.scratch_elsewhere" in out
    assert "host=lost-host" in out
    assert len(letters(redis_client)) == 3
    rows = {r["id"]: r for r in files(db_conn, "b-dl-gpu").values()}
    assert rows[ids["done"]]["status"] == "done"
    for name in ("retries", "bad", "reaped"):
        assert rows[ids[name]]["status"] == "failed", name
    assert "gave up after 2 attempts" in rows[ids["retries"]]["error"]
    assert "'opus_path' is empty" in rows[ids["bad"]]["error"]
    assert "WorkerDied" in rows[ids["reaped"]]["error"]
    finished = batch(db_conn, "b-dl-gpu")
    assert (finished["status"], finished["files_failed"]) == ("done", 3)
    assert finished["completed_at"] is not None
    assert not scratch.exists()
    assert redis_client.llen(unsettled_key("gpu")) == 0

    report = requeue_all(pipeline_env)
    assert report["requeued"] == 3
    rows = {r["id"]: r for r in files(db_conn, "b-dl-gpu").values()}
    for name in ("retries", "bad", "reaped"):
        assert (rows[ids[name]]["status"], rows[ids[name]]["error"]) == ("converted", None)
    reopened = batch(db_conn, "b-dl-gpu")
    assert (reopened["status"], reopened["completed_at"], reopened["files_failed"]) == (
        "unpacked",
        None,
        None,
    )
