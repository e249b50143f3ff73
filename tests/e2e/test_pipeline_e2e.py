"""The whole pipeline on real speech, real services and real worker processes.

Several espeak-ng batches (nested folders, odd names, 2-20 s files) are put on the
collection host (the stack's sshd); transfer-worker, unpack-worker and gpu-worker
run as three separate long-lived processes, exactly as systemd runs them; the test
waits for the database to say every file is done, then stops the workers with
SIGTERM (they must exit 0) and checks every promise of the pipeline:

- each file has a transcript whose word error rate against the spoken text is
  reported and stays under a bound measured on this machine;
- each file has a classification for every active policy;
- ra_queue lists exactly the files whose transcripts the lexicon flags;
- S3 holds every archive and every Opus file; scratch is empty.

A second test kills the gpu worker with SIGKILL in the middle of a job and starts a
new one: the reaper hands the job back and nothing is lost or duplicated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import jiwer
import psycopg
import pytest
from psycopg.rows import dict_row

from audio_pipeline import s3_utils
from devtools import dev_models
from devtools.sample import make_speech_batch
from tests.support.metrics_scrape import free_port, scrape

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
PIPELINE_TIMEOUT_S = 600.0  # every file done; typically ~1-2 minutes on 2 cores
STOP_TIMEOUT_S = 60.0  # a worker must exit this soon after SIGTERM
SETTLE_TIMEOUT_S = 30.0  # a stage's last acknowledgement after its last row is done
STAGES = {"transfer": "transfer-worker", "unpack": "unpack-worker", "gpu": "gpu-worker"}
# Measured here on this corpus with tiny.en int8: ~5% mean WER (espeak-ng voices
# vary). The bound leaves room for voice/run variation, not for a broken decoder.
MEAN_WER_BOUND = 0.15
BATCHES = (("e2e-alpha", 8, 11), ("e2e-beta", 8, 12), ("e2e-gamma", 6, 13))  # id, files, seed
POLICIES = (
    ("demeaning-language", ["trash", "garbage", "dirty", "useless"]),
    ("physical-harm", ["kick", "broke", "punch", "hurt"]),
)
NORMALISE = jiwer.Compose(
    [
        jiwer.ToLowerCase(),
        jiwer.RemovePunctuation(),
        jiwer.RemoveMultipleSpaces(),
        jiwer.Strip(),
        jiwer.ReduceToListOfListOfWords(),
    ]
)


@pytest.fixture(scope="session")
def speech_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """espeak-ng WAVs shared by every batch this session speaks."""
    return tmp_path_factory.mktemp("speech-cache")


@pytest.fixture
def e2e_env(pipeline_env: dict[str, str], stack, tmp_path: Path) -> dict[str, str]:
    """pipeline_env plus this test's own collection directory and the dev models."""
    collection = stack.collection_dir / f"{tmp_path.name}-{uuid.uuid4().hex[:8]}"
    collection.mkdir(parents=True)
    dev_models.install_whisper(Path(pipeline_env["MODELS_ROOT"]))
    env = {
        **os.environ,
        **pipeline_env,
        "COLLECTION_DIR": str(collection),
        # short timings so a dead worker is noticed in seconds, not minutes
        "WORKER_HEARTBEAT_INTERVAL_S": "1",
        "WORKER_HEARTBEAT_TTL_S": "4",
        "WORKER_REAPER_INTERVAL_S": "2",
        "TRANSFER_POLL_S": "1",
        "TRANSFER_STABLE_S": "1",
        "BATCH_SIZE": "4",
        "CLASSIFIER_BACKEND": "lexicon",
        "FLAG_THRESHOLD": "0.5",
    }
    with psycopg.connect(_db_url(env)) as conn:
        for name, lexicon in POLICIES:
            conn.execute(
                "INSERT INTO policies (name, version, text, lexicon) VALUES (%s, 1, %s, %s)",
                (name, f"# Policy\n\n## Overview\n{name}", lexicon),
            )
    yield env
    shutil.rmtree(collection)


def _db_url(env: Mapping[str, str]) -> str:
    return (
        f"postgresql://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@"
        f"{env['POSTGRES_HOST']}:{env['POSTGRES_PORT']}/{env['POSTGRES_DB']}"
    )


