"""Unpack worker: an archive in S3 becomes Opus files and transcribe jobs on this host.

For each job from queue:unpack ({"batch_id", "s3_key", ...}):

1. mark the batch ``unpacking`` on this host;
2. download ``s3_key`` to SCRATCH_ROOT/{batch_id}/archive.tar (SHA-256 checked);
3. extract it safely into .../files/ (audio_pipeline.archive: any unsafe member
   rejects the whole archive);
4. record a ``pending`` audio_files row per MP3, then convert them all in
   parallel into .../opus/, uploading each Opus to S3 (audio/{batch_id}/...) and
   marking its row ``converted`` (or ``failed`` with ffmpeg's reason) as it lands;
5. delete the tar and the extracted MP3s, mark the batch ``unpacked``, and push
   one job per converted file to this host's queue (queue:transcribe:{host}).

Jobs are pushed only after the batch is marked unpacked, so a gpu worker that
finishes the last file always sees the batch complete; the price is that
transcription of a batch starts when its conversion ends (other batches keep the
GPU busy meanwhile).

Redelivery is safe: rows are upserts, a file the gpu stage already took
(transcribing/done) is neither converted nor queued again, and a file queued
twice is harmless because the gpu stage is idempotent. A bad archive, a missing
S3 key or a malformed payload is permanent: the batch is marked failed with the
reason, its scratch is removed and the job goes to queue:failed.

A stop (a deploy): the batch in hand may go on for the stop grace
(WORKER_STOP_GRACE_S). Still unfinished then, its ffmpeg runs are terminated and the
job goes back to the head of queue:unpack as it came, no attempt spent. Nothing of
it was queued (jobs are pushed only at the end), the tar and the extracted MP3s are
removed on the way out, and Opus files already written stay in scratch: the redo
downloads and extracts again, resets its rows to pending, and converts over them.

Back-pressure: a new archive is claimed only while this host's transcribe queue
is shorter than UNPACK_MAX_HOST_QUEUE and scratch has more than
UNPACK_MIN_FREE_BYTES free, so archives flow to hosts with spare GPU time.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audio_pipeline import s3_utils
from audio_pipeline.archive import (
    ArchiveError,
    ArchiveLimits,
    CorruptArchiveError,
    EmptyArchiveError,
    ExtractedFile,
    UnsafeArchiveError,
    extract_archive,
)
from audio_pipeline.audio import (
    FFMPEG,
    FFPROBE,
    AudioSettings,
    Conversion,
    ConversionResult,
    convert_one,
    remove_stale_partials,
)
from audio_pipeline.batch_ids import BATCH_ID_RULE, is_valid_batch_id
from audio_pipeline.config import QUEUE_UNPACK, ConfigError, EnvReader, EnvSettings, Settings
from audio_pipeline.queue import Job, PermanentJobError, ReapedDeadLetterError, require_fields
from audio_pipeline.records import audio_files, batches
from audio_pipeline.records.audio_files import GPU_STATES, FoundFile
from audio_pipeline.runtime.command import run_worker
from audio_pipeline.runtime.queue_worker import QueueWorker

UNPACK_MAX_HOST_QUEUE = 200  # transcribe jobs waiting on this host; at or above: stop claiming
UNPACK_MIN_FREE_BYTES = 10 * 1024**3  # bytes free under SCRATCH_ROOT to claim (10 GiB)
OPUS_CONTENT_TYPE = "audio/ogg"
ARCHIVE_NAME = "archive.tar"
FILES_DIR = "files"
OPUS_DIR = "opus"


class ConversionStopped(RuntimeError):
    """ffmpeg was stopped by a signal mid-batch (not by a stop of this worker, which
    hands the batch back instead); the job is retried, no file is failed."""


@dataclass(frozen=True)
class UnpackSettings(EnvSettings):
    max_host_queue: int = UNPACK_MAX_HOST_QUEUE
    min_free_bytes: int = UNPACK_MIN_FREE_BYTES
    limits: ArchiveLimits = field(default_factory=ArchiveLimits)
    audio: AudioSettings = field(default_factory=AudioSettings)

    @classmethod
    def read(cls, env: EnvReader) -> UnpackSettings:
        return cls(
            max_host_queue=env.int("UNPACK_MAX_HOST_QUEUE", UNPACK_MAX_HOST_QUEUE, minimum=1),
            min_free_bytes=env.int("UNPACK_MIN_FREE_BYTES", UNPACK_MIN_FREE_BYTES, minimum=0),
            limits=ArchiveLimits.read(env),
            audio=AudioSettings.read(env),
        )


@dataclass(frozen=True)
class UnpackRequest:
    """A validated queue:unpack payload."""

    batch_id: str
    s3_key: str
    file_count: int | None = None

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> UnpackRequest:
        require_fields(payload, {"batch_id": str, "s3_key": str})
        batch_id, s3_key = payload["batch_id"], payload["s3_key"]
        # checked before the id names a scratch directory
        if not is_valid_batch_id(batch_id):
            raise PermanentJobError(f"invalid batch_id {batch_id!r}: use {BATCH_ID_RULE}")
        if not s3_key.strip():
            raise PermanentJobError("invalid job payload: key 's3_key' is empty")
        count = payload.get("file_count")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
            raise PermanentJobError(f"invalid job payload: file_count must be int, got {count!r}")
        return cls(batch_id, s3_key, count)


@dataclass(frozen=True)
class BatchPaths:
    """Where one batch lives on this host's scratch volume."""

    root: Path

    @property
    def archive(self) -> Path:
        return self.root / ARCHIVE_NAME

    @property
    def files(self) -> Path:
        return self.root / FILES_DIR

    def opus_for(self, rel_path: str) -> Path:
        return self.root / OPUS_DIR / Path(rel_path).with_suffix(".opus")

    def remove_inputs(self) -> None:
        """The tar and the extracted MP3s: only the Opus files are needed after conversion."""
        self.archive.unlink(missing_ok=True)
        self.archive.with_name(ARCHIVE_NAME + ".part").unlink(missing_ok=True)
        shutil.rmtree(self.files, ignore_errors=True)
        shutil.rmtree(self.files.with_name(FILES_DIR + ".partial"), ignore_errors=True)


