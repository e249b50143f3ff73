"""Pipeline overhead: one batch through the real workers against its bare parts.

    .venv/bin/python -m bench.bench_pipeline [--smoke] [--out PATH]

Pipeline: an espeak-ng batch is uploaded to S3 as ``archives/{batch_id}.tar`` and
a ``queue:unpack`` job pushed; then ``unpack_worker --drain`` and
``gpu_worker --drain`` run as real processes against this run's own slice of the
local stack (Redis db, Postgres database, S3 bucket, scratch). Each output line
is time-stamped as it arrives; the pipeline's time is the unpack job (job.started
to job.done) plus the gpu stage (first job.started to last job.done). Process
start-up and model loading happen once per service lifetime, so they are shown
apart (end-to-end wall) and not counted as overhead.

Bare parts, same files, same settings, in this process: ``convert_many`` (ffmpeg,
all cores), ``transcribe_many`` over the same BATCH_SIZE groups, the classifier
over the transcripts, and one ``save_results`` transaction.

overhead = pipeline / bare - 1: what the queues, S3, Postgres, untar, and the
workers' bookkeeping add on top of the work itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg.rows import dict_row

from audio_pipeline import s3_utils
from audio_pipeline.asr import AsrSettings, load_transcriber
from audio_pipeline.audio import AudioSettings, Conversion, convert_many
from audio_pipeline.classify import (
    ClassifierSettings,
    ClassifyItem,
    TextSegment,
    load_classifier,
)
from audio_pipeline.config import QUEUE_UNPACK, load_settings
from audio_pipeline.records import results as records
from audio_pipeline.records.policies import active_policies
from audio_pipeline.workers.gpu_worker import GpuSettings
from bench import benchlib
from devtools.dev_models import install_whisper

FULL_FILES, SMOKE_FILES = 24, 4
MIN_S, MAX_S, SMOKE_MAX_S = 3.0, 30.0, 6.0
CORPUS_SEED = 21
BATCH_ID = "bench-pipeline-001"
WORKER_TIMEOUT_S = 900
TARGET_OVERHEAD = 0.10
DURATION = re.compile(r"\bduration_s=([0-9.]+)")
# A policy whose lexicon matches some Harvard sentences, so verdicts and evidence
# are written as they would be for real content.
POLICY = ("bench_policy", 1, "Bench policy.", ["canoe", "truck", "salmon", "fire"])


@dataclass
class StageRun:
    wall_s: float  # process start to exit
    job_s: float  # first job.started to last job.done
    batch_s: list[float]  # duration_s of each claim's handling, as the worker logs it
    lines: list[str] = field(default_factory=list)


def run_stage(module: str, env: dict[str, str]) -> StageRun:
    """Run a worker with --drain, stamping its job events as they are printed."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--drain"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    job_durations: list[float] = []
    first_start: float | None = None
    last_done: float | None = None
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter()
        lines.append(line.rstrip())
        if "event=job.started" in line and first_start is None:
            first_start = now
        elif "event=job.done" in line:
            last_done = now
            found = DURATION.search(line)
            if found:
                job_durations.append(float(found.group(1)))
    code = proc.wait(timeout=WORKER_TIMEOUT_S)
    wall = time.perf_counter() - started
    if code != 0 or first_start is None or last_done is None:
        tail = "\n".join(lines[-30:])
        raise SystemExit(f"{module} failed (exit {code}) or did no job:\n{tail}")
    # A gpu claim of N files logs N job.done lines with the same batch duration.
    batches = sorted(set(job_durations), key=job_durations.index)
    return StageRun(wall, last_done - first_start, batches, lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = benchlib.parse_args(__doc__.split("\n\n")[0], argv)
    report = benchlib.Report("pipeline", args.smoke)
    n_files = SMOKE_FILES if args.smoke else FULL_FILES
    batch_size = GpuSettings.from_env().batch_size
    with (
        benchlib.isolated_stack("pipeline") as iso,
        tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp,
    ):
        work = Path(tmp)
        env = {**os.environ, **iso.env, "UNPACK_MIN_FREE_BYTES": "0", "LOG_LEVEL": "INFO"}
        settings = load_settings(env)
        install_whisper(settings.models_root)
        batch, mp3s = benchlib.speech_corpus(
            work, n_files, CORPUS_SEED, MIN_S, SMOKE_MAX_S if args.smoke else MAX_S
        )
        with psycopg.connect(iso.pipeline_url, row_factory=dict_row) as conn:
            conn.execute(
                "INSERT INTO policies (name, version, text, lexicon) VALUES (%s, %s, %s, %s)",
                POLICY,
            )
        s3 = s3_utils.get_s3_client(settings)
        key = s3_utils.archive_key(BATCH_ID)
        s3_utils.upload_file(s3, settings.s3_bucket, batch.tar_path, key)
        iso.redis().rpush(
            QUEUE_UNPACK,
            json.dumps(
                {
                    "batch_id": BATCH_ID,
                    "s3_key": key,
                    "file_count": n_files,
                    "transferred_at": "2025-01-01T00:00:00+00:00",
                }
            ),
        )

        unpack = run_stage("audio_pipeline.workers.unpack_worker", env)
        gpu = run_stage("audio_pipeline.workers.gpu_worker", env)
        with psycopg.connect(iso.pipeline_url, row_factory=dict_row) as conn:
            rows = conn.execute(
                "SELECT a.id, a.rel_path, a.status, a.duration_s FROM audio_files a "
                "WHERE a.batch_id = %s",
                (BATCH_ID,),
            ).fetchall()
            n_transcripts = conn.execute("SELECT count(*) AS n FROM transcripts").fetchone()["n"]
        not_done = [r for r in rows if r["status"] != "done"]
        if len(rows) != n_files or not_done or n_transcripts != n_files:
            raise SystemExit(
                f"pipeline incomplete: {len(rows)} rows, {len(not_done)} not done, "
                f"{n_transcripts} transcripts"
            )
        ids = {r["rel_path"]: r["id"] for r in rows}

        # -- bare parts, same files and settings --------------------------------
        conversions = [
            Conversion(rel, mp3, work / "bare" / f"{i:04d}.opus")
            for i, (rel, mp3) in enumerate(sorted(mp3s.items()))
        ]
        transcriber = load_transcriber(settings.models_root, AsrSettings.from_env(env))
        classifier = load_classifier(settings.models_root, ClassifierSettings.from_env(env))
        with psycopg.connect(iso.pipeline_url, row_factory=dict_row) as conn:
            policies = active_policies(conn)
        # No warm-up call: the worker's first batch pays for first-call costs (VAD model,
        # allocations) too, so both sides pay them once.

        t0 = time.perf_counter()
        converted = {r.key: r for r in convert_many(conversions, AudioSettings.from_env(env))}
        t1 = time.perf_counter()
        keys = sorted(converted)
        transcripts = []
        for i in range(0, len(keys), batch_size):
            group = keys[i : i + batch_size]
            transcripts += transcriber.transcribe_many([converted[k].output for k in group])
        t2 = time.perf_counter()
        items = [
            ClassifyItem(
                key=ids[k],
                text=t.text,
                segments=[TextSegment(s.start, s.end, s.text) for s in t.segments],
            )
            for k, t in zip(keys, transcripts, strict=True)
        ]
        verdicts = classifier.classify(items, policies)
        t3 = time.perf_counter()
        by_audio: dict[int, list[object]] = {}
        for v in verdicts:
            by_audio.setdefault(v.key, []).append(v)
        results = [
            records.FileResult(ids[k], t, by_audio.get(ids[k], []))  # type: ignore[arg-type]
            for k, t in zip(keys, transcripts, strict=True)
        ]
        with psycopg.connect(iso.pipeline_url, row_factory=dict_row) as conn:
            records.save_results(conn, results)
        t4 = time.perf_counter()

    bare = {"ffmpeg_s": t1 - t0, "asr_s": t2 - t1, "classify_s": t3 - t2, "db_write_s": t4 - t3}
    bare_total = sum(bare.values())
    pipeline_s = unpack.job_s + gpu.job_s
    overhead = pipeline_s / bare_total - 1
    audio_s = sum(float(r["duration_s"] or 0) for r in rows)
    report.data.update(
        {
            "batch": {"files": n_files, "audio_s": round(audio_s, 1), "files_per_call": batch_size},
            "pipeline": {
                "job_s": round(pipeline_s, 3),
                "unpack_job_s": round(unpack.job_s, 3),
                "gpu_jobs_s": round(gpu.job_s, 3),
                "unpack_handler_s": unpack.batch_s,
                "gpu_batch_handler_s": gpu.batch_s,
                "end_to_end_wall_s": round(unpack.wall_s + gpu.wall_s, 3),
                "process_start_and_model_load_s": round(unpack.wall_s + gpu.wall_s - pipeline_s, 3),
            },
            "baseline": {
                "bare_s": round(bare_total, 3),
                **{k: round(v, 3) for k, v in bare.items()},
            },
            "overhead": round(overhead, 4),
            "pipeline_vs_bare": benchlib.ratio(pipeline_s, bare_total),
            "targets": {"overhead_max": TARGET_OVERHEAD},
            "meets_targets": overhead < TARGET_OVERHEAD,
        }
    )
    report.row("files / audio", f"{n_files} / {audio_s:.0f} s")
    report.row(
        "bare parts",
        f"{bare_total:.2f} s",
        " + ".join(f"{k[:-2]} {v:.2f}" for k, v in bare.items()),
    )
    report.row(
        "pipeline (jobs)", f"{pipeline_s:.2f} s", f"unpack {unpack.job_s:.2f} + gpu {gpu.job_s:.2f}"
    )
    report.row("overhead", f"{overhead * 100:+.1f} %", f"target < {TARGET_OVERHEAD * 100:.0f} %")
    report.row(
        "end to end incl. start",
        f"{unpack.wall_s + gpu.wall_s:.2f} s",
        "process start + model load, once per service",
    )
    report.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
