"""The unpack worker as a real process against real Redis, PostgreSQL, S3 and ffmpeg.

Good batches become Opus files in S3 and on scratch, audio_files rows and one
transcribe job per file on this host's queue. Bad jobs (malformed payloads,
missing archives, every kind of malicious or broken tar, a batch of MP3s that
are really text) each leave a clear dead letter and a failed batch, while the
same worker process keeps serving; nothing is written outside scratch.
"""

from __future__ import annotations

import hashlib
import json
import signal
import tarfile
import time
from pathlib import Path

import pytest

from audio_pipeline import s3_utils
from audio_pipeline.config import QUEUE_FAILED, QUEUE_UNPACK, ConfigError
from audio_pipeline.queue import PermanentJobError
from audio_pipeline.workers.unpack_worker import UnpackRequest, UnpackSettings
from devtools.sample import make_speech_batch
from tests.support import malicious_tars as bad
from tests.support.rows import add_batch
from tests.support.workerkit.procs import finish, start_module, wait_for

pytestmark = pytest.mark.integration

WORKER = "audio_pipeline.workers.unpack_worker"
HOST_QUEUE = "queue:transcribe:testhost"
TEXT_MP3 = b"This file is called .mp3 but it is really text.\n" * 40


def put_archive(settings, s3_client, tar: Path, batch_id: str) -> str:
    key = s3_utils.archive_key(batch_id)
    s3_utils.upload_file(s3_client, settings.s3_bucket, tar, key)
    return key


def unpack_job(batch_id: str, **extra) -> str:
    job = {
        "batch_id": batch_id,
        "s3_key": f"archives/{batch_id}.tar",
        "file_count": None,
        "transferred_at": "2026-01-01T00:00:00+00:00",
        **extra,
    }
    return json.dumps(job)


def run_drain(env: dict[str, str], timeout: float = 120, **extra_env: str) -> str:
    code, out = finish(start_module(WORKER, env, ["--drain"], extra_env=extra_env), timeout)
    assert code == 0, out
    return out


def rows(db_conn, batch_id: str) -> dict[str, dict]:
    cur = db_conn.execute("SELECT * FROM audio_files WHERE batch_id = %s", (batch_id,))
    return {r["rel_path"]: r for r in cur.fetchall()}


def batch_row(db_conn, batch_id: str) -> dict | None:
    return db_conn.execute("SELECT * FROM batches WHERE batch_id = %s", (batch_id,)).fetchone()