@dataclass
class BatchOutcome:
    found: int = 0
    converted: list[dict[str, Any]] = field(default_factory=list)  # transcribe payloads
    failed: int = 0
    already_taken: int = 0  # files the gpu stage owns from an earlier delivery
    audio_seconds: float = 0.0


class UnpackWorker(QueueWorker):
    """Unpack archives from S3 into Opus files and queue them for transcription here."""

    stage = "unpack"
    stage_settings_class = UnpackSettings

    def __init__(self, settings: Settings | None = None, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.unpack: UnpackSettings = self.stage_settings
        missing = [tool for tool in (FFMPEG, FFPROBE) if shutil.which(tool) is None]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} not found on PATH (apt-get install ffmpeg)")
        self.settings.scratch_root.mkdir(parents=True, exist_ok=True)
        self.s3 = s3_utils.get_s3_client(self.settings)
        self._paused_reason: str | None = None

    def source_queues(self) -> list[str]:
        return [QUEUE_UNPACK]

    # -- back-pressure -------------------------------------------------------------

    def setup(self) -> None:
        self.metrics.watch_scratch(self.settings.scratch_root)  # read at each scrape

    def ready_to_claim(self) -> bool:
        reason = self._pause_reason()
        if reason != self._paused_reason:  # log changes only, not every poll
            event = "unpack.paused" if reason else "unpack.resumed"
            self.log_stage_event(event, reason=reason or "")
            self._paused_reason = reason
        return reason is None

    def _pause_reason(self) -> str | None:
        waiting = int(self.redis.llen(self.settings.host_queue))
        if waiting >= self.unpack.max_host_queue:
            return (
                f"{waiting} jobs in {self.settings.host_queue} "
                f"(UNPACK_MAX_HOST_QUEUE={self.unpack.max_host_queue})"
            )
        free = shutil.disk_usage(self.settings.scratch_root).free
        if free <= self.unpack.min_free_bytes:
            return (
                f"{free} bytes free under {self.settings.scratch_root} "
                f"(UNPACK_MIN_FREE_BYTES={self.unpack.min_free_bytes})"
            )
        return None

    # -- one job -------------------------------------------------------------------

    def process(self, job: Job) -> None:
        request = UnpackRequest.from_payload(job.payload)
        paths = BatchPaths(self.settings.batch_scratch(request.batch_id))
        started = time.monotonic()
        with self.db.connection() as conn:
            previous = batches.mark_unpacking(
                conn, request.batch_id, request.s3_key, self.settings.worker_host
            )
        if previous is batches.BatchStatus.DONE:
            self._log_batch("unpack.skipped", request.batch_id, reason="batch already done")
            return
        try:
            found = self._fetch_and_extract(request, paths)
            outcome = self._convert_and_record(request, paths, found)
        except PermanentJobError as exc:
            self._fail_batch(request.batch_id, str(exc))
            raise
        finally:
            paths.remove_inputs()
        self._finish(request, outcome)
        self._log_batch(
            "unpack.batch",
            request.batch_id,
            files=outcome.found,
            converted=len(outcome.converted),
            failed=outcome.failed,
            already_taken=outcome.already_taken,
            audio_s=round(outcome.audio_seconds, 1),
            duration_s=time.monotonic() - started,
        )

    def _fetch_and_extract(self, request: UnpackRequest, paths: BatchPaths) -> list[ExtractedFile]:
        bucket = self.settings.s3_bucket
        if not s3_utils.object_exists(self.s3, bucket, request.s3_key):
            raise PermanentJobError(f"archive s3://{bucket}/{request.s3_key} does not exist")
        s3_utils.download_file(self.s3, bucket, request.s3_key, paths.archive)
        self.alive()  # systemd's watchdog: each step done proves the worker is not hung
        try:
            extracted = extract_archive(paths.archive, paths.files, self.unpack.limits)
        except ArchiveError as exc:
            raise PermanentJobError(f"{_archive_problem(exc)} archive: {exc}") from exc
        self.alive()
        if request.file_count is not None and request.file_count != len(extracted.files):
            self._log_batch(
                "unpack.file_count_mismatch",
                request.batch_id,
                level=logging.WARNING,
                expected=request.file_count,
                found=len(extracted.files),
            )
        return extracted.files

    def _convert_and_record(
        self, request: UnpackRequest, paths: BatchPaths, found: list[ExtractedFile]
    ) -> BatchOutcome:
        batch_id, host, bucket = (
            request.batch_id,
            self.settings.worker_host,
            self.settings.s3_bucket,
        )
        outcome = BatchOutcome(found=len(found))
        with self.db.connection() as conn:
            states = audio_files.register_found(
                conn, batch_id, [FoundFile(f.rel_path, f.size_bytes, f.sha256) for f in found], host
            )
            conn.commit()  # the pending rows show the batch's files while they convert
            remove_stale_partials(paths.root / OPUS_DIR)  # left by a killed earlier attempt
            conversions: list[Conversion] = []
            outputs: dict[Path, str] = {}
            for f in found:
                if states[f.rel_path].status in GPU_STATES:
                    outcome.already_taken += 1
                    continue
                output = paths.opus_for(f.rel_path)
                if output in outputs:  # "a.mp3" and "a.MP3" would share "a.opus"
                    reason = f"its Opus name collides with that of {outputs[output]!r}"
                    audio_files.mark_failed(conn, batch_id, f.rel_path, reason, host)
                    outcome.failed += 1
                    continue
                outputs[output] = f.rel_path
                conversions.append(Conversion(f.rel_path, paths.files / f.rel_path, output))
            conn.commit()

            for result in _converted(conversions, self.unpack.audio):
                self.alive()  # one more file converted
                rel = result.key
                # While stopping, any failed conversion may be ffmpeg's own stop signal:
                # one landing while it sets up makes it exit as for a bad input. Handing
                # the batch back costs nothing; a really bad file fails again next time.
                if result.interrupted or (not result.ok and self.stopping):
                    if self.stopping:  # ffmpeg got the stop signal too: hand the batch back
                        self.force_stop(reason=f"ffmpeg was stopped: {rel!r}: {result.error}")
                    raise ConversionStopped(f"{rel!r}: {result.error}")
                if not result.ok or result.duration_s is None:
                    audio_files.mark_failed(conn, batch_id, rel, result.error or "failed", host)
                    conn.commit()
                    outcome.failed += 1
                    self._log_batch(
                        "unpack.file_failed",
                        batch_id,
                        level=logging.WARNING,
                        rel_path=rel,
                        error=result.error,
                    )
                    continue
                key = s3_utils.opus_key(batch_id, rel)
                s3_utils.upload_file(
                    self.s3, bucket, result.output, key, content_type=OPUS_CONTENT_TYPE
                )
                audio_files.mark_converted(
                    conn,
                    batch_id,
                    rel,
                    duration_s=result.duration_s,
                    opus_s3_key=key,
                    opus_path=str(result.output),
                    host=host,
                )
                conn.commit()
                outcome.audio_seconds += result.duration_s
                outcome.converted.append(
                    {
                        "audio_id": states[rel].id,
                        "opus_path": str(result.output),
                        "batch_id": batch_id,
                        "opus_s3_key": key,
                        "host": host,
                    }
                )
        return outcome

    def _finish(self, request: UnpackRequest, outcome: BatchOutcome) -> None:
        batch_id = request.batch_id
        if not outcome.converted and not outcome.already_taken:
            reason = (
                f"none of the {outcome.found} audio files could be converted "
                "(reasons in audio_files.error)"
            )
            self._fail_batch(batch_id, reason)
            raise PermanentJobError(reason)
        with self.db.connection() as conn:
            batches.mark_unpacked(conn, batch_id, outcome.found)
            # A redelivered job may find every file already finished: the gpu worker
            # that stored the last one saw the batch 'unpacking' (this job held it)
            # and left it, so completing it falls to this job, in the same transaction.
            completed = batches.complete_batches_if_finished(conn, [batch_id])
            conn.commit()
        for payload in outcome.converted:
            # Waits out a Redis outage here: handing the job back instead would convert
            # and queue the files pushed so far a second time.
            self.redis_call(lambda p=payload: self.queue.enqueue(self.settings.host_queue, p))
        if completed:
            # Nothing will come back for this batch's scratch: clear it here.
            s3_utils.cleanup_scratch(batch_id, self.settings)

    def on_job_failed(self, job: Job, error: BaseException) -> None:
        # Every dead letter ends its batch failed: retries used up, the reaper's (the
        # worker died with it, maybe on another host), or a payload bad before
        # process() marked anything. One process() already failed is left as it is.
        batch_id = job.payload.get("batch_id")
        if not is_valid_batch_id(batch_id):
            return
        reason = str(error)  # a permanent error's or a settled dead letter's own words
        if not isinstance(error, PermanentJobError | ReapedDeadLetterError):
            reason = f"gave up after {job.attempts + 1} attempts: {type(error).__name__}: {error}"
        self._fail_batch(batch_id, reason)

    def _fail_batch(self, batch_id: str, reason: str) -> None:
        """The batch and its unconverted files -> failed; this host's scratch removed
        (a dead host's stays on that host: it cannot be reached from here)."""
        with self.db.connection() as conn:
            changed = batches.mark_unpack_failed(conn, batch_id, reason)
        s3_utils.cleanup_scratch(batch_id, self.settings)
        if changed:
            self._log_batch("unpack.batch_failed", batch_id, level=logging.WARNING, error=reason)

    def _log_batch(
        self, event: str, batch_id: str, *, level: int = logging.INFO, **fields: Any
    ) -> None:
        self.log_stage_event(event, level=level, batch_id=batch_id, **fields)


def _converted(
    conversions: list[Conversion], settings: AudioSettings
) -> Iterator[ConversionResult]:
    """Each conversion's result as soon as it is ready, one ffmpeg per UNPACK_FFMPEG_JOBS.

    Unlike ``audio.convert_many``, closing it early (a forced stop unwinding) does not
    wait for the ffmpeg runs in progress: the ones not started are dropped, and the
    service terminates the running ones before it hands the batch back.
    """
    if not conversions:
        return
    pool = ThreadPoolExecutor(
        max_workers=min(settings.jobs, len(conversions)), thread_name_prefix="ffmpeg"
    )
    try:
        futures = [pool.submit(convert_one, c, settings) for c in conversions]
        for future in as_completed(futures):
            yield future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _archive_problem(exc: ArchiveError) -> str:
    if isinstance(exc, UnsafeArchiveError):
        return "unsafe"
    if isinstance(exc, EmptyArchiveError):
        return "empty"
    if isinstance(exc, CorruptArchiveError):
        return "corrupt"
    return "unusable"


def main() -> int:
    return run_worker(UnpackWorker)


if __name__ == "__main__":
    sys.exit(main())
