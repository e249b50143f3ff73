"""The real ``audio-pipeline`` console script against the local stack."""

from __future__ import annotations

import json
import re
import time

import pytest

from audio_pipeline.cli import render_table
from audio_pipeline.config import QUEUE_FAILED, QUEUE_TRANSCRIBE, QUEUE_UNPACK
from audio_pipeline.queue import (
    ENQUEUED_FIELD,
    JobQueue,
    RetryPolicy,
    processing_key,
    reap_dead_workers,
)
from tests.support.operator_cli import run_cli as cli
from tests.support.operator_page import dead_letter
from tests.support.rows import add_audio_file, add_batch

pytestmark = pytest.mark.integration


def test_status_shows_queues_workers_processing_retries_and_batches(
    pipeline_env, redis_client, db_conn
):
    redis_client.rpush(QUEUE_UNPACK, '{"batch_id": "b1"}', '{"batch_id": "b2"}')
    redis_client.rpush(f"{QUEUE_TRANSCRIBE}:gpu-01", '{"audio_id": 1, "opus_path": "/a"}')
    live = JobQueue(redis_client, "unpack:gpu-01:77", "unpack")
    live.heartbeat(60, {"stage": "unpack", "state": "busy", "job_raw": '{"batch_id": "b1"}'})
    live.claim([QUEUE_UNPACK], 0)
    JobQueue(redis_client, "gpu:gpu-02:5", "gpu").enqueue(QUEUE_TRANSCRIBE, {"audio_id": 2})
    JobQueue(redis_client, "gpu:gpu-02:5", "gpu").claim([QUEUE_TRANSCRIBE], 0)  # no heartbeat
    slow = JobQueue(redis_client, "gpu:gpu-01:9", "gpu", retry_policy=RetryPolicy(5, 300, 600))
    slow.enqueue(QUEUE_TRANSCRIBE, {"audio_id": 3})
    slow.retry(slow.claim([QUEUE_TRANSCRIBE], 0), "flaky")
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "bad"})
    add_batch(db_conn, "b1", "unpacking", file_count=3)
    add_batch(db_conn, "b0", "done", file_count=2)
    db_conn.commit()

    result = cli(pipeline_env, "status")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^queue:unpack +1$", out, re.M)  # b1 is claimed, b2 waits
    assert re.search(r"^queue:transcribe:gpu-01 +1$", out, re.M)
    assert re.search(r"^queue:failed +1$", out, re.M)
    assert "unpack:gpu-01:77" in out
    assert "DEAD" in out  # gpu:gpu-02:5 holds an item with no heartbeat
    assert "b1" in out
    assert "unpacking" in out

    data = json.loads(cli(pipeline_env, "status", "--json").stdout)
    assert data["queues"][QUEUE_UNPACK] == 1
    assert data["queues"][f"{QUEUE_TRANSCRIBE}:gpu-01"] == 1
    assert data["failed"] == 1
    assert {p["worker"]: p["alive"] for p in data["processing"]} == {
        "unpack:gpu-01:77": True,
        "gpu:gpu-02:5": False,
    }
    assert data["delayed_retries"][0]["queue"] == QUEUE_TRANSCRIBE
    assert data["delayed_retries"][0]["retries"] == 1
    [worker] = data["workers"]
    assert worker["worker"] == "unpack:gpu-01:77"
    assert worker["state"] == "busy"
    assert worker["heartbeat_age_s"] < 30
    assert worker["job"] == '{"batch_id": "b1"}'
    assert worker["look_ahead"] == 0  # an unpack worker never claims ahead
    assert data["batches"]["by_status"] == {"unpacking": 1, "done": 1}
    assert [b["batch_id"] for b in data["batches"]["in_flight"]] == ["b1"]
    # health-check.yml reads these (playbooks/templates/health-*.j2)
    assert data["schema"] == 1
    assert data["results"] == {"active_policies": 0, "flagged": 0}
    # dead_letter() runs no stage hook, so its rows are still to be marked failed
    assert data["unsettled_dead_letters"] == {"unpack": 1}
    assert data["batches"]["files_failed"] == 0