class Workers:
    """The three worker processes, started and stopped like systemd would."""

    def __init__(self, env: Mapping[str, str], log_dir: Path) -> None:
        self.env = dict(env)
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, **extra_env: str) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [str(BIN / name)], env={**self.env, **extra_env}, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs[name] = proc
        return proc

    def stop_all(self) -> dict[str, int]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:])
            for p in sorted(self.log_dir.glob("*.log"))
        )


@pytest.fixture
def workers(e2e_env: dict[str, str], tmp_path: Path) -> Iterator[Workers]:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    w = Workers(e2e_env, log_dir)
    yield w
    w.stop_all()


def _put_batches(env: Mapping[str, str], speech_cache: Path, tmp_path: Path) -> dict[str, dict]:
    """Speak every batch, then move each tar into the collection dir atomically."""
    manifests: dict[str, dict] = {}
    staging = tmp_path / "staging"
    for batch_id, n_files, seed in BATCHES:
        sample = make_speech_batch(
            staging,
            batch_id,
            n_files=n_files,
            seed=seed,
            min_seconds=2,
            max_seconds=20,
            cache_dir=speech_cache,
        )
        manifests[batch_id] = json.loads(sample.manifest_path.read_text())
        sample.tar_path.rename(Path(env["COLLECTION_DIR"]) / sample.tar_path.name)
    return manifests


def _wait_until_done(
    env: Mapping[str, str], n_files: int, workers: Workers, batches: int | None = None
) -> None:
    """Poll PostgreSQL until n_files are done or failed (and `batches` batches done)."""
    deadline = time.monotonic() + PIPELINE_TIMEOUT_S
    with psycopg.connect(_db_url(env), autocommit=True) as conn:
        while time.monotonic() < deadline:
            for name, proc in workers.procs.items():
                if proc.poll() is not None:
                    pytest.fail(f"{name} died with {proc.returncode}\n{workers.logs()}")
            finished = conn.execute(
                "SELECT count(*) FROM audio_files WHERE status IN ('done', 'failed')"
            ).fetchone()[0]
            batches_done = conn.execute(
                "SELECT count(*) FROM batches WHERE status = 'done'"
            ).fetchone()[0]
            if finished >= n_files and (batches is None or batches_done == batches):
                return
            time.sleep(1.0)
    pytest.fail(f"pipeline did not finish within {PIPELINE_TIMEOUT_S:.0f}s\n{workers.logs()}")


def _scrape_settled(ports: dict[str, int], jobs: dict[str, int]) -> dict[str, dict[str, float]]:
    """Each stage's scrape once it has settled all its jobs: a file's row is done a moment
    before its job is acknowledged."""
    scraped: dict[str, dict[str, float]] = {}
    for stage, expected in jobs.items():
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            scraped[stage] = scrape(ports[stage], stage)
            done = scraped[stage].get("audio_pipeline_jobs_done_total", 0)
            if done >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    return scraped


def _check_metrics(
    metrics: dict[str, dict[str, float]], *, n_batches: int, n_files: int, audio_s: float
) -> None:
    """What each worker's /metrics says it did, against what the database says was done."""
    jobs = {"transfer": n_batches, "unpack": n_batches, "gpu": n_files}
    for stage, m in metrics.items():
        assert m["audio_pipeline_jobs_claimed_total"] == jobs[stage], stage
        assert m["audio_pipeline_jobs_done_total"] == jobs[stage], stage
        assert m["audio_pipeline_job_duration_seconds_count"] == jobs[stage], stage
        assert m["audio_pipeline_jobs_retried_total"] == 0, stage
        assert m["audio_pipeline_jobs_dead_lettered_total"] == 0, stage
        assert m["audio_pipeline_backend_up/redis"] == 1, stage
        assert m["audio_pipeline_backend_up/postgres"] == 1, stage
    # Queued stages stamp their jobs: every claim downstream of transfer has a wait.
    assert metrics["unpack"]["audio_pipeline_queue_wait_seconds_count"] == n_batches
    assert metrics["gpu"]["audio_pipeline_queue_wait_seconds_count"] == n_files
    assert metrics["unpack"]["audio_pipeline_scratch_free_bytes"] > 0
    assert metrics["gpu"]["audio_pipeline_scratch_free_bytes"] > 0
    gpu = metrics["gpu"]
    assert gpu["audio_pipeline_files_transcribed_total"] == n_files
    # ffprobe's durations at unpack against the decoded audio the ASR was given
    assert gpu["audio_pipeline_audio_seconds_transcribed_total"] == pytest.approx(audio_s, rel=0.02)
    assert gpu["audio_pipeline_asr_seconds_total"] > 0
    assert gpu["audio_pipeline_classifier_seconds_total"] > 0
    assert gpu["audio_pipeline_realtime_factor"] > 0
    # the ASR model and the classifier, each timed as it loaded
    assert len([k for k in gpu if k.startswith("audio_pipeline_model_load_seconds/")]) == 2


