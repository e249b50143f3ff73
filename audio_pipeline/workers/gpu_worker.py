"""gpu worker: transcribe and classify claimed audio files, many per model call.

Claims up to BATCH_SIZE jobs at once, its host queue first (files unpacked here),
then the shared ``queue:transcribe``; finds each file and decodes the claim
(``prepare_batch``); transcribes the whole claim in one call (asr.py packs short
files into shared windows); classifies every transcript against every active
policy in one batched call; writes everything in one transaction; then deletes the
local Opus files and, once a batch has no file left waiting, its scratch directory.

With PREFETCH the next claim is taken as soon as this one is decoded and is
found, downloaded and decoded in a side thread while the model works on this one
(runtime/queue_worker.py's look-ahead), so the GPU does not wait for S3 or the decoder. The
default, ``auto``, turns it on when the model runs on CUDA: on CPU the model already
keeps every core busy and the overlap measured 0.98-1.09x (docs/PERFORMANCE.md).
Preparing writes nothing but idempotent bookkeeping (an ad hoc file's row, a
missing file marked failed); an undecodable file is failed when its claim is
processed, so a claim handed back on a stop is simply prepared again later.

Finding a file: the job's ``opus_path`` if it exists on this host; otherwise the
row's ``opus_s3_key`` fetched from S3 into SCRATCH_ROOT/{batch_id}/fetched/;
otherwise the job fails with a reason naming both places.

Jobs injected by hand (``redis-cli LPUSH queue:transcribe '{"audio_id": 1,
"opus_path": "/data/scratch/test-001/audio.opus"}'``): the payload's audio_id is
trusted only when that row exists and records the same opus_path (or none). If
not, the row that records this opus_path is used; failing that, the path is
registered as a new file of the batch ``adhoc`` and its results are stored under
the id the database assigns (logged as ``registered_audio_id``). The payload's id
is never inserted: ids come from the sequence, so a hand-typed id cannot collide
with a file the unpack worker registers later. Files outside SCRATCH_ROOT (an
operator's own) are never deleted.

A dead-lettered job (a permanent error, retries used up, or the reaper's dead letter
of a job whose worker kept dying, possibly on another host) ends its file ``failed``
with the error (``on_job_failed``); its batch then ends ``done`` with
``files_failed`` counted once nothing else waits. Its Opus and the batch's scratch are
removed where they are on this host; a dead host's scratch cannot be reached from
here and stays on that host (the rows are terminal all the same).

Redelivery is harmless: a file already done (transcript stored) is acknowledged
without work, and every write is an upsert on its natural key.

A claim that fails as a whole (decoding, the model call, classifying or the one
transaction raised, so no file is to blame) is run again one file at a time
(runtime/queue_worker.py's poison isolation): each file is found, fetched and decoded
again on its own, the good ones are stored once, and only a file that also fails
alone is retried. A CUDA out-of-memory (faster-whisper's "CUDA failed with error out
of memory", torch's OutOfMemoryError) runs the claim again in halves instead, and
the worker claims that many files for a while (``worker.claim_halved``,
``worker.claim_size_lowered``). A file's ``attempts`` column counts every model call
it was in, those of a failed claim too.

Text-only jobs (``audio-pipeline reclassify``; audio_pipeline/reclassify.py): after
its transcribe queues the worker serves ``queue:classify``. Such a job's transcript is
read from PostgreSQL and judged under the job's policy version by the job's model; no
audio is found, fetched or decoded and the ASR model is not called. The verdicts of a
claim are stored with their run files 'done' in one transaction
(``event=gpu.reclassified`` per file). The model is the one this worker loaded when
the job names it (or ``lexicon-v1``); another CoPE-A model is loaded from
MODELS_ROOT/{model} on first use and kept until another is named. A job that names a
file with no stored transcript, a policy version that does not exist or a model this
host does not have is dead-lettered with the reason, which marks only its run file
failed (``event=gpu.reclassify_failed``): the file and its batch stay as they were.

No active policy: files are still transcribed and stored, with no verdict. The
worker logs ``event=gpu.no_active_policy`` (level warning) at start and with the
first claim stored that way, then at most every NO_POLICY_WARN_INTERVAL_S with the
number of files since, and ``event=gpu.policies_active`` once a policy is back.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from audio_pipeline import reclassify as text_jobs
from audio_pipeline import s3_utils
from audio_pipeline.asr import (
    AsrSettings,
    AudioDecodeError,
    PreparedAudio,
    Transcriber,
    load_transcriber,
)
from audio_pipeline.classify import (
    LEXICON_MODEL,
    Classifier,
    ClassifierBackend,
    ClassifierSettings,
    ClassifyItem,
    LexiconClassifier,
    Policy,
    TextSegment,
    Verdict,
    load_classifier,
)
from audio_pipeline.config import (
    QUEUE_CLASSIFY,
    QUEUE_TRANSCRIBE,
    ConfigError,
    EnvReader,
    EnvSettings,
)
from audio_pipeline.logs import log_event
from audio_pipeline.queue import Job, PermanentJobError, ReapedDeadLetterError, require_fields
from audio_pipeline.records import reclassify as reclassify_records
from audio_pipeline.records import results as records
from audio_pipeline.records.policies import active_policies, policy_by_id
from audio_pipeline.runtime.command import run_worker
from audio_pipeline.runtime.queue_worker import QueueWorker

DEFAULT_BATCH_SIZE = 8  # files per claim (and per model call); group_vars sets production's
PREFETCH_AUTO = "auto"  # PREFETCH's default: look ahead when the ASR model is on CUDA
PAYLOAD_FIELDS: Mapping[str, type] = {"audio_id": int, "opus_path": str}
FETCHED_DIR = "fetched"  # under SCRATCH_ROOT/{batch_id}: Opus files pulled from S3
# With no active policy every file ends "done" with a transcript and no verdict. The
# worker says so at start and on the first claim stored that way, then at most this
# often, so the journal shows it without one line per claim.
NO_POLICY_WARN_INTERVAL_S = 300.0
NO_POLICY_HINT = (
    "no active policy: files are stored with a transcript but no verdict; apply one "
    "with `audio-pipeline policy apply` (playbooks/apply-policies.yml)"
)


@dataclass(frozen=True)
class GpuSettings(EnvSettings):
    """The gpu stage's own settings: claim size, look-ahead, the two models."""

    batch_size: int = DEFAULT_BATCH_SIZE  # files per claim and model call
    prefetch: bool | None = None  # None: auto, decided once the model is loaded
    asr: AsrSettings = field(default_factory=AsrSettings)
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)

    @classmethod
    def read(cls, env: EnvReader) -> GpuSettings:
        prefetch = None
        if env.raw("PREFETCH").lower() not in ("", PREFETCH_AUTO):
            prefetch = env.bool("PREFETCH", False)
        return cls(
            batch_size=env.int("BATCH_SIZE", DEFAULT_BATCH_SIZE, minimum=1),
            prefetch=prefetch,
            asr=AsrSettings.read(env),
            classifier=ClassifierSettings.read(env),
        )