def test_status_counts_failed_files_and_unsettled_dead_letters(pipeline_env, redis_client, db_conn):
    add_batch(db_conn, "b-ok", "done", file_count=2)
    add_audio_file(db_conn, "b-ok", "a.wav", "done")
    add_audio_file(db_conn, "b-ok", "b.wav", "failed", error="undecodable audio")
    add_batch(db_conn, "b-run", "unpacking", file_count=1)
    add_audio_file(db_conn, "b-run", "c.wav", "failed", error="gave up")
    db_conn.commit()
    # A worker that died holding its last attempt: the reaper dead-letters the job and
    # leaves its row bookkeeping to the next worker of its stage.
    redis_client.rpush(QUEUE_UNPACK, json.dumps({"batch_id": "b-run", "_attempts": 4}))
    JobQueue(redis_client, "unpack:gone:1", "unpack").claim([QUEUE_UNPACK], 0)
    reap_dead_workers(redis_client, max_attempts=5)

    data = json.loads(cli(pipeline_env, "status", "--json").stdout)
    assert data["failed"] == 1
    assert data["unsettled_dead_letters"] == {"unpack": 1}
    assert data["batches"]["files_failed"] == 2
    assert data["batches"]["done_with_failures"] == 1

    out = cli(pipeline_env, "status").stdout
    assert "1 of them from stage unpack: rows not yet marked failed" in out
    assert "files failed: 2 in all; 1 done batches have failed files" in out


def test_failed_lists_dead_letters_with_indexes(pipeline_env, redis_client):
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "x1"})
    dead_letter(redis_client, "gpu", QUEUE_TRANSCRIBE, {"audio_id": 9, "opus_path": "/o"})
    redis_client.rpush(QUEUE_FAILED, "garbage someone pushed by hand")
    result = cli(pipeline_env, "failed")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["index", "failed_at", "stage", "queue", "tries", "error", "job"]
    assert "unpack broke" in lines[2]
    assert "gpu broke" in lines[3]
    assert "unreadable dead letter" in lines[4]
    assert "3 of 3 dead letters shown" in result.stdout
    limited = json.loads(cli(pipeline_env, "failed", "--limit", "1", "--json").stdout)
    assert limited["total"] == 3
    assert [e["index"] for e in limited["entries"]] == [2]


def test_requeue_by_index_resets_attempts(pipeline_env, redis_client):
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "x1"}, attempts=4)
    dead_letter(redis_client, "gpu", QUEUE_TRANSCRIBE, {"audio_id": 9, "opus_path": "/o"})
    result = cli(pipeline_env, "requeue", "--index", "0")
    assert result.returncode == 0, result.stderr
    assert "requeued" in result.stdout
    assert "1 job(s) requeued" in result.stdout
    (requeued,) = [json.loads(x) for x in redis_client.lrange(QUEUE_UNPACK, 0, -1)]
    # attempts gone, and stamped now: its queue wait starts at the requeue
    assert time.time() - requeued.pop(ENQUEUED_FIELD) < 60
    assert requeued == {"batch_id": "x1"}
    assert redis_client.llen(QUEUE_FAILED) == 1
    # the job starts from scratch: a claim sees zero attempts
    job = JobQueue(redis_client, "unpack:h:2", "unpack").claim([QUEUE_UNPACK], 0)
    assert job.attempts == 0


def test_requeue_by_stage_and_all(pipeline_env, redis_client):
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "x1"})
    dead_letter(redis_client, "gpu", f"{QUEUE_TRANSCRIBE}:testhost", {"audio_id": 1})
    dead_letter(redis_client, "gpu", QUEUE_TRANSCRIBE, {"audio_id": 2})
    result = cli(pipeline_env, "requeue", "--stage", "gpu")
    assert result.returncode == 0, result.stderr
    assert redis_client.llen(f"{QUEUE_TRANSCRIBE}:testhost") == 1  # back to its own source
    assert redis_client.llen(QUEUE_TRANSCRIBE) == 1
    assert redis_client.llen(QUEUE_UNPACK) == 0
    data = json.loads(cli(pipeline_env, "requeue", "--all", "--json").stdout)
    assert data["requeued"] == 1
    assert redis_client.llen(QUEUE_UNPACK) == 1
    assert redis_client.llen(QUEUE_FAILED) == 0


def test_requeue_skips_malformed_jobs_and_says_so(pipeline_env, redis_client):
    redis_client.rpush(QUEUE_UNPACK, "{not json")
    JobQueue(redis_client, "unpack:h:1", "unpack").claim([QUEUE_UNPACK], 0)  # dead-letters it
    result = cli(pipeline_env, "requeue", "--all")
    assert result.returncode == 1
    assert "not a JSON object" in result.stdout
    assert redis_client.llen(QUEUE_FAILED) == 1
    assert redis_client.llen(QUEUE_UNPACK) == 0


