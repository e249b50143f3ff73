"""The gpu worker as a real process against real Redis, PostgreSQL and S3.

One batch covers the cases that matter: a file on this host, a file only in S3,
a file nowhere, a hand-injected path with no row, a malformed payload; then the
same jobs delivered again must not add a single row.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from audio_pipeline import s3_utils
from audio_pipeline.config import QUEUE_FAILED, QUEUE_TRANSCRIBE, host_transcribe_queue
from devtools.dev_models import install_whisper
from tests.support.media import speech, wer
from tests.support.rows import add_batch
from tests.support.workerkit.procs import finish, start_module, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BATCH = "b-gpu-001"
TEXTS = {
    "local.opus": "The birch canoe slid on the smooth planks.",
    "in_s3.opus": "Kick the ball straight and follow through.",
    "adhoc.opus": "A pot of tea helps to pass the evening.",
}
WER_BOUND = 0.6  # per file; measured 0.0-0.4 with tiny.en on espeak-ng (see test_asr_*)


def insert_file(db, rel_path: str, opus_path: Path, s3_key: str | None) -> int:
    row = db.execute(
        """INSERT INTO audio_files (batch_id, rel_path, opus_path, opus_s3_key, host, status)
           VALUES (%s, %s, %s, %s, 'testhost', 'converted') RETURNING id""",
        (BATCH, rel_path, str(opus_path), s3_key),
    ).fetchone()
    return int(row["id"])


def run_drain(pipeline_env: dict[str, str]) -> str:
    proc = start_module("audio_pipeline.workers.gpu_worker", pipeline_env, ["--drain"])
    code, output = finish(proc, timeout=240)
    assert code == 0, output
    return output


def counts(db) -> dict[str, int]:
    return {
        table: db.execute(f"SELECT count(*) AS n FROM {table}").fetchone()["n"]
        for table in ("audio_files", "transcripts", "classifications", "batches")
    }


def test_gpu_worker_batch_with_every_kind_of_job(
    pipeline_env, settings, db_conn, redis_client, s3_client, tmp_path
) -> None:
    install_whisper(settings.models_root)
    scratch = settings.batch_scratch(BATCH)
    db = db_conn
    add_batch(db, BATCH, "unpacked")
    canoe = db.execute(
        "INSERT INTO policies (name, version, text, lexicon) VALUES ('boats', 1, 'Boats.', "
        "ARRAY['canoe', 'smooth planks']) RETURNING id"
    ).fetchone()["id"]
    db.execute(
        "INSERT INTO policies (name, version, text, lexicon, active) VALUES "
        "('retired', 1, 'Old.', ARRAY['ball'], false)"
    )

    local = speech(TEXTS["local.opus"], scratch / "nested dir" / "local.opus")
    key_local = s3_utils.opus_key(BATCH, "nested dir/local.mp3")
    s3_utils.upload_file(s3_client, settings.s3_bucket, local, key_local)
    local_id = insert_file(db, "nested dir/local.mp3", local, key_local)

    elsewhere = speech(TEXTS["in_s3.opus"], tmp_path / "elsewhere.opus")
    key_s3 = s3_utils.opus_key(BATCH, "in_s3.mp3")
    s3_utils.upload_file(s3_client, settings.s3_bucket, elsewhere, key_s3)
    s3_id = insert_file(db, "in_s3.mp3", scratch / "in_s3.opus", key_s3)  # not on this host

    nowhere_id = insert_file(db, "gone.mp3", scratch / "gone.opus", s3_utils.opus_key(BATCH, "g"))
    db.commit()

    operator_file = speech(TEXTS["adhoc.opus"], tmp_path / "operator" / "adhoc.opus")
    host_q = host_transcribe_queue("testhost")
    jobs = [
        (host_q, {"audio_id": local_id, "opus_path": str(local), "batch_id": BATCH}),
        (host_q, {"audio_id": s3_id, "opus_path": str(scratch / "in_s3.opus")}),
        (host_q, {"audio_id": nowhere_id, "opus_path": str(scratch / "gone.opus")}),
        # By hand, as in the guide: an id no row has, a path no row records.
        (QUEUE_TRANSCRIBE, {"audio_id": 424242, "opus_path": str(operator_file)}),
        (QUEUE_TRANSCRIBE, {"audio_id": "seven", "opus_path": 3}),
    ]
    for queue, payload in jobs:
        redis_client.rpush(queue, json.dumps(payload))

    output = run_drain(pipeline_env)

    rows = {r["id"]: r for r in db.execute("SELECT * FROM audio_files").fetchall()}
    assert rows[local_id]["status"] == "done"
    assert rows[s3_id]["status"] == "done"
    assert rows[nowhere_id]["status"] == "failed"
    assert "is not on host testhost" in rows[nowhere_id]["error"]
    assert "does not exist" in rows[nowhere_id]["error"]
    (adhoc,) = [r for r in rows.values() if r["batch_id"] == "adhoc"]
    assert adhoc["rel_path"] == str(operator_file).lstrip("/")
    assert adhoc["status"] == "done"
    assert adhoc["id"] != 424242
    assert f"registered_audio_id={adhoc['id']}" in output

    transcripts = {r["audio_id"]: r for r in db.execute("SELECT * FROM transcripts").fetchall()}
    assert set(transcripts) == {local_id, s3_id, adhoc["id"]}
    for audio_id, name in (
        (local_id, "local.opus"),
        (s3_id, "in_s3.opus"),
        (adhoc["id"], "adhoc.opus"),
    ):
        t = transcripts[audio_id]
        assert wer(TEXTS[name], t["text"]) <= WER_BOUND, (name, t["text"])
        assert t["model"] == "whisper/tiny.en"
        assert t["backend"] == "faster-whisper"
        assert t["segments"]
        assert t["segments"][0]["words"]

    verdicts = db.execute("SELECT * FROM classifications ORDER BY audio_id").fetchall()
    assert {(v["audio_id"], v["policy_id"]) for v in verdicts} == {
        (local_id, canoe),
        (s3_id, canoe),
        (adhoc["id"], canoe),
    }  # the retired policy is never applied
    assert all(v["model"] == "lexicon-v1" for v in verdicts)
    assert all((v["windows"], v["truncated"]) == (1, False) for v in verdicts), "whole text"
    by_audio = {v["audio_id"]: v for v in verdicts}
    assert by_audio[s3_id]["label"] == 0
    if "canoe" in transcripts[local_id]["text"].lower():
        assert by_audio[local_id]["label"] == 1
        assert by_audio[local_id]["evidence"][0]["terms"]
        flagged = db.execute("SELECT audio_id FROM ra_queue").fetchall()
        assert local_id in {f["audio_id"] for f in flagged}

    failed = [json.loads(e) for e in redis_client.lrange(QUEUE_FAILED, 0, -1)]
    assert len(failed) == 2
    errors = " | ".join(f["error"] for f in failed)
    assert "does not exist" in errors
    assert "'audio_id' must be int" in errors
    assert all(f["stage"] == "gpu" for f in failed)

    # Every file of the batch is done or failed: batch done, its scratch gone.
    batch = db.execute(
        "SELECT status, completed_at FROM batches WHERE batch_id = %s", (BATCH,)
    ).fetchone()
    assert batch["status"] == "done"
    assert batch["completed_at"] is not None
    assert not scratch.exists()
    assert operator_file.exists(), "an operator's file outside scratch is never deleted"
    assert redis_client.llen(host_q) == 0
    assert redis_client.llen(QUEUE_TRANSCRIBE) == 0
    db.commit()

    # Redelivery: the same jobs again (e.g. after a crash between commit and ack).
    before = counts(db)
    transcript_times = {
        r["audio_id"]: r["updated_at"]
        for r in db.execute("SELECT audio_id, updated_at FROM transcripts").fetchall()
    }
    db.commit()
    for queue, payload in jobs[:2] + jobs[3:4]:
        redis_client.rpush(queue, json.dumps(payload))
    output = run_drain(pipeline_env)

    assert counts(db) == before
    assert output.count("event=gpu.already_done") == 3
    after = {
        r["audio_id"]: r["updated_at"]
        for r in db.execute("SELECT audio_id, updated_at FROM transcripts").fetchall()
    }
    assert after == transcript_times  # acknowledged without transcribing again
    assert redis_client.llen(QUEUE_FAILED) == 2


# -- look-ahead (PREFETCH): the next claim is found, fetched and decoded early ---------

LONG_TEXT = " ".join(TEXTS.values()) * 3  # ~20 s of speech: a model call that takes a while


def _setup_look_ahead_batch(db, settings, s3_client, tmp_path) -> dict[str, int]:
    """Four files of one batch: local, only in S3, undecodable, local."""
    install_whisper(settings.models_root)
    scratch = settings.batch_scratch(BATCH)
    add_batch(db, BATCH, "unpacked")
    ids = {}
    first = speech(LONG_TEXT, scratch / "first.opus")
    ids["first"] = insert_file(db, "first.mp3", first, s3_utils.opus_key(BATCH, "first.mp3"))
    elsewhere = speech(TEXTS["in_s3.opus"], tmp_path / "elsewhere.opus")
    key_s3 = s3_utils.opus_key(BATCH, "in_s3.mp3")
    s3_utils.upload_file(s3_client, settings.s3_bucket, elsewhere, key_s3)
    ids["in_s3"] = insert_file(db, "in_s3.mp3", scratch / "in_s3.opus", key_s3)
    garbage = scratch / "garbage.opus"
    garbage.write_bytes(b"OggS" + bytes(range(256)) * 8)  # an Ogg header, then noise
    ids["garbage"] = insert_file(db, "garbage.mp3", garbage, None)
    last = speech(TEXTS["local.opus"], scratch / "last.opus")
    ids["last"] = insert_file(db, "last.mp3", last, None)
    db.commit()
    return ids


def _push_jobs(redis_client, settings, ids: dict[str, int]) -> None:
    host_q = host_transcribe_queue("testhost")
    paths = {
        "first": "first.opus",
        "in_s3": "in_s3.opus",
        "garbage": "garbage.opus",
        "last": "last.opus",
    }
    for name, audio_id in ids.items():
        opus = settings.batch_scratch(BATCH) / paths[name]
        redis_client.rpush(host_q, json.dumps({"audio_id": audio_id, "opus_path": str(opus)}))


@pytest.mark.parametrize(
    ("prefetch", "looks_ahead"),
    [("1", True), ("0", False), ("auto", False)],  # auto: on only when ASR runs on CUDA
)
def test_one_file_per_claim_with_and_without_look_ahead(
    prefetch, looks_ahead, pipeline_env, settings, db_conn, redis_client, s3_client, tmp_path
) -> None:
    ids = _setup_look_ahead_batch(db_conn, settings, s3_client, tmp_path)
    _push_jobs(redis_client, settings, ids)

    output = run_drain({**pipeline_env, "BATCH_SIZE": "1", "PREFETCH": prefetch})

    rows = {r["id"]: r for r in db_conn.execute("SELECT * FROM audio_files").fetchall()}
    assert [rows[ids[n]]["status"] for n in ("first", "in_s3", "garbage", "last")] == [
        "done",
        "done",
        "failed",
        "done",
    ]
    assert "undecodable audio" in rows[ids["garbage"]]["error"]
    transcripts = {
        r["audio_id"]: r["text"]
        for r in db_conn.execute("SELECT audio_id, text FROM transcripts").fetchall()
    }
    assert set(transcripts) == {ids["first"], ids["in_s3"], ids["last"]}
    in_s3 = transcripts[ids["in_s3"]]
    assert wer(TEXTS["in_s3.opus"], in_s3) <= WER_BOUND, in_s3
    failed = [json.loads(e) for e in redis_client.lrange(QUEUE_FAILED, 0, -1)]
    assert [json.loads(f["job"])["audio_id"] for f in failed] == [ids["garbage"]]
    assert f"prefetch={'true' if looks_ahead else 'false'}" in output
    fetched = output.index(f"event=gpu.fetched audio_id={ids['in_s3']}")
    first_done = output.index(f"event=gpu.file_done audio_id={ids['first']}")
    if looks_ahead:  # the S3 file was fetched while the first file was transcribed
        assert fetched < first_done
    else:
        assert fetched > first_done
    batch = db_conn.execute("SELECT status FROM batches WHERE batch_id = %s", (BATCH,)).fetchone()
    assert batch["status"] == "done"
    assert not settings.batch_scratch(BATCH).exists()


def test_sigterm_hands_back_the_look_ahead_and_deletes_its_download(
    pipeline_env, settings, db_conn, redis_client, s3_client, tmp_path
) -> None:
    ids = _setup_look_ahead_batch(db_conn, settings, s3_client, tmp_path)
    _push_jobs(redis_client, settings, ids)
    log = tmp_path / "gpu.log"
    env = {**pipeline_env, "BATCH_SIZE": "1", "PREFETCH": "1"}
    proc = start_module("audio_pipeline.workers.gpu_worker", env, log_path=log)
    wait_for(lambda: "event=gpu.fetched" in log.read_text(), 120, "the look-ahead's download")
    proc.send_signal(signal.SIGTERM)
    code, _ = finish(proc, timeout=120)
    output = log.read_text()
    assert code == 0, output

    rows = {r["id"]: r for r in db_conn.execute("SELECT * FROM audio_files").fetchall()}
    assert rows[ids["first"]]["status"] == "done"  # the claim in hand was finished
    # the look-ahead went back untouched: row as it was, download gone, job at the head
    assert rows[ids["in_s3"]]["status"] == "converted"
    fetched_dir = settings.batch_scratch(BATCH) / "fetched"
    assert not list(fetched_dir.glob("*.opus"))
    queued = [
        json.loads(x)["audio_id"]
        for x in redis_client.lrange(host_transcribe_queue("testhost"), 0, -1)
    ]
    assert queued == [ids["in_s3"], ids["garbage"], ids["last"]]
    assert not [k for k in redis_client.scan_iter("processing:*") if redis_client.llen(k)]
    assert redis_client.llen(QUEUE_FAILED) == 0


# -- no active policy: every file would end "done" with no verdict -------------------


def test_no_active_policy_is_logged_loudly_until_one_is_applied(
    pipeline_env, settings, db_conn, redis_client
) -> None:
    install_whisper(settings.models_root)
    scratch = settings.batch_scratch(BATCH)
    add_batch(db_conn, BATCH, "unpacked")
    jobs = [
        {
            "audio_id": insert_file(db_conn, name, speech(text, scratch / name), None),
            "opus_path": str(scratch / name),
        }
        for name, text in TEXTS.items()
    ]
    db_conn.commit()
    host_q = host_transcribe_queue("testhost")
    for job in jobs[:2]:
        redis_client.rpush(host_q, json.dumps(job))

    output = run_drain({**pipeline_env, "BATCH_SIZE": "1"})  # two claims

    warnings = [line for line in output.splitlines() if "event=gpu.no_active_policy" in line]
    # At start, then with the first claim; the second claim falls within the rate limit.
    assert len(warnings) == 2, output
    start, claim = warnings
    assert start.startswith("level=warning")
    assert "phase=start" in start
    assert "no active policy" in start
    assert "phase=claim files_without_verdict=1" in claim
    assert db_conn.execute("SELECT count(*) AS n FROM classifications").fetchone()["n"] == 0

    db_conn.execute(
        "INSERT INTO policies (name, version, text, lexicon) VALUES "
        "('boats', 1, 'Boats.', ARRAY['canoe'])"
    )
    db_conn.commit()
    redis_client.rpush(host_q, json.dumps(jobs[2]))
    output = run_drain(pipeline_env)
    assert "event=gpu.no_active_policy" not in output
    assert "event=gpu.policies_active policies=1" in output
    assert db_conn.execute("SELECT count(*) AS n FROM classifications").fetchone()["n"] == 1


# -- poison isolation: one file whose processing fails sinks only itself -------------


def test_a_file_whose_results_cannot_be_stored_costs_only_itself(
    pipeline_env, settings, db_conn, redis_client
) -> None:
    """A claim of three whose store step raises for one file (a trigger of this test's
    own database refuses its transcript), after transcription and classification: the
    claim fails as a whole, is run again one file at a time, and the other two are
    stored once each, on their first attempt."""
    install_whisper(settings.models_root)
    scratch = settings.batch_scratch(BATCH)
    add_batch(db_conn, BATCH, "unpacked")
    db_conn.execute(
        "INSERT INTO policies (name, version, text, lexicon) VALUES "
        "('boats', 1, 'Boats.', ARRAY['canoe'])"
    )
    ids = {
        name: insert_file(db_conn, name, speech(text, scratch / name), None)
        for name, text in TEXTS.items()
    }
    poison = ids["in_s3.opus"]
    db_conn.execute(
        f"""CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF NEW.audio_id = {poison} THEN
                RAISE EXCEPTION 'poison transcript for audio %', NEW.audio_id;
              END IF;
              RETURN NEW;
            END $$"""
    )
    db_conn.execute(
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON transcripts "
        "FOR EACH ROW EXECUTE FUNCTION refuse_poison()"
    )
    db_conn.commit()
    host_q = host_transcribe_queue("testhost")
    for name, audio_id in ids.items():
        redis_client.rpush(
            host_q, json.dumps({"audio_id": audio_id, "opus_path": str(scratch / name)})
        )

    output = run_drain({**pipeline_env, "BATCH_SIZE": "3"})

    [isolated] = [line for line in output.splitlines() if "event=worker.claim_isolated" in line]
    assert "claim_size=3" in isolated
    assert "poison transcript for audio" in isolated
    good = [audio_id for audio_id in ids.values() if audio_id != poison]
    for audio_id in good:  # stored once, by the isolated run
        assert output.count(f"event=gpu.file_done audio_id={audio_id} ") == 1
    assert f"event=gpu.file_done audio_id={poison} " not in output
    started = [line for line in output.splitlines() if "event=job.started" in line]
    assert sum(f"audio_id={poison} " in line for line in started) == 3  # QUEUE_MAX_ATTEMPTS
    assert all("attempt=1" in line for line in started if f"audio_id={poison} " not in line)

    rows = {r["id"]: r for r in db_conn.execute("SELECT * FROM audio_files").fetchall()}
    assert [rows[i]["status"] for i in good] == ["done", "done"]
    assert rows[poison]["status"] == "failed"
    assert "poison transcript for audio" in rows[poison]["error"]
    transcripts = db_conn.execute("SELECT audio_id FROM transcripts").fetchall()
    assert sorted(t["audio_id"] for t in transcripts) == sorted(good)
    verdicts = db_conn.execute("SELECT audio_id FROM classifications").fetchall()
    assert sorted(v["audio_id"] for v in verdicts) == sorted(good)
    [failed] = [json.loads(e) for e in redis_client.lrange(QUEUE_FAILED, 0, -1)]
    assert json.loads(failed["job"])["audio_id"] == poison
    assert failed["attempts"] == 3
    batch = db_conn.execute("SELECT status FROM batches WHERE batch_id = %s", (BATCH,)).fetchone()
    assert batch["status"] == "done"
    assert not scratch.exists()
