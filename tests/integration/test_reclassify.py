"""Re-classification without transcribing again, on the real stack.

A real gpu worker (tiny.en, lexicon classifier) transcribes a batch under policy
version 1; an operator applies version 2 and runs ``audio-pipeline reclassify``; the
same worker process kind then serves the text-only jobs. Every file gets a version-2
verdict, the version-1 verdicts stay, and no speech recognition runs: the audio is
deleted everywhere before the re-run, the worker's ASR counters stay at zero, and
the transcripts and attempt counts are untouched.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import redis

from audio_pipeline import s3_utils
from audio_pipeline.config import (
    QUEUE_CLASSIFY,
    QUEUE_FAILED,
    QUEUE_TRANSCRIBE,
    host_transcribe_queue,
)
from audio_pipeline.db import apply_schema
from audio_pipeline.queue import ATTEMPTS_FIELD, processing_key, unsettled_key
from devtools.dev_models import CLASSIFIER_DIR, install_classifier, install_whisper
from tests.support.media import speech
from tests.support.metrics_scrape import free_port, scrape
from tests.support.operator_cli import run_cli as cli
from tests.support.rows import (
    add_audio_file,
    add_batch,
    add_policy,
    add_reclassify_run,
    add_transcript,
)
from tests.support.workerkit.procs import finish, start_module, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GPU = "audio_pipeline.workers.gpu_worker"
BATCH = "b-recl-001"
TEXTS = {
    "canoe.mp3": "The birch canoe slid on the smooth planks.",
    "ball.mp3": "Kick the ball straight and follow through.",
}


V1_TERMS = ["birch", "slid", "smooth", "planks"]
V2_TERMS = ["kick", "ball", "straight", "follow through"]


def expected_score(db, audio_id: int, terms: list[str]) -> float:
    """The lexicon's score of the stored transcript, counted here by hand:
    1 - 0.5 ** (term occurrences, whole words, case-insensitive)."""
    text = db.execute("SELECT text FROM transcripts WHERE audio_id = %s", (audio_id,)).fetchone()
    words = re.sub(r"[^a-z0-9]", " ", text["text"].lower())
    padded = f" {' '.join(words.split())} "
    hits = sum(padded.count(f" {term} ") for term in terms)
    return 1 - 0.5**hits


def verdicts(db) -> dict[tuple[int, int, str], dict]:
    rows = db.execute("SELECT * FROM classifications").fetchall()
    return {(r["audio_id"], r["policy_id"], r["model"]): r for r in rows}


def test_a_new_policy_version_on_a_finished_batch_runs_without_asr(
    pipeline_env, settings, db_conn, redis_client, s3_client
) -> None:
    install_whisper(settings.models_root)
    db = db_conn
    scratch = settings.batch_scratch(BATCH)
    add_batch(db, BATCH, "unpacked", file_count=len(TEXTS))
    v1 = add_policy(db, "boats", "Boats.", version=1, lexicon=V1_TERMS)
    ids: dict[str, int] = {}
    for rel, text in TEXTS.items():
        opus = speech(text, scratch / rel.replace(".mp3", ".opus"))
        key = s3_utils.opus_key(BATCH, rel)
        s3_utils.upload_file(s3_client, settings.s3_bucket, opus, key)
        ids[rel] = add_audio_file(
            db, BATCH, rel, "converted", opus_path=str(opus), opus_s3_key=key, host="testhost"
        )
    db.commit()
    for rel, audio_id in ids.items():
        redis_client.rpush(
            host_transcribe_queue("testhost"),
            json.dumps({"audio_id": audio_id, "opus_path": str(scratch / rel[:-4]) + ".opus"}),
        )
    proc = start_module(GPU, pipeline_env, ["--drain"])
    code, first_run = finish(proc, timeout=240)
    assert code == 0, first_run
    assert db.execute("SELECT status FROM batches").fetchone()["status"] == "done"
    before = verdicts(db)
    assert {k[:2] for k in before} == {(ids["canoe.mp3"], v1), (ids["ball.mp3"], v1)}
    for (audio_id, _, _), row in before.items():
        assert row["score"] == pytest.approx(expected_score(db, audio_id, V1_TERMS))
    transcripts = db.execute("SELECT * FROM transcripts ORDER BY audio_id").fetchall()
    attempts = db.execute("SELECT id, attempts FROM audio_files ORDER BY id").fetchall()
    db.commit()

    # Version 2 replaces version 1, as `policy apply` of a reworded file does.
    v2_file = Path(settings.scratch_root).parent / "boats-v2.txt"
    v2_file.write_text("Ball games.")
    added = cli(
        pipeline_env,
        "policy",
        "add",
        "boats",
        "--version",
        "2",
        "--file",
        str(v2_file),
        "--lexicon",
        ",".join(V2_TERMS),
    )
    assert added.returncode == 0, added.stderr
    off = cli(pipeline_env, "policy", "deactivate", "boats", "1")
    assert off.returncode == 0, off.stderr
    v2 = db.execute("SELECT id FROM policies WHERE name = 'boats' AND version = 2").fetchone()["id"]
    db.commit()

    # The audio is gone from this host and from S3: anything that wanted it would fail.
    for obj in s3_client.list_objects_v2(Bucket=settings.s3_bucket, Prefix="audio/")["Contents"]:
        s3_client.delete_object(Bucket=settings.s3_bucket, Key=obj["Key"])
    assert not list(Path(settings.scratch_root).rglob("*.opus"))

    queued = cli(pipeline_env, "reclassify", "--policy", "boats", "--batch", BATCH, "--json")
    assert queued.returncode == 0, queued.stderr
    run = json.loads(queued.stdout)
    assert run["policy_version"] == 2  # the newest active version by default
    assert run["model"] == "lexicon-v1"  # the model of the stored verdicts by default
    assert run["files"] == 2
    assert redis_client.llen(QUEUE_CLASSIFY) == 2
    status = json.loads(cli(pipeline_env, "status", "--json").stdout)
    assert status["queues"][QUEUE_CLASSIFY] == 2
    (progress,) = status["reclassify"]["runs"]
    assert (progress["run_id"], progress["policy"], progress["policy_version"]) == (
        run["run_id"],
        "boats",
        2,
    )
    assert (progress["files"], progress["queued"], progress["done"], progress["failed"]) == (
        2,
        2,
        0,
        0,
    )

    port = free_port()
    proc = start_module(GPU, pipeline_env, extra_env={"METRICS_PORT": str(port)})
    try:
        wait_for(
            lambda: (
                db.execute(
                    "SELECT count(*) AS n FROM reclassify_files WHERE status = 'done'"
                ).fetchone()["n"]
                == 2
            ),
            timeout=120,
            what="both files re-classified",
        )
        metrics = scrape(port, "gpu")
    finally:
        proc.terminate()
        code, second_run = finish(proc, timeout=60)
    db.commit()
    assert code == 0, second_run

    # No speech recognition ran: the worker's own counters, its log, the rows.
    assert metrics["audio_pipeline_asr_seconds_total"] == 0
    assert metrics["audio_pipeline_files_transcribed_total"] == 0
    assert metrics["audio_pipeline_jobs_done_total"] == 2
    assert metrics["audio_pipeline_classifier_seconds_total"] > 0
    assert "event=gpu.file_done" not in second_run
    assert "event=gpu.fetched" not in second_run
    assert second_run.count("event=gpu.reclassified") == 2
    assert db.execute("SELECT * FROM transcripts ORDER BY audio_id").fetchall() == transcripts
    assert db.execute("SELECT id, attempts FROM audio_files ORDER BY id").fetchall() == attempts

    after = verdicts(db)
    for key, row in before.items():  # version 1's verdicts are kept, untouched
        assert after[key] == row
    new = {k: v for k, v in after.items() if k not in before}
    assert set(new) == {(audio_id, v2, "lexicon-v1") for audio_id in ids.values()}
    for (audio_id, _, _), row in new.items():
        assert row["score"] == pytest.approx(expected_score(db, audio_id, V2_TERMS))
        assert row["label"] == int(row["score"] >= row["threshold"])
    # the new wording changed the verdicts: it is not version 1's result again
    assert new[(ids["ball.mp3"], v2, "lexicon-v1")]["label"] == 1
    assert before[(ids["ball.mp3"], v1, "lexicon-v1")]["label"] == 0
    assert db.execute("SELECT status FROM batches").fetchone()["status"] == "done"

    shown = cli(pipeline_env, "status")
    assert shown.returncode == 0, shown.stderr
    section = shown.stdout.split("RE-CLASSIFICATION", 1)[1].split("BATCHES", 1)[0]
    line = next(ln for ln in section.splitlines() if ln.split()[:1] == [str(run["run_id"])])
    assert line.split() == [
        str(run["run_id"]),
        "boats",
        "v2",
        "lexicon-v1",
        BATCH,
        "2",
        "0",
        "2",
        "0",
    ]

    # Every file has this verdict now: asking again queues nothing unless told to.
    twice = cli(pipeline_env, "reclassify", "--policy", "boats", "--batch", BATCH)
    assert twice.returncode == 1
    assert "lacks a verdict of this policy version by this model" in twice.stderr
    again = cli(pipeline_env, "reclassify", "--policy", "boats", "--batch", BATCH, "--again")
    assert again.returncode == 0, again.stderr
    assert re.match(
        rf"run \d+: 2 file\(s\) of batch {BATCH} queued on queue:classify", again.stdout
    )


def _done_file(db, batch: str, rel: str, text: str) -> int:
    audio_id = add_audio_file(db, batch, rel, "done")
    add_transcript(db, audio_id, text, segments=[{"start": 0.0, "end": 2.0, "text": text}])
    return audio_id


def test_bad_text_only_jobs_are_dead_lettered_and_fail_only_their_run_file(
    pipeline_env, settings, db_conn, redis_client
) -> None:
    install_whisper(settings.models_root)
    db = db_conn
    add_batch(db, "b-recl-002", "done", file_count=3)
    policy = add_policy(db, "boats", "Boats.", lexicon=["canoe"])
    good = _done_file(db, "b-recl-002", "good.mp3", "a canoe on the lake")
    other = _done_file(db, "b-recl-002", "other.mp3", "nothing to see")
    reaped = _done_file(db, "b-recl-002", "reaped.mp3", "a worker died judging this")
    run_id = add_reclassify_run(db, policy, "b-recl-002", [good, other, reaped], files=2)
    db.commit()
    base = {"kind": "classify", "run_id": run_id, "policy_id": policy}
    jobs = [
        (QUEUE_CLASSIFY, {"kind": "classify", "run_id": "seven", "audio_id": good}),
        # a model no host has: a permanent error, named
        (QUEUE_CLASSIFY, {**base, "audio_id": other, "model": "classifier/nope"}),
        # LPUSHed onto a transcribe queue by hand: still served as text-only
        (QUEUE_TRANSCRIBE, {**base, "audio_id": good, "model": "lexicon-v1"}),
    ]
    for queue, payload in jobs:
        redis_client.rpush(queue, json.dumps(payload))
    # A worker killed while it held this job, its last try: the reaper dead-letters it.
    redis_client.rpush(
        processing_key("gpu:lost-host:4242", QUEUE_CLASSIFY),
        json.dumps({**base, "audio_id": reaped, "model": "lexicon-v1", ATTEMPTS_FIELD: 1}),
    )
    proc = start_module(GPU, pipeline_env, ["--drain"], extra_env={"QUEUE_MAX_ATTEMPTS": "2"})
    code, output = finish(proc, timeout=240)
    assert code == 0, output

    letters = [json.loads(x) for x in redis_client.lrange(QUEUE_FAILED, 0, -1)]
    assert len(letters) == 3, letters
    by_audio = {json.loads(letter["job"]).get("audio_id"): letter for letter in letters}
    assert "WorkerDied" in by_audio[reaped]["error"]
    bad_payload, bad_model = by_audio[good], by_audio[other]
    assert "text-only (classify) job: invalid job payload" in bad_payload["error"]
    assert "key 'run_id' must be int" in bad_payload["error"]
    assert "missing key 'model'" in bad_payload["error"]
    assert (
        "classifier model 'classifier/nope' cannot be loaded on host testhost" in bad_model["error"]
    )
    assert {letter["stage"] for letter in letters} == {"gpu"}

    files = {
        r["audio_id"]: r
        for r in db.execute("SELECT * FROM reclassify_files WHERE run_id = %s", (run_id,))
    }
    assert files[good]["status"] == "done"
    assert files[other]["status"] == "failed"
    assert "classifier/nope" in files[other]["error"]
    assert files[reaped]["status"] == "failed"
    assert "WorkerDied" in files[reaped]["error"]
    assert redis_client.llen(unsettled_key("gpu")) == 0
    # The audio files and their batch are exactly as they were: done.
    statuses = {r["id"]: r["status"] for r in db.execute("SELECT id, status FROM audio_files")}
    assert statuses == {good: "done", other: "done", reaped: "done"}
    assert db.execute("SELECT status, files_failed FROM batches").fetchone() == {
        "status": "done",
        "files_failed": None,
    }
    assert "event=gpu.reclassify_failed" in output
    assert "event=gpu.file_failed" not in output
    label = db.execute(
        "SELECT label FROM classifications WHERE audio_id = %s AND policy_id = %s",
        (good, policy),
    ).fetchone()["label"]
    assert label == 1
    db.commit()

    # requeue puts the run files back in play, not the audio files; served again,
    # the job whose worker died now completes
    requeued = cli(pipeline_env, "requeue", "--all", "--json")
    report = json.loads(requeued.stdout)
    rows = {str(e.get("rows")) for e in report["entries"]}
    assert f"re-classification of file {other} (run {run_id})" in rows
    assert f"re-classification of file {reaped} (run {run_id})" in rows
    queued = db.execute(
        "SELECT audio_id FROM reclassify_files WHERE status = 'queued' ORDER BY audio_id"
    ).fetchall()
    assert [r["audio_id"] for r in queued] == sorted([other, reaped])
    db.commit()
    code, output = finish(start_module(GPU, pipeline_env, ["--drain"]), timeout=240)
    assert code == 0, output
    files = {
        r["audio_id"]: r["status"]
        for r in db.execute("SELECT * FROM reclassify_files WHERE run_id = %s", (run_id,))
    }
    assert files == {good: "done", other: "failed", reaped: "done"}
    statuses = {r["id"]: r["status"] for r in db.execute("SELECT id, status FROM audio_files")}
    assert statuses == {good: "done", other: "done", reaped: "done"}


def test_reclassify_refuses_what_it_cannot_do(pipeline_env, settings, db_conn) -> None:
    db = db_conn
    # An existing database takes the schema again in place (every deploy applies it).
    apply_schema(settings.database_url)
    add_batch(db, "b-finished", "done")
    add_batch(db, "b-running", "unpacked")
    add_batch(db, "b-empty", "done")
    policy = add_policy(db, "boats", "Boats.", lexicon=["canoe"])
    add_policy(db, "retired", "Old.", active=False)
    audio_id = _done_file(db, "b-finished", "a.mp3", "a canoe")
    db.execute(
        "INSERT INTO classifications (audio_id, policy_id, model, score, label, threshold) "
        "VALUES (%s, %s, 'lexicon-v1', 0.5, 1, 0.5)",
        (audio_id, policy),
    )
    db.commit()
    cases = [
        (["--policy", "nope"], "no policy named 'nope'"),
        (["--policy", "boats", "--version", "9"], "policy 'boats' has no version 9 (versions: 1)"),
        (
            ["--policy", "retired"],
            "policy 'retired' has no active version: name one with --version",
        ),
        (["--policy", "boats", "--batch", "b-missing"], "no batch 'b-missing'"),
        (["--policy", "boats", "--batch", "b-running"], "batch 'b-running' is not finished"),
        (["--policy", "boats", "--batch", "b-empty"], "no finished file with a stored transcript"),
        (
            ["--policy", "boats", "--model", "classifier/unknown"],
            "unknown model 'classifier/unknown'",
        ),
        (["--policy", "boats", "--model", "../x"], "unknown model '../x'"),
    ]
    for args, message in cases:
        result = cli(pipeline_env, "reclassify", *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    assert db.execute("SELECT count(*) AS n FROM reclassify_runs").fetchone()["n"] == 0
    usage = cli(pipeline_env, "reclassify", "--version", "1")
    assert usage.returncode == 2
    assert "--policy" in usage.stderr

    # An inactive version may be named: its verdicts are stored for evaluation.
    old = cli(pipeline_env, "reclassify", "--policy", "retired", "--version", "1")
    assert old.returncode == 0, old.stderr
    assert "is not active" in old.stdout
    r = redis.Redis(
        host="127.0.0.1",
        port=int(pipeline_env["REDIS_PORT"]),
        password=pipeline_env["REDIS_PASSWORD"],
        db=int(pipeline_env["REDIS_DB"]),
        decode_responses=True,
    )
    (job,) = [json.loads(x) for x in r.lrange(QUEUE_CLASSIFY, 0, -1)]
    assert job["kind"] == "classify"
    assert job["audio_id"] == audio_id
    assert job["model"] == "lexicon-v1"
    assert job["batch_id"] == "b-finished"


def test_another_model_judges_the_same_version_beside_the_first(
    pipeline_env, settings, db_conn
) -> None:
    """A model the fleet publishes (the tiny CoPE-A-style classifier) is named with
    --model; a worker whose own classifier is the lexicon loads it for the job, and
    the file ends with one verdict per model under the one policy version."""
    install_whisper(settings.models_root)
    model_dir = install_classifier(settings.models_root)
    db = db_conn
    add_batch(db, "b-recl-003", "done")
    policy = add_policy(db, "boats", "Boats on water.", lexicon=["canoe"])
    audio_id = _done_file(db, "b-recl-003", "a.mp3", "a canoe on the lake")
    db.execute(
        "INSERT INTO classifications (audio_id, policy_id, model, score, label, threshold) "
        "VALUES (%s, %s, 'lexicon-v1', 0.5, 1, 0.5)",
        (audio_id, policy),
    )
    db.commit()
    unknown = cli(pipeline_env, "reclassify", "--policy", "boats", "--model", CLASSIFIER_DIR)
    assert unknown.returncode == 1
    assert "not in the model store" in unknown.stderr
    published = cli(pipeline_env, "models", "publish", str(model_dir), "--name", CLASSIFIER_DIR)
    assert published.returncode == 0, published.stderr
    queued = cli(pipeline_env, "reclassify", "--policy", "boats", "--model", CLASSIFIER_DIR)
    assert queued.returncode == 0, queued.stderr

    code, output = finish(start_module(GPU, pipeline_env, ["--drain"]), timeout=240)
    assert code == 0, output
    assert f"event=gpu.classifier_loaded classifier={CLASSIFIER_DIR}" in output
    rows = db.execute(
        "SELECT model, score, label, threshold FROM classifications ORDER BY model"
    ).fetchall()
    assert [r["model"] for r in rows] == [CLASSIFIER_DIR, "lexicon-v1"]
    assert (rows[1]["score"], rows[1]["label"]) == (0.5, 1)  # the first model's, kept
    assert 0 <= rows[0]["score"] <= 1
    assert rows[0]["label"] == int(rows[0]["score"] >= rows[0]["threshold"])
    status = json.loads(cli(pipeline_env, "status", "--json").stdout)
    (run,) = status["reclassify"]["runs"]
    assert (run["model"], run["files"], run["done"]) == (CLASSIFIER_DIR, 1, 1)