def test_requeue_bad_index_is_a_clear_error(pipeline_env):
    result = cli(pipeline_env, "requeue", "--index", "5")
    assert result.returncode == 1
    assert "no dead letter at index 5 (0 in queue:failed)" in result.stderr
    usage = cli(pipeline_env, "requeue")
    assert usage.returncode == 2
    assert "one of the arguments --all --index --stage is required" in usage.stderr


def test_purge_failed_asks_first(pipeline_env, redis_client):
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "x1"})
    refused = cli(pipeline_env, "purge-failed", stdin="n\n")
    assert refused.returncode == 1
    assert "Delete 1 dead letter(s)" in refused.stdout
    assert redis_client.llen(QUEUE_FAILED) == 1
    accepted = cli(pipeline_env, "purge-failed", stdin="y\n")
    assert accepted.returncode == 0
    assert redis_client.llen(QUEUE_FAILED) == 0
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "x2"})
    assert cli(pipeline_env, "purge-failed", "--yes").returncode == 0
    assert redis_client.llen(QUEUE_FAILED) == 0


def test_init_db_is_idempotent(pipeline_env, db_conn):
    for _ in range(2):
        result = cli(pipeline_env, "init-db")
        assert result.returncode == 0, result.stderr
        assert "schema applied" in result.stdout
    assert db_conn.execute("SELECT to_regclass('batches') IS NOT NULL AS ok").fetchone()["ok"]


def test_policy_add_list_deactivate(pipeline_env, db_conn, tmp_path):
    text = tmp_path / "hate.txt"
    add_version_1 = ("policy", "add", "hate-speech", "--version", "1", "--file", str(text))
    text.write_text("Flag content that attacks people for who they are.\n")
    added = cli(pipeline_env, *add_version_1, "--lexicon", "slur, attack ,")
    assert added.returncode == 0, added.stderr
    assert "added" in added.stdout
    again = cli(pipeline_env, *add_version_1, "--lexicon", "slur,attack")
    assert "unchanged" in again.stdout
    text.write_text("A different wording.")
    clash = cli(pipeline_env, *add_version_1)
    assert clash.returncode == 1
    assert "add version 2 instead" in clash.stderr
    row = db_conn.execute("SELECT text, lexicon, active FROM policies").fetchone()
    assert row == {
        "text": "Flag content that attacks people for who they are.",
        "lexicon": ["slur", "attack"],
        "active": True,
    }
    listed = cli(pipeline_env, "policy", "list")
    assert listed.stdout.splitlines()[0].split() == [
        "id",
        "name",
        "version",
        "active",
        "lexicon",
        "text",
    ]
    assert "hate-speech" in listed.stdout
    off = cli(pipeline_env, "policy", "deactivate", "hate-speech", "1")
    assert off.returncode == 0, off.stderr
    [policy] = json.loads(cli(pipeline_env, "policy", "list", "--json").stdout)
    assert policy["active"] is False
    missing = cli(pipeline_env, "policy", "deactivate", "hate-speech", "7")
    assert missing.returncode == 1
    assert "no policy 'hate-speech' version 7" in missing.stderr


def test_policy_add_rejects_bad_input_clearly(pipeline_env, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    result = cli(pipeline_env, "policy", "add", "p", "--version", "1", "--file", str(empty))
    assert result.returncode == 1
    assert "is empty" in result.stderr
    result = cli(pipeline_env, "policy", "add", "p", "--version", "1", "--file", "/nonexistent")
    assert "cannot read policy file /nonexistent" in result.stderr
    empty.write_text("ok")
    bad_name = cli(pipeline_env, "policy", "add", "../x", "--version", "1", "--file", str(empty))
    assert bad_name.returncode == 1
    assert "rejected by the schema" in bad_name.stderr


def test_unreachable_redis_is_reported_not_a_traceback(pipeline_env):
    result = cli({**pipeline_env, "REDIS_PORT": "1"}, "status")
    assert result.returncode == 1
    assert "Redis unavailable" in result.stderr
    assert "Traceback" not in result.stderr


def test_render_table_aligns_columns():
    table = render_table(["queue", "depth"], [("queue:unpack", 3), ("queue:transcribe:gpu-01", 12)])
    assert table.splitlines() == [
        "queue                    depth",
        "-----------------------  -----",
        "queue:unpack                 3",
        "queue:transcribe:gpu-01     12",
    ]


def test_processing_key_is_what_status_parses(redis_client):
    # status reads worker and source back from the key; keep the two in step
    assert processing_key("unpack:h:1", QUEUE_UNPACK).startswith("processing:unpack:h:1")
