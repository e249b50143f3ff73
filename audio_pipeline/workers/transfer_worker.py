"""Transfer worker: collection host (SSH) -> S3 archives/{batch_id}.tar -> queue:unpack.

A polling service (runtime/service.py): it scans a remote directory instead of
claiming from a queue, and shares the process service of every worker: logs,
heartbeats, two-stage SIGTERM (a second one, or the stop grace running out,
abandons the copy in hand, which resumes on the next run), systemd's watchdog (each
chunk copied reports progress) and the --once / --drain modes (--once: copy at most one
archive; --drain: copy every complete archive, then exit).

Each archive goes through steps that are each safe to repeat, so a crash at any
point resumes where it stopped and never enqueues a batch twice:

1. ``begin_transfer``: a batches row in 'transferring' (refused if the batch is
   already known: a file re-dropped under an old name is put aside, not copied).
2. Resumable SFTP copy into SCRATCH_ROOT/transfer/{batch_id}.tar.part, checked
   against the remote size and, where the host has sha256sum, its SHA-256.
3. Upload to S3 with the SHA-256 check (skipped when the same bytes are there).
4. ``mark_transferred`` (transferred_at set: the copy is final).
5. Enqueue once: one Lua call sets ``transfer:enqueued:{batch_id}`` NX and RPUSHes
   the job only if it was not set. Reconciled at start for every 'transferred'
   batch, in case a crash fell between steps 4 and 5.
6. Put the remote file aside (moved into a subdirectory, or marked), then delete
   the local copy.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import botocore.exceptions

from audio_pipeline import s3_utils
from audio_pipeline.batch_ids import BATCH_ID_RULE, is_valid_batch_id
from audio_pipeline.config import QUEUE_UNPACK, EnvReader, EnvSettings, Settings
from audio_pipeline.logs import log_event
from audio_pipeline.queue import jittered_backoff_s, stamped
from audio_pipeline.records import batches
from audio_pipeline.runtime.command import run_worker
from audio_pipeline.runtime.outage import backend_unavailable
from audio_pipeline.runtime.service import InHand, RunMode, Service
from audio_pipeline.ssh_source import CONNECTION_ERRORS, CollectionHost, RemoteFile, SshSettings

ARCHIVE_SUFFIX = ".tar"
DONE_MARKER_SUFFIX = ".done"  # marker mode: b1.tar is complete once b1.tar.done exists
TRANSFERRED_SUFFIX = ".transferred"  # mark mode: b1.tar.transferred says "copied"
ENQUEUED_KEY = "transfer:enqueued:{batch_id}"
ENQUEUED_TTL_S = 90 * 24 * 3600  # far longer than any crash-and-restart window

DEFAULT_STABLE_S = 30.0  # a size unchanged this long means the upload finished
DEFAULT_POLL_S = 15.0  # between scans of an idle collection dir
SETTLE_POLL_S = 1.0  # between scans while an archive is settling
DEFAULT_PROGRESS_EVERY_S = 10.0  # progress lines during a long copy
DEFAULT_MAX_FAILURES = 5  # consecutive failed tries of one archive before giving up
DEFAULT_RETRY_BASE_S = 30.0  # first wait after a failed try; doubles, capped at 15 min
FAILURE_BACKOFF_CAP_S = 900.0

# Enqueue exactly once: the marker and the push happen together or not at all.
_ENQUEUE_ONCE_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[3]) then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


class Completeness(StrEnum):
    STABLE = "stable"  # size and mtime unchanged for TRANSFER_STABLE_S
    MARKER = "marker"  # a {name}.tar.done file exists beside the archive


class AfterTransfer(StrEnum):
    MOVE = "move"  # into TRANSFER_DONE_SUBDIR of the collection dir
    MARK = "mark"  # leave it, write {name}.tar.transferred beside it


@dataclass(frozen=True)
class TransferSettings(EnvSettings):
    completeness: Completeness
    stable_s: float
    after: AfterTransfer
    done_subdir: str
    poll_s: float
    progress_every_s: float
    max_failures: int
    retry_base_s: float
    verify_remote_sha256: bool

    collection: SshSettings

    @classmethod
    def read(cls, env: EnvReader) -> TransferSettings:
        done_subdir = env.str("TRANSFER_DONE_SUBDIR", "transferred")
        if "/" in done_subdir or done_subdir in {".", ".."}:
            env.error(f"TRANSFER_DONE_SUBDIR={done_subdir!r} must be a plain directory name")
        return cls(
            completeness=env.choice("TRANSFER_COMPLETENESS", Completeness, Completeness.STABLE),
            stable_s=env.seconds("TRANSFER_STABLE_S", DEFAULT_STABLE_S, allow_zero=True),
            after=env.choice("TRANSFER_AFTER", AfterTransfer, AfterTransfer.MOVE),
            done_subdir=done_subdir,
            poll_s=env.seconds("TRANSFER_POLL_S", DEFAULT_POLL_S, allow_zero=True),
            progress_every_s=env.seconds(
                "TRANSFER_PROGRESS_S", DEFAULT_PROGRESS_EVERY_S, allow_zero=True
            ),
            max_failures=env.int("TRANSFER_MAX_FAILURES", DEFAULT_MAX_FAILURES, minimum=0),
            retry_base_s=env.seconds(
                "TRANSFER_RETRY_BASE_S", DEFAULT_RETRY_BASE_S, allow_zero=True
            ),
            verify_remote_sha256=env.bool("TRANSFER_VERIFY_REMOTE_SHA256", True),
            collection=SshSettings.read(env),
        )


class TransferIntegrityError(RuntimeError):
    """The local copy does not match the remote file (size or SHA-256)."""


@dataclass
class _Seen:
    size: int
    mtime: int
    since: float  # monotonic time the current size was first seen


@dataclass
class _Failures:
    count: int
    retry_at: float


class TransferWorker(Service):
    """Copies complete archives from the collection host to S3 and queues them."""

    stage = "transfer"
    stage_settings_class = TransferSettings

    def __init__(self, settings: Settings | None = None, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.transfer: TransferSettings = self.stage_settings
        self.host = CollectionHost(self.transfer.collection)
        self.staging = self.settings.scratch_root / "transfer"
        self.s3 = s3_utils.get_s3_client(self.settings)
        self._enqueue_once = self.redis.register_script(_ENQUEUE_ONCE_LUA)
        self._seen: dict[str, _Seen] = {}
        self._failures: dict[str, _Failures] = {}
        self._reported_bad: set[str] = set()
        self._pending = 0  # archives seen in the last scan that are still to copy
        self._current = ""  # batch_id being copied, for heartbeats and `status`

    def in_hand(self) -> InHand:
        current = self._current
        return InHand(ids=current, excerpt=current, count=1 if current else 0)

    def setup(self) -> None:
        self.staging.mkdir(parents=True, exist_ok=True)
        self._reconcile()

    def teardown(self) -> None:
        self.host.close()

    # -- the polling loop -----------------------------------------------------------

    def iterate(self) -> bool:
        """One scan of the collection dir, and one archive copied if one is ready."""
        try:
            ready, pending = self._scan()
        except CONNECTION_ERRORS as exc:
            log_event(
                self.log,
                "transfer.scan_failed",
                level=logging.ERROR,
                host=self.host.label,
                error=f"{type(exc).__name__}: {exc}",
            )
            self.host.close()
            if self.mode is not RunMode.FOREVER:
                # An operator's --once/--drain must not report success it did not have.
                self.exit_code = 1
                self.request_stop()
            else:
                self.sleep(self.transfer.poll_s or SETTLE_POLL_S)
            return False
        self._pending = pending
        if ready is None:
            if pending:
                self.sleep(min(SETTLE_POLL_S, self.transfer.stable_s or SETTLE_POLL_S))
            elif self.mode is RunMode.FOREVER:
                self.sleep(self.transfer.poll_s)
            return False
        self._transfer_one(ready)
        return True

    def drained(self) -> bool:
        """True when the last scan found no archive still to copy."""
        return self._pending == 0

    def _scan(self) -> tuple[RemoteFile | None, int]:
        """(the oldest archive ready to copy or None, how many still wait)."""
        files = self.host.list_files()
        now = time.monotonic()
        ready: list[RemoteFile] = []
        pending = 0
        for name, info in sorted(files.items(), key=lambda kv: (kv[1].mtime, kv[0])):
            if not name.endswith(ARCHIVE_SUFFIX):
                continue
            if name + TRANSFERRED_SUFFIX in files:
                continue  # mark mode: already copied
            batch_id = name[: -len(ARCHIVE_SUFFIX)]
            if not is_valid_batch_id(batch_id):
                self._report_bad_name(name)
                continue
            failure = self._failures.get(name)
            if failure and failure.count >= self.transfer.max_failures:
                continue  # given up in this process; a restart tries again
            marker_missing = (
                self.transfer.completeness is Completeness.MARKER
                and name + DONE_MARKER_SUFFIX not in files
            )
            if marker_missing:
                continue  # not pending: the uploader may never have finished
            pending += 1
            if failure and now < failure.retry_at:
                continue
            if self._is_complete(info, files, now):
                ready.append(info)
        for gone in set(self._seen) - set(files):
            del self._seen[gone]
        return (ready[0] if ready else None), pending

    def _is_complete(self, info: RemoteFile, files: dict[str, RemoteFile], now: float) -> bool:
        if self.transfer.completeness is Completeness.MARKER:
            return info.name + DONE_MARKER_SUFFIX in files
        seen = self._seen.get(info.name)
        if seen is None or (seen.size, seen.mtime) != (info.size, info.mtime):
            self._seen[info.name] = _Seen(info.size, info.mtime, now)
            return self.transfer.stable_s == 0
        return now - seen.since >= self.transfer.stable_s

    def _report_bad_name(self, name: str) -> None:
        if name in self._reported_bad:
            return
        self._reported_bad.add(name)
        log_event(
            self.log,
            "transfer.bad_name",
            level=logging.ERROR,
            host=self.host.label,
            file=name,
            error=f"archive name is not a valid batch_id ({BATCH_ID_RULE}): "
            "skipped, never transferred",
        )

    # -- one archive --------------------------------------------------------------

    def _transfer_one(self, info: RemoteFile) -> None:
        batch_id = info.name[: -len(ARCHIVE_SUFFIX)]
        started = time.monotonic()
        self._current = batch_id
        # An archive is this stage's job: counted like a queue worker's claims, so one
        # dashboard reads every stage the same way.
        self.metrics.claimed.inc()
        try:
            with self.interruptible():  # every step is safe to repeat: a later run resumes
                self._copy_and_publish(info, batch_id)
        except InterruptedError as exc:
            self.metrics.handed_back.inc()
            log_event(
                self.log,
                "transfer.paused",
                level=logging.WARNING,
                batch_id=batch_id,
                reason=str(exc),
            )
        except Exception as exc:  # reported; the worker goes on with other archives
            if backend_unavailable(exc) is not None:
                raise  # not this archive's fault: the service waits for the backend
            self._record_failure(info.name, batch_id, exc)
        else:
            self._failures.pop(info.name, None)
            self._seen.pop(info.name, None)
            self.metrics.done.inc()
            self.log_stage_event(
                "job.done",
                batch_id=batch_id,
                bytes=info.size,
                duration_s=time.monotonic() - started,
            )
        finally:
            self._current = ""
            self.metrics.duration.observe(time.monotonic() - started)

    def _copy_and_publish(self, info: RemoteFile, batch_id: str) -> None:
        s3_key = s3_utils.archive_key(batch_id)
        with self.db.connection() as conn:
            state = batches.transfer_state(conn, batch_id)
            if state is not None and state["transferred_at"] is not None:
                # Copied before: a crash fell before the remote was put aside, or the
                # same name was dropped again. Never copy twice; finish the bookkeeping.
                self._enqueue(batch_id, s3_key, state["transferred_at"])
                self._put_aside_uncopied(
                    info, batch_id, "transfer.already_done", logging.WARNING, status=state["status"]
                )
                return
            started = batches.begin_transfer(
                conn,
                batch_id,
                s3_key,
                self.host.settings.host,
                self.host.path(info.name),
                info.size,
            )
        if not started:
            self._put_aside_uncopied(
                info,
                batch_id,
                "transfer.duplicate",
                logging.ERROR,
                error="batch already known in another state "
                "(injected by hand?): put aside, not transferred",
            )
            return

        self.log_stage_event("job.started", batch_id=batch_id, bytes=info.size)
        local = self.staging / f"{batch_id}{ARCHIVE_SUFFIX}.part"
        sha256 = self._copy(info, batch_id, local)
        self.alive()  # systemd's watchdog: the copy and its checks are done
        self._upload(local, batch_id, s3_key, sha256)
        self.metrics.bytes_transferred.inc(local.stat().st_size)
        self.alive()
        with self.db.connection() as conn:
            batches.mark_transferred(conn, batch_id, local.stat().st_size, sha256)
            state = batches.transfer_state(conn, batch_id)
        assert state is not None
        self._enqueue(batch_id, s3_key, state["transferred_at"])
        self._put_aside(info.name)
        local.unlink(missing_ok=True)

    def _copy(self, info: RemoteFile, batch_id: str, local: Path) -> str:
        log_progress = _ProgressLog(self.log, batch_id, self.transfer.progress_every_s)

        def progress(done: int, total: int) -> None:
            self.alive()  # systemd's watchdog: each chunk copied proves the copy is not hung
            log_progress(done, total)

        resumed_at = self.host.download(
            info.name, local, progress=progress, should_stop=lambda: self.stop_forced
        )
        if resumed_at:
            log_event(self.log, "transfer.resumed", batch_id=batch_id, from_bytes=resumed_at)
        size = local.stat().st_size
        if size != info.size:
            raise TransferIntegrityError(
                f"{info.name}: copied {size} bytes, remote has {info.size}"
            )
        sha256 = s3_utils.sha256_file(local)
        self.alive()
        if self.transfer.verify_remote_sha256:
            remote_sha = self.host.sha256(info.name)
            if remote_sha is None:
                log_event(
                    self.log,
                    "transfer.no_remote_sha256",
                    level=logging.WARNING,
                    batch_id=batch_id,
                    host=self.host.label,
                )
            elif remote_sha != sha256:
                local.unlink(missing_ok=True)  # a bad partial: start over next time
                raise TransferIntegrityError(
                    f"{info.name}: SHA-256 of the copy {sha256} differs from the remote "
                    f"{remote_sha}; the copy was discarded"
                )
        return sha256

    def _upload(self, local: Path, batch_id: str, s3_key: str, sha256: str) -> None:
        bucket = self.settings.s3_bucket
        try:
            head = self.s3.head_object(Bucket=bucket, Key=s3_key)
            stored = head.get("Metadata", {}).get(s3_utils.SHA256_METADATA_KEY)
            if stored == sha256 and head["ContentLength"] == local.stat().st_size:
                log_event(
                    self.log,
                    "transfer.upload_skipped",
                    batch_id=batch_id,
                    reason="identical object already in S3",
                )
                return
        except botocore.exceptions.ClientError:
            pass  # not there yet
        s3_utils.upload_file(self.s3, bucket, local, s3_key, sha256=sha256)
        log_event(self.log, "transfer.uploaded", batch_id=batch_id, s3_key=s3_key, sha256=sha256)

    def _enqueue(self, batch_id: str, s3_key: str, transferred_at: datetime | None) -> bool:
        when = (transferred_at or datetime.now(UTC)).astimezone(UTC)
        payload = {
            "batch_id": batch_id,
            "s3_key": s3_key,
            "file_count": None,
            "transferred_at": when.isoformat(),
        }
        pushed = bool(
            self._enqueue_once(
                keys=[ENQUEUED_KEY.format(batch_id=batch_id), QUEUE_UNPACK],
                args=[self.worker_id, json.dumps(stamped(payload)), ENQUEUED_TTL_S],
            )
        )
        log_event(
            self.log,
            "transfer.enqueued" if pushed else "transfer.already_enqueued",
            batch_id=batch_id,
            queue=QUEUE_UNPACK,
        )
        return pushed

    def _put_aside_uncopied(
        self, info: RemoteFile, batch_id: str, event: str, level: int, **why: Any
    ) -> None:
        """Log ``event`` and put the archive aside without copying it now."""
        log_event(self.log, event, level=level, batch_id=batch_id, file=info.name, **why)
        self._put_aside(info.name)

    def _put_aside(self, name: str) -> None:
        if self.transfer.after is AfterTransfer.MOVE:
            self.host.move_into(name, self.transfer.done_subdir)
            if self.host.exists(name + DONE_MARKER_SUFFIX):
                self.host.move_into(name + DONE_MARKER_SUFFIX, self.transfer.done_subdir)
        else:
            self.host.touch(name + TRANSFERRED_SUFFIX)

    def _record_failure(self, name: str, batch_id: str, exc: Exception) -> None:
        previous = self._failures.get(name)
        count = (previous.count if previous else 0) + 1
        # Jittered like the queue's retries: archives that failed together (one
        # collection-host outage) are not all retried in the same scan again.
        delay = jittered_backoff_s(self.transfer.retry_base_s, FAILURE_BACKOFF_CAP_S, count - 1)
        self._failures[name] = _Failures(count, time.monotonic() + delay)
        error = f"{type(exc).__name__}: {exc}"
        gave_up = count >= self.transfer.max_failures
        (self.metrics.dead_lettered if gave_up else self.metrics.retried).inc()
        self.log_stage_event(
            "job.failed" if gave_up else "job.retry",
            level=logging.ERROR,
            batch_id=batch_id,
            attempt=count,
            delay_s=delay,
            error=error,
        )
        if gave_up:
            try:
                with self.db.connection() as conn:
                    batches.mark_transfer_failed(conn, batch_id, error)
            except Exception as db_exc:  # the log line above already carries the reason
                log_event(self.log, "transfer.db_error", level=logging.ERROR, error=str(db_exc))
        if isinstance(exc, CONNECTION_ERRORS):
            self.host.close()  # reconnect on the next scan

    # -- start-up reconciliation ----------------------------------------------------

    def _reconcile(self) -> None:
        """Finish what a crash interrupted: enqueue copied batches, drop stale copies."""
        with self.db.connection() as conn:
            for row in batches.transferred_batches(conn):
                self._enqueue(row["batch_id"], row["s3_key"], row["transferred_at"])
            for part in self.staging.glob(f"*{ARCHIVE_SUFFIX}.part"):
                batch_id = part.name[: -len(ARCHIVE_SUFFIX + ".part")]
                state = batches.transfer_state(conn, batch_id)
                if state is not None and state["transferred_at"] is not None:
                    part.unlink(missing_ok=True)


class _ProgressLog:
    """Logs bytes, percent, rate and ETA at most every ``every_s`` seconds."""

    def __init__(self, log: logging.Logger, batch_id: str, every_s: float) -> None:
        self.log = log
        self.batch_id = batch_id
        self.every_s = every_s
        self.started = time.monotonic()
        self.last = self.started
        self.first_bytes: int | None = None

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.first_bytes is None:
            self.first_bytes = done
        if now - self.last < self.every_s or done >= total:
            return
        self.last = now
        rate = (done - self.first_bytes) / max(now - self.started, 1e-6)
        eta = (total - done) / rate if rate > 0 else None
        log_event(
            self.log,
            "transfer.progress",
            batch_id=self.batch_id,
            bytes=done,
            total=total,
            percent=round(100 * done / total, 1) if total else 100.0,
            mib_per_s=round(rate / 2**20, 2),
            eta_s=eta,
        )


def main() -> int:
    return run_worker(TransferWorker)


if __name__ == "__main__":
    sys.exit(main())