def tree(root: Path, skip: Path | None = None) -> dict[str, bytes | None]:
    """Every path under root with its content (None for directories)."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        out[str(p.relative_to(root))] = None if p.is_dir() else p.read_bytes()
    return out


def dead_letters(redis_client) -> list[dict]:
    return [json.loads(e) for e in redis_client.lrange(QUEUE_FAILED, 0, -1)]


@pytest.fixture
def speech(tmp_path):
    return make_speech_batch(
        tmp_path / "collection",
        "b-odd",
        n_files=7,
        seed=3,
        min_seconds=2,
        max_seconds=5,
        extra_members={"broken/really text.mp3": TEXT_MP3},
    )


def test_nested_batch_with_odd_names(
    pipeline_env, settings, db_conn, redis_client, s3_client, speech
):
    put_archive(settings, s3_client, speech.tar_path, "b-odd")
    redis_client.rpush(QUEUE_UNPACK, unpack_job("b-odd", file_count=8))

    out = run_drain(pipeline_env)

    assert "event=unpack.batch stage=unpack batch_id=b-odd files=8 converted=7 failed=1" in out
    with tarfile.open(speech.tar_path) as tf:
        originals = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
    found = rows(db_conn, "b-odd")
    assert set(found) == set(originals)
    scratch = settings.batch_scratch("b-odd")
    jobs = [json.loads(j) for j in redis_client.lrange(HOST_QUEUE, 0, -1)]
    assert len(jobs) == 7
    by_id = {j["audio_id"]: j for j in jobs}
    for rel, text in speech.manifest.items():
        row = found[rel]
        assert text
        assert row["status"] == "converted", row
        assert row["size_bytes"] == len(originals[rel])
        assert row["sha256"] == hashlib.sha256(originals[rel]).hexdigest()
        assert row["duration_s"] == pytest.approx(speech.durations[rel], abs=0.2)
        assert row["opus_s3_key"] == s3_utils.opus_key("b-odd", rel)
        assert row["host"] == "testhost"
        opus = Path(row["opus_path"])
        assert opus.is_file()
        assert opus.is_relative_to(scratch / "opus")
        assert s3_utils.object_exists(s3_client, settings.s3_bucket, row["opus_s3_key"])
        job = dict(by_id[row["id"]])
        assert time.time() - job.pop("_enqueued_at") < 300  # the queue-wait metric's stamp
        assert job == {
            "audio_id": row["id"],
            "opus_path": row["opus_path"],
            "batch_id": "b-odd",
            "opus_s3_key": row["opus_s3_key"],
            "host": "testhost",
        }
    broken = found["broken/really text.mp3"]
    assert broken["status"] == "failed"
    assert broken["error"].startswith("not a readable audio file")
    assert broken["opus_path"] is None
    batch = batch_row(db_conn, "b-odd")
    assert (batch["status"], batch["file_count"], batch["unpack_host"]) == (
        "unpacked",
        8,
        "testhost",
    )
    assert batch["unpacked_at"] is not None
    # the tar and the extracted MP3s are gone; only Opus files remain
    assert sorted(p.name for p in scratch.iterdir()) == ["opus"]
    assert all(p.suffix == ".opus" for p in (scratch / "opus").rglob("*") if p.is_file())
    assert redis_client.llen(QUEUE_UNPACK) == 0
    assert dead_letters(redis_client) == []
    assert list(redis_client.scan_iter("processing:*")) == []


def test_redelivery_neither_duplicates_rows_nor_requeues_finished_files(
    pipeline_env, settings, db_conn, redis_client, s3_client, speech
):
    put_archive(settings, s3_client, speech.tar_path, "b-odd")
    redis_client.rpush(QUEUE_UNPACK, unpack_job("b-odd"))
    run_drain(pipeline_env)
    first = rows(db_conn, "b-odd")
    # the gpu stage finishes two files and deletes their Opus, then the job comes again
    done = sorted(speech.manifest)[:2]
    for rel in done:
        db_conn.execute(
            "UPDATE audio_files SET status = 'done' WHERE batch_id = 'b-odd' AND rel_path = %s",
            (rel,),
        )
        Path(first[rel]["opus_path"]).unlink()
    db_conn.commit()
    redis_client.delete(HOST_QUEUE)
    redis_client.rpush(QUEUE_UNPACK, unpack_job("b-odd"))

    out = run_drain(pipeline_env)

    assert "already_taken=2" in out
    second = rows(db_conn, "b-odd")
    assert {r: v["id"] for r, v in second.items()} == {r: v["id"] for r, v in first.items()}
    assert [second[r]["status"] for r in done] == ["done", "done"]
    queued = {json.loads(j)["audio_id"] for j in redis_client.lrange(HOST_QUEUE, 0, -1)}
    assert queued == {first[r]["id"] for r in speech.manifest if r not in done}
    assert db_conn.execute("SELECT count(*) AS n FROM audio_files").fetchone()["n"] == 8


def _bad_archives(tars: Path, outside: Path) -> dict[str, tuple[Path, str]]:
    """batch_id -> (archive, text its dead letter must contain)."""
    return {
        "bad-dotdot": (bad.traversal_tar(tars / "1.tar"), "unsafe archive: member '../../../"),
        "bad-absolute": (
            bad.absolute_path_tar(tars / "2.tar", outside / "abs.mp3"),
            "has an absolute path",
        ),
        "bad-symlink": (bad.symlink_tar(tars / "3.tar", outside), "is a symlink"),
        "bad-hardlink": (bad.hardlink_tar(tars / "4.tar", outside / "victim.txt"), "is a hardlink"),
        "bad-device": (bad.device_tar(tars / "5.tar"), "is a device file"),
        "bad-fifo": (bad.fifo_tar(tars / "6.tar"), "is a fifo"),
        "bad-huge": (bad.huge_declared_size_tar(tars / "7.tar"), "UNPACK_MAX_MEMBER_BYTES"),
        "bad-many": (bad.too_many_members_tar(tars / "8.tar", 30), "more than 20 members"),
        "bad-truncated": (bad.truncated_tar(tars / "9.tar"), "corrupt archive: archive is trunc"),
        "bad-not-a-tar": (bad.not_a_tar(tars / "10.tar"), "corrupt archive: not a readable tar"),
        "bad-zero": (bad.zero_byte_file(tars / "11.tar"), "empty archive: archive is empty"),
        "bad-empty": (bad.empty_tar(tars / "12.tar"), "empty archive: archive has no members"),
        "bad-no-audio": (bad.no_audio_tar(tars / "13.tar"), "no audio files"),
        "bad-all-text": (
            bad.write_tar(
                tars / "14.tar", [bad._file("a.mp3", TEXT_MP3), bad._file("sub/b.MP3", TEXT_MP3)]
            ),
            "none of the 2 audio files could be converted",
        ),
        "bad-gzip": (
            bad.gzip_pax_bomb_tar(tars / "15.tar", declared=64 * bad.MB),
            "unusable archive: archive is gzip-compressed",
        ),
        "bad-pax-header": (
            bad.oversized_header_tar(tars / "16.tar", declared=bad.MB),
            "unsafe archive: pax extended header at byte 0 declares 1048576",
        ),
    }


def test_bad_jobs_are_dead_lettered_and_the_worker_keeps_serving(
    pipeline_env, settings, db_conn, redis_client, s3_client, tmp_path, speech
):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("original\n")
    tars = tmp_path / "tars"
    tars.mkdir()
    archives = _bad_archives(tars, outside)
    for batch_id, (tar, _) in archives.items():
        put_archive(settings, s3_client, tar, batch_id)
    put_archive(settings, s3_client, speech.tar_path, "b-good")
    payload_cases = {
        "not json {": "malformed JSON",
        json.dumps({"s3_key": "archives/x.tar"}): "missing key 'batch_id'",
        json.dumps({"batch_id": 7, "s3_key": "archives/x.tar"}): "key 'batch_id' must be str",
        json.dumps({"batch_id": "../../etc", "s3_key": "archives/x.tar"}): "invalid batch_id",
        json.dumps(
            {"batch_id": "ok", "s3_key": "archives/ok.tar", "file_count": "7"}
        ): "file_count must be int",
        unpack_job("b-missing"): "archive s3://",
    }
    redis_client.rpush(QUEUE_UNPACK, *payload_cases)
    redis_client.rpush(QUEUE_UNPACK, *[unpack_job(b) for b in archives])
    redis_client.rpush(QUEUE_UNPACK, unpack_job("b-good"))
    before = tree(tmp_path, skip=tmp_path / "scratch")

    out = run_drain(pipeline_env, UNPACK_MAX_MEMBERS="20")

    # one worker process handled every job in turn and ended with the good batch
    assert out.count("event=worker.started") == 1
    assert "event=unpack.batch stage=unpack batch_id=b-good files=8 converted=7" in out
    letters = dead_letters(redis_client)
    assert len(letters) == len(payload_cases) + len(archives)
    expected_errors = [*payload_cases.values(), *[m for _, m in archives.values()]]
    for letter, expected in zip(letters, expected_errors, strict=True):
        assert expected in letter["error"], letter
        assert letter["stage"] == "unpack"
        assert letter["queue"] == QUEUE_UNPACK
        assert letter["attempts"] <= 1, "a permanent error is not retried"
    assert "b-missing" in letters[len(payload_cases) - 1]["error"]
    for batch_id, (_, expected) in archives.items():
        batch = batch_row(db_conn, batch_id)
        assert batch["status"] == "failed", batch_id
        assert expected in batch["error"], batch_id
    all_text = rows(db_conn, "bad-all-text")
    assert {r["status"] for r in all_text.values()} == {"failed"}
    assert all(r["error"].startswith("not a readable audio file") for r in all_text.values())
    # nothing written outside scratch, and scratch holds only the good batch's Opus
    assert tree(tmp_path, skip=tmp_path / "scratch") == before
    assert (outside / "victim.txt").read_text() == "original\n"
    assert [p.name for p in settings.scratch_root.iterdir()] == ["b-good"]
    assert redis_client.llen(HOST_QUEUE) == 7
    assert list(redis_client.scan_iter("processing:*")) == []


def _run_until_paused(env: dict[str, str], log: Path, **extra_env: str) -> str:
    """Start a worker, wait until it reports back-pressure, stop it; returns its log."""
    proc = start_module(WORKER, env, extra_env=extra_env, log_path=log)
    try:
        wait_for(lambda: "event=unpack.paused" in log.read_text(), timeout=20, what="pause")
    finally:
        proc.send_signal(signal.SIGTERM)
        code, _ = finish(proc)
    out = log.read_text()
    assert code == 0, out
    return out


def test_back_pressure_on_a_full_host_queue_and_low_scratch(
    pipeline_env, settings, db_conn, redis_client, s3_client, speech, tmp_path
):
    put_archive(settings, s3_client, speech.tar_path, "b-odd")
    redis_client.rpush(QUEUE_UNPACK, unpack_job("b-odd"))
    redis_client.rpush(HOST_QUEUE, "{}", "{}")

    out = _run_until_paused(pipeline_env, tmp_path / "a.log", UNPACK_MAX_HOST_QUEUE="2")
    assert "2 jobs in queue:transcribe:testhost (UNPACK_MAX_HOST_QUEUE=2)" in out
    assert redis_client.llen(QUEUE_UNPACK) == 1, "nothing claimed while the host queue is full"

    out = _run_until_paused(pipeline_env, tmp_path / "b.log", UNPACK_MIN_FREE_BYTES=str(2**62))
    assert f"(UNPACK_MIN_FREE_BYTES={2**62})" in out
    assert redis_client.llen(QUEUE_UNPACK) == 1, "nothing claimed while scratch is short"
    assert batch_row(db_conn, "b-odd") is None

    # a running worker resumes by itself once the gpu side drains the host queue
    log = tmp_path / "worker.log"
    proc = start_module(
        WORKER, pipeline_env, extra_env={"UNPACK_MAX_HOST_QUEUE": "2"}, log_path=log
    )
    try:
        wait_for(lambda: "event=unpack.paused" in log.read_text(), timeout=20, what="pause")
        assert batch_row(db_conn, "b-odd") is None
        redis_client.delete(HOST_QUEUE)

        def unpacked() -> bool:
            db_conn.commit()  # see the worker's commits
            row = batch_row(db_conn, "b-odd")
            return row is not None and row["status"] == "unpacked"

        wait_for(unpacked, timeout=90, what="batch unpacked after the queue drained")
    finally:
        proc.send_signal(signal.SIGTERM)
        code, _ = finish(proc)
    out = log.read_text()
    assert code == 0, out
    assert "event=unpack.resumed" in out
    # it stopped claiming again once its own jobs filled the host queue
    assert redis_client.llen(HOST_QUEUE) == 7


def test_request_validation():
    assert (
        UnpackRequest.from_payload(
            {"batch_id": "b-1", "s3_key": "archives/b-1.tar", "file_count": 3}
        ).file_count
        == 3
    )
    for payload, message in [
        ({"batch_id": "b-1"}, "missing key 's3_key'"),
        ({"batch_id": "a/b", "s3_key": "k"}, "invalid batch_id"),
        ({"batch_id": ".hidden", "s3_key": "k"}, "invalid batch_id"),
        ({"batch_id": "b", "s3_key": " "}, "'s3_key' is empty"),
        ({"batch_id": "b", "s3_key": "k", "file_count": True}, "file_count must be int"),
    ]:
        with pytest.raises(PermanentJobError, match=message):
            UnpackRequest.from_payload(payload)


def test_settings_from_env():
    s = UnpackSettings.from_env(
        {
            "UNPACK_MAX_HOST_QUEUE": "5",
            "UNPACK_MIN_FREE_BYTES": "0",
            "UNPACK_MAX_MEMBERS": "9",
            "OPUS_BITRATE": "16k",
        }
    )
    assert (s.max_host_queue, s.min_free_bytes) == (5, 0)
    assert (s.limits.max_members, s.audio.opus_bitrate) == (9, "16k")
    with pytest.raises(ConfigError, match="UNPACK_MAX_HOST_QUEUE"):
        UnpackSettings.from_env({"UNPACK_MAX_HOST_QUEUE": "0"})


def test_a_batch_already_done_is_skipped(
    pipeline_env, settings, db_conn, redis_client, s3_client, speech
):
    put_archive(settings, s3_client, speech.tar_path, "b-odd")
    add_batch(db_conn, "b-odd", "done")
    db_conn.commit()
    redis_client.rpush(QUEUE_UNPACK, unpack_job("b-odd"))

    out = run_drain(pipeline_env)

    assert "event=unpack.skipped" in out
    assert batch_row(db_conn, "b-odd")["status"] == "done"
    assert rows(db_conn, "b-odd") == {}
    assert redis_client.llen(HOST_QUEUE) == 0
    assert dead_letters(redis_client) == []
    assert not settings.batch_scratch("b-odd").exists()


def test_kill_9_mid_batch_then_restart_loses_nothing_and_duplicates_nothing(
    pipeline_env, settings, db_conn, redis_client, s3_client, tmp_path
):
    big = make_speech_batch(
        tmp_path / "c", "b-kill", n_files=10, seed=11, min_seconds=8, max_seconds=14
    )
    put_archive(settings, s3_client, big.tar_path, "b-kill")
    redis_client.rpush(QUEUE_UNPACK, unpack_job("b-kill"))
    # one ffmpeg at a time, so the batch is surely still converting when killed
    proc = start_module(
        WORKER, pipeline_env, extra_env={"UNPACK_FFMPEG_JOBS": "1"}, log_path=tmp_path / "first.log"
    )

    def some_converted() -> bool:
        db_conn.commit()
        return any(r["status"] == "converted" for r in rows(db_conn, "b-kill").values())

    try:
        wait_for(some_converted, timeout=60, what="a first converted file")
    finally:
        proc.kill()
        proc.wait()
    first = rows(db_conn, "b-kill")
    assert any(r["status"] == "pending" for r in first.values()), "killed mid-batch"
    assert redis_client.llen(HOST_QUEUE) == 0, "jobs are pushed only once the batch is unpacked"

    # the dead worker's heartbeat expires (1.5 s in tests); the next worker reaps its job
    wait_for(
        lambda: not list(redis_client.scan_iter("worker:unpack:*")),
        timeout=10,
        what="heartbeat expiry",
    )
    out = run_drain(pipeline_env)

    assert "event=unpack.batch stage=unpack batch_id=b-kill files=10 converted=10" in out
    second = rows(db_conn, "b-kill")
    assert {r: v["id"] for r, v in second.items()} == {r: v["id"] for r, v in first.items()}
    assert {v["status"] for v in second.values()} == {"converted"}
    jobs = [json.loads(j) for j in redis_client.lrange(HOST_QUEUE, 0, -1)]
    assert sorted(j["audio_id"] for j in jobs) == sorted(v["id"] for v in second.values())
    assert batch_row(db_conn, "b-kill")["status"] == "unpacked"
    scratch = settings.batch_scratch("b-kill")
    assert sorted(p.name for p in scratch.iterdir()) == ["opus"]
    assert not [p for p in (scratch / "opus").rglob("*") if p.name.startswith(".")]
    assert dead_letters(redis_client) == []


def test_a_dead_s3_service_is_retried_then_fails_the_batch_clearly(
    pipeline_env, db_conn, redis_client
):
    # S3 pointed at a port nothing listens on: a transient error, retried with
    # backoff; once the tries are used up the job is dead-lettered and the batch
    # row says why, instead of staying 'unpacking' forever.
    redis_client.rpush(QUEUE_UNPACK, unpack_job("b-dead-s3"))
    out = run_drain(
        pipeline_env,
        timeout=180,
        S3_ENDPOINT="http://127.0.0.1:9",
        QUEUE_MAX_ATTEMPTS="2",
        QUEUE_RETRY_BASE_S="0.2",
        QUEUE_RETRY_CAP_S="0.5",
    )
    assert "job.retry" in out
    [letter] = dead_letters(redis_client)
    assert letter["stage"] == "unpack"
    assert letter["attempts"] == 2
    assert "gave up after 2 attempts" in letter["error"]
    batch = batch_row(db_conn, "b-dead-s3")
    assert batch["status"] == "failed"
    assert "gave up after 2 attempts" in batch["error"]
    assert not (Path(pipeline_env["SCRATCH_ROOT"]) / "b-dead-s3").exists()