def _wer(reference: str, hypothesis: str) -> float:
    return float(
        jiwer.wer(
            reference, hypothesis, reference_transform=NORMALISE, hypothesis_transform=NORMALISE
        )
    )


def _lexicon_hits(text: str, terms: list[str]) -> bool:
    return any(re.search(rf"\b{re.escape(t)}\b", text, re.IGNORECASE) for t in terms)


def test_batches_flow_from_collection_host_to_ra_queue(
    e2e_env, workers, speech_cache, tmp_path, s3_client
):
    manifests = _put_batches(e2e_env, speech_cache, tmp_path)
    n_files = sum(len(m) for m in manifests.values())
    assert n_files >= 20
    ports = {stage: free_port() for stage in STAGES}
    for stage, name in STAGES.items():
        workers.start(name, METRICS_PORT=str(ports[stage]))

    _wait_until_done(e2e_env, n_files, workers, batches=len(BATCHES))
    metrics = _scrape_settled(
        ports, {"transfer": len(BATCHES), "unpack": len(BATCHES), "gpu": n_files}
    )
    codes = workers.stop_all()
    assert codes == {"transfer-worker": 0, "unpack-worker": 0, "gpu-worker": 0}, workers.logs()

    with psycopg.connect(_db_url(e2e_env), row_factory=dict_row) as conn:
        files = conn.execute(
            "SELECT a.id, a.batch_id, a.rel_path, a.status, a.error, a.opus_s3_key, "
            "t.text, t.segments FROM audio_files a LEFT JOIN transcripts t ON t.audio_id = a.id"
        ).fetchall()
        n_policies = conn.execute("SELECT count(*) AS n FROM policies WHERE active").fetchone()["n"]
        per_file = {
            r["audio_id"]: r["n"]
            for r in conn.execute(
                "SELECT audio_id, count(DISTINCT policy_id) AS n FROM classifications "
                "GROUP BY audio_id"
            )
        }
        flagged = {r["audio_id"] for r in conn.execute("SELECT audio_id FROM ra_queue")}
        batch_rows = conn.execute(
            "SELECT batch_id, status, file_count, archive_bytes FROM batches"
        ).fetchall()
        audio_s = conn.execute("SELECT sum(duration_s) AS s FROM audio_files").fetchone()["s"]

    # every file of every batch, exactly once, transcribed
    assert sorted((f["batch_id"], f["rel_path"]) for f in files) == sorted(
        (b, p) for b, m in manifests.items() for p in m
    )
    assert [f for f in files if f["status"] != "done"] == []
    assert {(b["batch_id"], b["status"], b["file_count"]) for b in batch_rows} == {
        (b, "done", len(m)) for b, m in manifests.items()
    }
    _check_metrics(metrics, n_batches=len(BATCHES), n_files=n_files, audio_s=audio_s)
    assert metrics["transfer"]["audio_pipeline_bytes_transferred_total"] == sum(
        b["archive_bytes"] for b in batch_rows
    )

    # transcripts match the spoken text
    wers = {
        (f["batch_id"], f["rel_path"]): _wer(manifests[f["batch_id"]][f["rel_path"]], f["text"])
        for f in files
    }
    mean_wer = sum(wers.values()) / len(wers)
    worst = max(wers.items(), key=lambda kv: kv[1])
    print(f"\nE2E WER over {len(wers)} files: mean {mean_wer:.3f}, worst {worst[1]:.3f} {worst[0]}")
    assert mean_wer <= MEAN_WER_BOUND
    assert all(f["segments"] and f["segments"][0]["words"] for f in files), "word timings"

    # a verdict for every active policy on every file; ra_queue = what the lexicon flags
    assert per_file == {f["id"]: n_policies for f in files}
    expected_flagged = {
        f["id"] for f in files if any(_lexicon_hits(f["text"], terms) for _, terms in POLICIES)
    }
    assert flagged == expected_flagged
    assert flagged, "the corpus speaks lexicon words; something should be flagged"

    # S3 holds the archives and the Opus files; scratch holds nothing
    bucket = e2e_env["S3_BUCKET"]
    for batch_id in manifests:
        assert s3_utils.object_exists(s3_client, bucket, f"archives/{batch_id}.tar")
    for f in files:
        assert s3_utils.object_exists(s3_client, bucket, f["opus_s3_key"])
    scratch = Path(e2e_env["SCRATCH_ROOT"])
    assert [p for p in scratch.rglob("*") if p.is_file()] == []
    # the collection host keeps each archive, moved aside so it is never rescanned
    collection = Path(e2e_env["COLLECTION_DIR"])
    assert sorted(p.name for p in collection.glob("*.tar")) == []
    assert sorted(p.name for p in (collection / "transferred").glob("*.tar")) == sorted(
        f"{b}.tar" for b in manifests
    )