@dataclass(frozen=True)
class _Work:
    """A job resolved to a database row and a readable local file."""

    job: Job
    row: records.AudioRow
    path: Path
    fetched: bool  # pulled from S3 by us: always ours to delete


@dataclass(frozen=True)
class _TextWork:
    """A text-only job resolved to its stored transcript and policy version."""

    job: Job
    spec: text_jobs.ClassifyJob
    transcript: reclassify_records.StoredTranscript
    policy: Policy


@dataclass
class _Prepared:
    """A claim made ready for the model by prepare_batch."""

    outcomes: dict[str, BaseException | None] = field(default_factory=dict)  # settled already
    work: list[_Work] = field(default_factory=list)  # decoded, in ``audio``'s order
    texts: list[_TextWork] = field(default_factory=list)  # text-only: no audio, no ASR
    audio: PreparedAudio | None = None
    undecodable: list[tuple[_Work, str]] = field(default_factory=list)  # failed when processed


class GpuWorker(QueueWorker):
    """Transcribes and classifies audio files (queue:transcribe:{host}, then queue:transcribe)."""

    stage = "gpu"
    stage_settings_class = GpuSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        gpu: GpuSettings = self.stage_settings
        self.batch_size = gpu.batch_size
        self.prefetch = gpu.prefetch
        self.asr_settings = gpu.asr
        self.classifier_settings = gpu.classifier
        self.transcriber: Transcriber | None = None
        self.classifier: Classifier | None = None
        self._s3: Any = None
        self._s3_lock = threading.Lock()  # the look-ahead thread may fetch too
        self._policy_missing = False  # warned that no policy is active, not yet resolved
        self._no_policy_warned_at: float | None = None  # monotonic time of a claim's warning
        self._files_without_verdict = 0  # stored with no policy since that warning
        self._other_classifier: Classifier | None = None  # a model a text-only job named

    def source_queues(self) -> list[str]:
        # Text-only jobs last: new audio first, a re-classification is backfill.
        return [self.settings.host_queue, QUEUE_TRANSCRIBE, QUEUE_CLASSIFY]

    def setup(self) -> None:
        self.metrics.watch_scratch(self.settings.scratch_root)
        started = time.monotonic()
        self.transcriber = load_transcriber(self.settings.models_root, self.asr_settings)
        self.metrics.model_loaded(self.transcriber.model_name, time.monotonic() - started)
        started = time.monotonic()
        self.classifier = load_classifier(self.settings.models_root, self.classifier_settings)
        self.metrics.model_loaded(self.classifier.model_name, time.monotonic() - started)
        if self.prefetch is None:
            self.look_ahead = self.transcriber.device == "cuda"
        else:
            self.look_ahead = self.prefetch
        log_event(
            self.log,
            "gpu.models_loaded",
            asr=self.transcriber.model_name,
            asr_backend=self.transcriber.backend,
            classifier=self.classifier.model_name,
            batch_size=self.batch_size,
            prefetch=self.look_ahead,
        )
        self._check_policies_at_start()

    @property
    def s3(self) -> Any:
        with self._s3_lock:
            if self._s3 is None:
                self._s3 = s3_utils.get_s3_client(self.settings)
            return self._s3

    # -- the batch -------------------------------------------------------------------

    def prepare_batch(self, jobs: list[Job]) -> _Prepared:
        """Find every file (downloading it if need be) and decode the claim."""
        assert self.transcriber is not None, "setup() loads the models"
        prepared = _Prepared()
        for job in jobs:
            self.alive()  # a download each (a no-op in the look-ahead's thread)
            if text_jobs.is_text_only(job):
                try:
                    prepared.texts.append(self._resolve_text(job))
                except Exception as exc:  # reported for this job only
                    prepared.outcomes[job.raw] = exc
                continue
            try:
                item = self._resolve(job)
            except Exception as exc:  # reported for this job only
                prepared.outcomes[job.raw] = exc
                continue
            if item is None:  # already done: a redelivery
                prepared.outcomes[job.raw] = None
            else:
                prepared.work.append(item)
        if not prepared.work:
            return prepared
        try:
            prepared.audio = self.transcriber.prepare([w.path for w in prepared.work])
        except AudioDecodeError as exc:
            # Set the undecodable files aside; the rest are decoded again, as one claim.
            prepared.undecodable = [
                (w, f"undecodable audio: {exc.failures[w.path]}")
                for w in prepared.work
                if w.path in exc.failures
            ]
            prepared.work = [w for w in prepared.work if w.path not in exc.failures]
            if prepared.work:
                prepared.audio = self.transcriber.prepare([w.path for w in prepared.work])
        return prepared

    def discard_prepared(self, jobs: list[Job], prepared: _Prepared) -> None:
        """A handed-back claim: its downloads go; files unpacked here stay for the next try."""
        for w in [*prepared.work, *(w for w, _ in prepared.undecodable)]:
            if w.fetched:
                w.path.unlink(missing_ok=True)

    def process_batch(
        self, jobs: list[Job], prepared: _Prepared | None = None
    ) -> dict[str, BaseException | None]:
        assert prepared is not None, "the worker loop runs prepare_batch first"
        outcomes = dict(prepared.outcomes)
        for w, reason in prepared.undecodable:
            outcomes[w.job.raw] = self._fail_file(w, reason)
        if prepared.work:
            assert prepared.audio is not None
            outcomes.update(self._transcribe_and_store(prepared.work, prepared.audio))
        if prepared.texts:
            outcomes.update(self._reclassify_and_store(prepared.texts))
        return outcomes

    def _transcribe_and_store(
        self, work: list[_Work], audio: PreparedAudio
    ) -> dict[str, BaseException | None]:
        assert self.transcriber is not None, "setup() loads the models"
        assert self.classifier is not None, "setup() loads the models"
        outcomes: dict[str, BaseException | None] = {}
        with self.db.connection() as conn:
            records.mark_transcribing(conn, [w.row.id for w in work], self.settings.worker_host)
        # alive(): the watchdog's pings from the main thread, between the long steps
        self.alive()
        started = time.monotonic()
        transcripts = self.transcriber.transcribe_prepared(audio)
        self.metrics.transcribed(
            files=len(transcripts),
            audio_s=sum(t.audio_seconds for t in transcripts),
            asr_s=time.monotonic() - started,
        )
        self.alive()
        with self.db.connection() as conn:
            policies = active_policies(conn)
        self._note_policies(len(policies), len(work))
        items = [
            ClassifyItem(
                key=w.row.id,
                text=t.text,
                segments=[TextSegment(s.start, s.end, s.text) for s in t.segments],
            )
            for w, t in zip(work, transcripts, strict=True)
        ]
        started = time.monotonic()
        verdicts = self.classifier.classify(items, policies) if policies else []
        self.metrics.classifier_seconds.inc(time.monotonic() - started)
        self.alive()
        by_audio: dict[int, list[Any]] = {}
        for v in verdicts:
            by_audio.setdefault(v.key, []).append(v)
        results = [
            records.FileResult(w.row.id, t, by_audio.get(w.row.id, []))
            for w, t in zip(work, transcripts, strict=True)
        ]
        with self.db.connection() as conn:
            finished = records.save_results(conn, results)
        for w, r in zip(work, results, strict=True):
            outcomes[w.job.raw] = None
            flagged = sum(v.label for v in r.verdicts)
            log_event(
                self.log,
                "gpu.file_done",
                audio_id=w.row.id,
                batch_id=w.row.batch_id,
                audio_s=r.transcript.audio_seconds,
                words=len(r.transcript.text.split()),
                policies=len(r.verdicts),
                flagged=flagged,
            )
            self._delete_local(w)
        self._clean_finished(finished)
        return outcomes

    # -- text-only jobs: stored transcripts judged again, no ASR ---------------------

    def _resolve_text(self, job: Job) -> _TextWork:
        spec = text_jobs.parse(job.payload)
        with self.db.connection() as conn:
            transcript = reclassify_records.stored_transcript(conn, spec.audio_id)
            policy = policy_by_id(conn, spec.policy_id)
        if transcript is None:
            raise PermanentJobError(
                f"text-only job: file {spec.audio_id} has no stored transcript (or no row); "
                "only transcribed files can be re-classified"
            )
        if policy is None:
            raise PermanentJobError(f"text-only job: no policy version with id {spec.policy_id}")
        return _TextWork(job, spec, transcript, policy)

    def _classifier_for(self, model: str) -> Classifier:
        """The classifier that judges as ``model``: the loaded one, the lexicon, or
        another CoPE-A model from MODELS_ROOT (loaded once, kept until another)."""
        assert self.classifier is not None, "setup() loads the models"
        if model == self.classifier.model_name:
            return self.classifier
        if model == LEXICON_MODEL:
            return LexiconClassifier(self.classifier_settings.threshold)
        other = self._other_classifier
        if other is not None and other.model_name == model:
            return other
        self._other_classifier = None  # free the previous one before loading the next
        settings = replace(self.classifier_settings, backend=ClassifierBackend.COPE_A, model=model)
        try:
            loaded = load_classifier(self.settings.models_root, settings)
        except (ConfigError, ImportError, OSError, ValueError) as exc:
            raise PermanentJobError(
                f"text-only job: classifier model {model!r} cannot be loaded on host "
                f"{self.settings.worker_host}: {type(exc).__name__}: {exc}"
            ) from exc
        log_event(self.log, "gpu.classifier_loaded", classifier=model, reason="text-only job")
        self._other_classifier = loaded
        return loaded

    def _reclassify_and_store(self, texts: list[_TextWork]) -> dict[str, BaseException | None]:
        outcomes: dict[str, BaseException | None] = {}
        groups: dict[tuple[str, int], list[_TextWork]] = {}
        for t in texts:
            groups.setdefault((t.spec.model, t.policy.id), []).append(t)
        verdicts: list[Verdict] = []
        judged: list[_TextWork] = []
        started = time.monotonic()
        for (model, _), group in groups.items():
            try:
                classifier = self._classifier_for(model)
            except PermanentJobError as exc:
                outcomes.update({t.job.raw: exc for t in group})
                continue
            items = [
                ClassifyItem(
                    key=t.spec.audio_id, text=t.transcript.text, segments=t.transcript.segments
                )
                for t in group
            ]
            verdicts += classifier.classify(items, [group[0].policy])
            judged += group
            self.alive()
        self.metrics.classifier_seconds.inc(time.monotonic() - started)
        if not judged:
            return outcomes
        with self.db.connection() as conn:
            reclassify_records.save_verdicts(
                conn, verdicts, [(t.spec.run_id, t.spec.audio_id) for t in judged]
            )
        by_key = {(v.key, v.policy_id, v.model): v for v in verdicts}
        for t in judged:
            outcomes[t.job.raw] = None
            v = by_key.get((t.spec.audio_id, t.policy.id, t.spec.model))
            log_event(
                self.log,
                "gpu.reclassified",
                run_id=t.spec.run_id,
                audio_id=t.spec.audio_id,
                batch_id=t.transcript.batch_id,
                policy=t.policy.name,
                policy_version=t.policy.version,
                model=t.spec.model,
                score=None if v is None else v.score,
                flagged=None if v is None else v.label,
            )
        return outcomes

    def _text_job_failed(self, job: Job, error: BaseException) -> None:
        """A dead-lettered text-only job: its run file failed; the audio file, its
        transcript and its batch are left exactly as they were."""
        run_id, audio_id = job.payload.get("run_id"), job.payload.get("audio_id")
        reason = self._failure_reason(job, error)
        marked = False
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (run_id, audio_id)):
            with self.db.connection() as conn:
                marked = reclassify_records.fail_file(conn, run_id, audio_id, reason)
        log_event(
            self.log,
            "gpu.reclassify_failed",
            level=logging.WARNING,
            run_id=run_id,
            audio_id=audio_id,
            run_file_marked=marked,
            error=reason,
        )

    # -- no active policy ------------------------------------------------------------

    def _check_policies_at_start(self) -> None:
        try:
            with self.db.connection() as conn:
                count = len(active_policies(conn))
        except Exception as exc:  # the claims will meet the same outage and retry
            log_event(self.log, "gpu.policy_check_failed", level=logging.WARNING, error=str(exc))
            return
        if count == 0:
            self._policy_missing = True
            log_event(
                self.log,
                "gpu.no_active_policy",
                level=logging.WARNING,
                phase="start",
                detail=NO_POLICY_HINT,
            )
        else:
            log_event(self.log, "gpu.policies_active", policies=count)

    def _note_policies(self, count: int, files: int) -> None:
        """Warn while claims are stored without a verdict (rate-limited); say when it ends."""
        if count:
            if self._policy_missing:
                log_event(
                    self.log,
                    "gpu.policies_active",
                    policies=count,
                    files_without_verdict=self._files_without_verdict,
                )
                self._policy_missing = False
                self._no_policy_warned_at = None
                self._files_without_verdict = 0
            return
        self._policy_missing = True
        self._files_without_verdict += files
        now = time.monotonic()
        last = self._no_policy_warned_at
        if last is None or now - last >= NO_POLICY_WARN_INTERVAL_S:
            log_event(
                self.log,
                "gpu.no_active_policy",
                level=logging.WARNING,
                phase="claim",
                files_without_verdict=self._files_without_verdict,
                detail=NO_POLICY_HINT,
            )
            self._no_policy_warned_at = now
            self._files_without_verdict = 0

    # -- finding the file ------------------------------------------------------------

    def _resolve(self, job: Job) -> _Work | None:
        require_fields(job.payload, PAYLOAD_FIELDS)
        audio_id: int = job.payload["audio_id"]
        opus_path: str = job.payload["opus_path"]
        if not opus_path.strip():
            raise PermanentJobError("invalid job payload: 'opus_path' is empty")
        with self.db.connection() as conn:
            row = records.audio_by_id(conn, audio_id)
            if row is None or row.opus_path not in (None, opus_path):
                row = records.audio_by_opus_path(conn, opus_path)
            if row is None:
                row = records.register_adhoc(conn, opus_path, self.settings.worker_host)
                log_event(
                    self.log,
                    "gpu.registered_adhoc",
                    audio_id=audio_id,
                    registered_audio_id=row.id,
                    opus_path=opus_path,
                )
        if row.status == "done" and row.has_transcript:
            log_event(self.log, "gpu.already_done", audio_id=row.id, batch_id=row.batch_id)
            self._delete_local_path(Path(opus_path), fetched=False)
            return None
        local = Path(opus_path)
        if local.is_file():
            return _Work(job, row, local, fetched=False)
        if not row.opus_s3_key:
            raise self._fail_row(
                row,
                f"{opus_path} is not on host {self.settings.worker_host} and no S3 copy "
                "is recorded for it (audio_files.opus_s3_key is empty)",
            )
        return _Work(job, row, self._fetch(row), fetched=True)

    def _fetch(self, row: records.AudioRow) -> Path:
        assert row.opus_s3_key is not None
        target = self.settings.batch_scratch(row.batch_id) / FETCHED_DIR / f"{row.id}.opus"
        try:
            s3_utils.download_file(self.s3, self.settings.s3_bucket, row.opus_s3_key, target)
        except ClientError as exc:
            if s3_utils.is_not_found(exc):
                raise self._fail_row(
                    row,
                    f"{row.opus_path} is not on host {self.settings.worker_host} and "
                    f"s3://{self.settings.s3_bucket}/{row.opus_s3_key} does not exist",
                ) from exc
            raise  # transient: the queue retries
        except s3_utils.IntegrityError as exc:
            raise self._fail_row(row, str(exc)) from exc
        log_event(self.log, "gpu.fetched", audio_id=row.id, s3_key=row.opus_s3_key)
        return target

    # -- dead letters ----------------------------------------------------------------

    def on_job_failed(self, job: Job, error: BaseException) -> None:
        """The job is dead-lettered: its file ends failed with the error, for good
        (a text-only job's run file only: see _text_job_failed)."""
        if text_jobs.is_text_only(job):
            self._text_job_failed(job, error)
            return
        audio_id, opus_path = job.payload.get("audio_id"), job.payload.get("opus_path")
        if isinstance(audio_id, bool) or not isinstance(audio_id, int):
            return  # a payload naming no file: the dead letter is all there is
        if not isinstance(opus_path, str):
            opus_path = ""
        reason = self._failure_reason(job, error)
        with self.db.connection() as conn:
            row, finished = records.fail_job(conn, audio_id, opus_path, reason)
        if row is None:
            return
        fetched = self.settings.batch_scratch(row.batch_id) / FETCHED_DIR / f"{row.id}.opus"
        fetched.unlink(missing_ok=True)
        if opus_path:
            self._delete_local_path(Path(opus_path), fetched=False)
        owner = job.payload.get("host")
        if isinstance(owner, str) and owner and owner != self.settings.worker_host:
            # Scratch is local: the file's host cleans its own when it comes back.
            log_event(
                self.log,
                "gpu.scratch_elsewhere",
                level=logging.WARNING,
                audio_id=row.id,
                batch_id=row.batch_id,
                host=owner,
            )
        log_event(
            self.log,
            "gpu.file_failed",
            level=logging.WARNING,
            audio_id=row.id,
            batch_id=row.batch_id,
            error=reason,
        )
        self._clean_finished(finished)

    @staticmethod
    def _failure_reason(job: Job, error: BaseException) -> str:
        if isinstance(error, ReapedDeadLetterError):
            return str(error)  # the dead letter's own words
        if isinstance(error, PermanentJobError):
            return f"{type(error).__name__}: {error}"
        return f"gave up after {job.attempts + 1} attempts: {type(error).__name__}: {error}"

    def _fail_row(self, row: records.AudioRow, reason: str) -> PermanentJobError:
        with self.db.connection() as conn:
            finished = records.mark_failed(conn, row.id, reason)
        self._clean_finished(finished)
        return PermanentJobError(reason)

    def _fail_file(self, w: _Work, reason: str) -> PermanentJobError:
        error = self._fail_row(w.row, reason)
        self._delete_local(w)
        return error

    # -- cleanup ---------------------------------------------------------------------

    def _delete_local(self, w: _Work) -> None:
        self._delete_local_path(w.path, fetched=w.fetched)

    def _delete_local_path(self, path: Path, *, fetched: bool) -> None:
        """Delete an Opus we own: one we fetched, or one under SCRATCH_ROOT."""
        try:
            ours = fetched or path.resolve().is_relative_to(self.settings.scratch_root.resolve())
            if ours:
                path.unlink(missing_ok=True)
        except OSError as exc:
            log_event(
                self.log, "gpu.delete_failed", level=logging.WARNING, path=str(path), error=str(exc)
            )

    def _clean_finished(self, batch_ids: list[str]) -> None:
        for batch_id in batch_ids:
            s3_utils.cleanup_scratch(batch_id, self.settings)
            log_event(self.log, "gpu.batch_done", batch_id=batch_id)


def main() -> int:
    return run_worker(GpuWorker)


if __name__ == "__main__":
    sys.exit(main())
