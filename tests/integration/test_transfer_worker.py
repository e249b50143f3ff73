"""The transfer worker against the real sshd, SeaweedFS, PostgreSQL and Redis."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from audio_pipeline import s3_utils
from audio_pipeline.config import QUEUE_UNPACK
from tests.support.rows import add_batch
from tests.support.workerkit.procs import finish, start_module, wait_for

pytestmark = pytest.mark.integration

MODULE = "audio_pipeline.workers.transfer_worker"
FAST = {
    "TRANSFER_STABLE_S": "0.3",
    "TRANSFER_POLL_S": "0.2",
    "TRANSFER_RETRY_BASE_S": "0.2",
    "TRANSFER_MAX_FAILURES": "2",
}


@pytest.fixture
def collection(pipeline_env: dict[str, str]) -> Iterator[Path]:
    """This test's own directory on the collection host (the devstack's sshd)."""
    root = Path(pipeline_env["COLLECTION_DIR"])
    path = root / f"t-{uuid.uuid4().hex[:10]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def env(pipeline_env: dict[str, str], collection: Path) -> dict[str, str]:
    return {**pipeline_env, **FAST, "COLLECTION_DIR": str(collection)}


def make_tar(path: Path, files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def run(env: dict[str, str], *args: str, **extra: str) -> tuple[int, str]:
    return finish(start_module(MODULE, env, args or ("--drain",), extra_env=extra), timeout=90)


def unpack_jobs(r: redis.Redis) -> list[dict]:
    return [json.loads(x) for x in r.lrange(QUEUE_UNPACK, 0, -1)]


def s3_bytes(s3_client, bucket: str, key: str) -> bytes:
    return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_drain_transfers_complete_archives_once(env, collection, redis_client, db_conn, s3_client):
    one = make_tar(collection / "batch-001.tar", {"a/one.mp3": b"x" * 5000})
    two = make_tar(collection / "batch_002.v2.tar", {"two.mp3": os.urandom(20000)})
    (collection / "notes.txt").write_text("not an archive")
    code, out = run(env)
    assert code == 0, out

    jobs = unpack_jobs(redis_client)
    assert [j["batch_id"] for j in jobs] == ["batch-001", "batch_002.v2"]
    assert jobs[0]["s3_key"] == "archives/batch-001.tar"
    assert jobs[0]["file_count"] is None
    assert jobs[0]["transferred_at"].endswith("+00:00")
    assert time.time() - jobs[0]["_enqueued_at"] < 120  # the queue-wait metric's stamp
    bucket = env["S3_BUCKET"]
    assert s3_bytes(s3_client, bucket, "archives/batch-001.tar") == one
    assert s3_bytes(s3_client, bucket, "archives/batch_002.v2.tar") == two
    rows = db_conn.execute(
        "SELECT batch_id, status, archive_bytes, archive_sha256, source_path, transferred_at "
        "FROM batches ORDER BY batch_id"
    ).fetchall()
    assert [(r["batch_id"], r["status"]) for r in rows] == [
        ("batch-001", "transferred"),
        ("batch_002.v2", "transferred"),
    ]
    assert rows[0]["archive_bytes"] == len(one)
    assert rows[0]["archive_sha256"] == s3_utils.sha256_file(
        collection / "transferred" / "batch-001.tar"
    )
    assert rows[0]["source_path"] == str(collection / "batch-001.tar")
    # put aside on the collection host, nothing left in local staging
    assert sorted(p.name for p in collection.iterdir()) == ["notes.txt", "transferred"]
    assert list((Path(env["SCRATCH_ROOT"]) / "transfer").iterdir()) == []
    assert "event=transfer.enqueued" in out

    # a second run finds nothing new and enqueues nothing again
    code, out = run(env)
    assert code == 0, out
    assert len(unpack_jobs(redis_client)) == 2


def test_bad_names_are_skipped_with_a_clear_error(env, collection, redis_client, db_conn):
    make_tar(collection / "bad name!.tar", {"a.mp3": b"1"})
    make_tar(collection / "-dash-first.tar", {"a.mp3": b"1"})
    make_tar(collection / "newline\n.tar", {"a.mp3": b"1"})  # "$" in re.match let it pass
    make_tar(collection / "good.tar", {"a.mp3": b"1"})
    code, out = run(env)
    assert code == 0, out
    assert out.count("event=transfer.bad_name") == 3
    assert 'file="bad name!.tar"' in out
    assert "not a valid batch_id" in out
    assert [j["batch_id"] for j in unpack_jobs(redis_client)] == ["good"]
    assert db_conn.execute("SELECT count(*) AS n FROM batches").fetchone()["n"] == 1
    assert (collection / "bad name!.tar").exists()  # left where it was, untouched


def test_marker_mode_waits_for_the_done_file(env, collection, redis_client):
    env = {**env, "TRANSFER_COMPLETENESS": "marker"}
    make_tar(collection / "m1.tar", {"a.mp3": b"1"})
    code, out = run(env)
    assert code == 0, out
    assert unpack_jobs(redis_client) == []
    (collection / "m1.tar.done").touch()
    code, out = run(env)
    assert code == 0, out
    assert [j["batch_id"] for j in unpack_jobs(redis_client)] == ["m1"]
    assert sorted(p.name for p in (collection / "transferred").iterdir()) == [
        "m1.tar",
        "m1.tar.done",
    ]


def test_mark_mode_leaves_the_file_and_never_rescans_it(env, collection, redis_client):
    env = {**env, "TRANSFER_AFTER": "mark"}
    make_tar(collection / "k1.tar", {"a.mp3": b"1"})
    for _ in range(2):
        code, out = run(env)
        assert code == 0, out
    assert (collection / "k1.tar").exists()
    assert (collection / "k1.tar.transferred").exists()
    assert len(unpack_jobs(redis_client)) == 1


def test_a_growing_file_waits_until_its_size_is_stable(
    env, collection, redis_client, s3_client, tmp_path
):
    env = {**env, "TRANSFER_STABLE_S": "1.5"}
    target = collection / "growing.tar"
    content = make_tar(tmp_path / "full.tar", {"a.mp3": os.urandom(200_000)})
    proc = start_module(MODULE, env, log_path=tmp_path / "worker.log")
    try:
        with target.open("wb") as f:
            for start in range(0, len(content), len(content) // 8):
                f.write(content[start : start + len(content) // 8])
                f.flush()
                time.sleep(0.5)  # an upload still in progress, 4 s in all
                assert unpack_jobs(redis_client) == [], "took a file that was still growing"
        wait_for(lambda: unpack_jobs(redis_client), 20, "the stable file to be queued")
        assert s3_bytes(s3_client, env["S3_BUCKET"], "archives/growing.tar") == content
    finally:
        proc.send_signal(signal.SIGTERM)
        code, _ = finish(proc, timeout=20)
    assert code == 0


def test_progress_is_logged_and_a_partial_copy_resumes(
    env, collection, redis_client, db_conn, s3_client
):
    content = make_tar(collection / "big.tar", {"big.mp3": os.urandom(3 * 1024 * 1024)})
    # What a crash mid-copy leaves: a 'transferring' row and the first bytes staged.
    add_batch(db_conn, "big", "transferring")
    db_conn.commit()
    staging = Path(env["SCRATCH_ROOT"]) / "transfer"
    staging.mkdir()
    (staging / "big.tar.part").write_bytes(content[:1_000_000])
    code, out = run(env, TRANSFER_PROGRESS_S="0")
    assert code == 0, out
    assert "event=transfer.resumed batch_id=big from_bytes=1000000" in out
    assert "event=transfer.progress batch_id=big" in out
    assert "percent=" in out
    assert s3_bytes(s3_client, env["S3_BUCKET"], "archives/big.tar") == content
    assert [j["batch_id"] for j in unpack_jobs(redis_client)] == ["big"]


def test_a_corrupt_partial_copy_is_caught_and_redone(env, collection, redis_client, s3_client):
    content = make_tar(collection / "c1.tar", {"a.mp3": os.urandom(300_000)})
    staging = Path(env["SCRATCH_ROOT"]) / "transfer"
    staging.mkdir()
    (staging / "c1.tar.part").write_bytes(b"\0" * 1000)  # not a prefix of the real file
    code, out = run(env)
    assert code == 0, out
    assert "differs from the remote" in out
    assert s3_bytes(s3_client, env["S3_BUCKET"], "archives/c1.tar") == content
    assert [j["batch_id"] for j in unpack_jobs(redis_client)] == ["c1"]


def test_crash_after_commit_before_enqueue_is_reconciled_once(
    env, collection, redis_client, db_conn
):
    # First run does everything; then put the world back as a crash between the
    # DB commit and the enqueue would leave it (remote file not yet put aside).
    make_tar(collection / "r1.tar", {"a.mp3": b"1"})
    code, out = run(env)
    assert code == 0, out
    shutil.move(collection / "transferred" / "r1.tar", collection / "r1.tar")
    redis_client.delete(QUEUE_UNPACK)
    code, out = run(env)
    assert code == 0, out
    # the marker says it was enqueued already: no second job
    assert unpack_jobs(redis_client) == []
    assert "event=transfer.already_enqueued batch_id=r1" in out
    assert (collection / "transferred").exists()
    assert not (collection / "r1.tar").exists()
    # with the marker gone too (the crash came before the enqueue), start-up
    # reconciliation pushes the job exactly once
    redis_client.delete("transfer:enqueued:r1")
    for _ in range(2):
        code, out = run(env)
        assert code == 0, out
    assert [j["batch_id"] for j in unpack_jobs(redis_client)] == ["r1"]


def test_a_redropped_batch_is_put_aside_not_copied_twice(env, collection, redis_client):
    make_tar(collection / "d1.tar", {"a.mp3": b"1"})
    assert run(env)[0] == 0
    make_tar(collection / "d1.tar", {"a.mp3": b"different"})
    code, out = run(env)
    assert code == 0, out
    assert "event=transfer.already_done" in out
    assert len(unpack_jobs(redis_client)) == 1
    assert len(list((collection / "transferred").iterdir())) == 2  # both kept, none lost


def test_kill_9_mid_copy_then_restart_finishes_exactly_once(
    env, collection, redis_client, s3_client, tmp_path
):
    content = make_tar(collection / "k9.tar", {"big.mp3": os.urandom(24 * 1024 * 1024)})
    log = tmp_path / "first.log"
    first = start_module(MODULE, env, extra_env={"TRANSFER_PROGRESS_S": "0"}, log_path=log)
    wait_for(lambda: "event=transfer.progress" in log.read_text(), 30, "copy under way")
    first.kill()
    first.wait(timeout=10)
    code, out = run(env)
    assert code == 0, out
    assert s3_bytes(s3_client, env["S3_BUCKET"], "archives/k9.tar") == content
    assert [j["batch_id"] for j in unpack_jobs(redis_client)] == ["k9"]
    if "event=job.done" not in log.read_text():  # the kill landed mid-copy (the usual case)
        assert "event=transfer.resumed batch_id=k9" in out


def test_unknown_host_key_fails_once_mode_clearly(env, collection, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    code, out = run(env, "--once", COLLECTION_SSH_KNOWN_HOSTS=str(empty))
    assert code == 1
    assert "event=transfer.scan_failed" in out
    assert "not found in known_hosts" in out


def test_missing_configuration_is_named(env):
    code, out = run({**env, "COLLECTION_SSH_HOST": ""}, "--once")
    assert code == 2
    assert "COLLECTION_SSH_HOST must be set" in out
    code, out = run({**env, "TRANSFER_COMPLETENESS": "vibes"}, "--once")
    assert code == 2
    assert "TRANSFER_COMPLETENESS='vibes' is not one of: stable, marker" in out