def test_gpu_worker_killed_mid_job_loses_nothing(e2e_env, workers, speech_cache, tmp_path):
    batch_id, n_files, seed = BATCHES[0]
    staging = tmp_path / "staging"
    sample = make_speech_batch(
        staging,
        batch_id,
        n_files=n_files,
        seed=seed,
        min_seconds=8,
        max_seconds=20,
        cache_dir=speech_cache,
    )
    sample.tar_path.rename(Path(e2e_env["COLLECTION_DIR"]) / sample.tar_path.name)
    workers.start("transfer-worker")
    workers.start("unpack-worker")

    import redis

    r = redis.Redis(
        host="127.0.0.1",
        port=int(e2e_env["REDIS_PORT"]),
        password=e2e_env["REDIS_PASSWORD"],
        db=int(e2e_env["REDIS_DB"]),
        decode_responses=True,
    )
    host_queue = f"queue:transcribe:{e2e_env['WORKER_HOST']}"
    deadline = time.monotonic() + PIPELINE_TIMEOUT_S
    while r.llen(host_queue) < n_files and time.monotonic() < deadline:
        time.sleep(0.5)
    assert r.llen(host_queue) == n_files, workers.logs()

    # the first gpu worker claims a batch of jobs; kill it while it holds them
    victim = workers.start("gpu-worker")
    while time.monotonic() < deadline:
        held = [k for k in r.scan_iter("processing:gpu:*") if r.llen(k)]
        if held:
            break
        time.sleep(0.05)
    assert held, workers.logs()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    del workers.procs["gpu-worker"]

    workers.start("gpu-worker")
    _wait_until_done(e2e_env, n_files, workers)
    assert workers.stop_all()["gpu-worker"] == 0

    with psycopg.connect(_db_url(e2e_env), row_factory=dict_row) as conn:
        statuses = conn.execute(
            "SELECT status, count(*) AS n FROM audio_files GROUP BY status"
        ).fetchall()
        transcripts = conn.execute("SELECT count(*) AS n FROM transcripts").fetchone()["n"]
        dupes = conn.execute(
            "SELECT count(*) AS n FROM (SELECT audio_id, policy_id, model FROM classifications "
            "GROUP BY 1, 2, 3 HAVING count(*) > 1) d"
        ).fetchone()["n"]
    assert statuses == [{"status": "done", "n": n_files}]
    assert transcripts == n_files
    assert dupes == 0
    assert [k for k in r.scan_iter("processing:*") if r.llen(k)] == []
    assert r.llen("queue:failed") == 0
