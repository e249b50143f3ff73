"""The worker runtime every stage shares: loop, heartbeats, reaper, signals, modes.

A stage subclasses Worker, sets ``stage``, lists its ``source_queues()`` and
implements ``process(job)`` (or ``process_batch(jobs, prepared)`` with ``batch_size``
> 1). The loop reads as a sentence::

    while not stopping: promote due retries -> ready to claim? -> claim -> prepare
                        -> process -> ack / retry / dead letter

Look-ahead (``look_ahead = True``; the gpu worker's PREFETCH): once a claim is
prepared, the worker claims the next one at once, without waiting, and runs
``prepare_batch`` on it in a side thread while ``process_batch`` runs on this one, so
the model never waits for decoding or downloads. The look-ahead jobs sit in this
worker's processing lists like any claimed job (a crash loses nothing: the reaper
returns them); a stop hands them back to the head of their queues, in order,
unprocessed. ``prepare_batch`` must therefore only do work that is harmless to
redo or drop: read, download, decode; never a result write.

Shutdown is two-stage (like RQ's warm and cold stop): the first SIGTERM/SIGINT stops
claiming and lets the job in hand finish; a second one interrupts the handler, hands
the job back to the head of its queue and exits. Either way the exit code is 0 and
nothing is lost. A side thread keeps the heartbeat alive and runs the reaper.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from types import FrameType
from typing import Any

import redis
from psycopg_pool import ConnectionPool

from audio_pipeline.config import ConfigError, EnvReader, Settings, load_settings
from audio_pipeline.logs import configure_logging, log_event
from audio_pipeline.queue import Job, JobQueue, PermanentJobError, utc_now_iso
from audio_pipeline.redis_conn import get_redis

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL_S = 5.0  # between heartbeat refreshes
DEFAULT_HEARTBEAT_TTL_S = 30.0  # a worker silent this long is presumed dead and reaped
DEFAULT_REAPER_INTERVAL_S = 60.0  # between reaper runs (each also runs at start)
CLAIM_TIMEOUT_S = 1.0  # longest wait in one claim; bounds how late a stop is noticed
BACKPRESSURE_SLEEP_S = 2.0  # pause while ready_to_claim() says no
ERROR_BACKOFF_S = 5.0  # pause after Redis/Postgres trouble in the loop itself


class RunMode(StrEnum):
    FOREVER = "forever"  # a systemd service
    ONCE = "once"  # one claim (or one scan), then exit
    DRAIN = "drain"  # until the source queues and their pending retries are empty


class WorkerState(StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"


class LookAhead:
    """The next claim, prepared in a side thread while the current one is processed."""

    def __init__(self, jobs: list[Job], prepare: Callable[[list[Job]], Any], name: str) -> None:
        self.jobs = jobs
        self.prepared: Any = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        # A daemon thread, not an executor: a forced stop must not wait for a download.
        self._thread = threading.Thread(target=self._run, args=(prepare,), name=name, daemon=True)
        self._thread.start()

    def _run(self, prepare: Callable[[list[Job]], Any]) -> None:
        try:
            self.prepared = prepare(self.jobs)
        except BaseException as exc:  # handed to the main thread, which settles the jobs
            self.error = exc
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once prepare_batch has returned or raised."""
        return self._done.wait(timeout)


class ShutdownForced(BaseException):
    """Second stop signal: raised inside the handler to abandon the job in hand.

    A BaseException so a handler's ``except Exception`` cannot swallow it.
    """


def _env_seconds(name: str, default: float) -> float:
    env = EnvReader(os.environ, production=False)
    value = env.float(name, default, above=0)
    env.raise_if_errors()
    return value


class Worker:
    """Base class of the stage workers; see the module docstring for the contract."""

    stage: str = ""
    batch_size: int = 1
    look_ahead: bool = False  # claim and prepare the next batch while this one runs

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        mode: RunMode = RunMode.FOREVER,
        worker_id: str | None = None,
    ) -> None:
        """``worker_id`` defaults to ``{stage}:{host}:{pid}``; pass one only to run
        several workers in one process (tests), since ids must be unique."""
        if not self.stage:
            raise TypeError(f"{type(self).__name__} must set the class attribute 'stage'")
        self.settings = settings or load_settings()
        self.mode = RunMode(mode)
        self.worker_id = worker_id or f"{self.stage}:{self.settings.worker_host}:{os.getpid()}"
        self.log = logging.getLogger(f"audio_pipeline.workers.{self.stage}")
        self.redis: redis.Redis = get_redis(self.settings)
        self.queue = JobQueue(self.redis, self.worker_id, self.stage)
        self.heartbeat_interval_s = _env_seconds(
            "WORKER_HEARTBEAT_INTERVAL_S", DEFAULT_HEARTBEAT_INTERVAL_S
        )
        self.heartbeat_ttl_s = _env_seconds("WORKER_HEARTBEAT_TTL_S", DEFAULT_HEARTBEAT_TTL_S)
        self.reaper_interval_s = _env_seconds("WORKER_REAPER_INTERVAL_S", DEFAULT_REAPER_INTERVAL_S)
        self.stopping = False
        self.exit_code = 0  # a subclass sets 1 when --once/--drain could not do its work
        self.state = WorkerState.STARTING
        self._db: ConnectionPool | None = None
        self._db_lock = threading.Lock()  # a look-ahead thread may be the first to ask
        self._in_hand: list[Job] = []
        self._ahead: LookAhead | None = None
        self._interruptible = False  # True only while a handler runs
        self._force = False
        self._stop_beating = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self._started_at = utc_now_iso()

    # -- hooks for subclasses ------------------------------------------------------

    def source_queues(self) -> list[str]:
        raise NotImplementedError

    def process(self, job: Job) -> None:
        raise NotImplementedError

    def prepare_batch(self, jobs: list[Job]) -> Any:
        """Work for ``jobs`` that needs no result write (downloads, decoding).

        Its return value is handed to ``process_batch``. With ``look_ahead`` it runs
        in a side thread while the previous claim is processed, and its jobs may be
        handed back unprocessed on a stop (then ``discard_prepared`` is called), so it
        must be harmless to redo. An exception fails (retries) every job of the claim.
        """
        return None

    def discard_prepared(self, jobs: list[Job], prepared: Any) -> None:
        """Release what prepare_batch made for jobs handed back unprocessed."""

    def process_batch(
        self, jobs: list[Job], prepared: Any = None
    ) -> dict[str, BaseException | None]:
        """Default: one process() call per job; override to batch model calls.

        Returns each job's outcome keyed by ``job.raw``: None (done) or the error.
        """
        results: dict[str, BaseException | None] = {}
        for job in jobs:
            try:
                self.process(job)
                results[job.raw] = None
            except Exception as exc:  # reported per job; the batch goes on
                results[job.raw] = exc
        return results

    def ready_to_claim(self) -> bool:
        return True

    def on_job_failed(self, job: Job, error: BaseException) -> None:
        """Called once a job is dead-lettered (permanent error or retries used up),
        so a stage can record the failure where operators look (e.g. the batch row)."""

    def setup(self) -> None:
        """Load models and open what the handler needs, once per process."""

    def teardown(self) -> None:
        """Release what setup() took."""

    # -- resources -----------------------------------------------------------------

    @property
    def db(self) -> ConnectionPool:
        """The Postgres pool (dict rows), opened on first use."""
        with self._db_lock:
            if self._db is None:
                from audio_pipeline.db import pool

                self._db = pool(self.settings)
            return self._db

    # -- the loop ------------------------------------------------------------------

    def work(self) -> int:
        """Run until stopped (or until the mode says done); returns the exit code."""
        self._install_signal_handlers()
        self._start_heartbeat()
        try:
            self.queue.recover_own()
            self.queue.reap()
            self.setup()
            log_event(self.log, "worker.started", stage=self.stage, worker=self.worker_id,
                      mode=self.mode.value, queues=",".join(self.source_queues()))  # fmt: skip
            while not self.stopping:
                did_work = self.iterate()
                if self.mode is RunMode.ONCE and (did_work or self.drained()):
                    break
                if self.mode is RunMode.DRAIN and not did_work and self.drained():
                    break
            self._drop_look_ahead()
        except ShutdownForced:
            self._hand_back()
        finally:
            self.state = WorkerState.STOPPING
            self._shutdown()
        log_event(self.log, "worker.stopped", stage=self.stage, worker=self.worker_id,
                  exit_code=self.exit_code)  # fmt: skip
        return self.exit_code

    def iterate(self) -> bool:
        """One turn of the loop; True when a job was handled (or tried)."""
        ahead = self._ahead
        if ahead is not None:
            jobs = ahead.jobs
        else:
            if not self.ready_to_claim():
                self.state = WorkerState.IDLE
                self._sleep(BACKPRESSURE_SLEEP_S)
                return False
            jobs = self._claim()
            if not jobs:
                self.state = WorkerState.IDLE
                return False
        if self.stopping:  # the stop came while we were blocked in the claim
            if ahead is not None:
                self._drop_look_ahead()
            else:
                self._release(jobs)
            return False
        self._ahead = None
        self._in_hand = list(jobs)
        self._handle(jobs, ahead)
        if self.stopping:
            self.state = WorkerState.STOPPING
        return True

    def drained(self) -> bool:
        """True when nothing is left for this worker: queues empty, no pending retries."""
        queues = self.source_queues()
        if any(self.redis.llen(q) for q in queues):
            return False
        return self.queue.pending_retries(queues) == 0

    def _claim(self) -> list[Job]:
        try:
            jobs = self.queue.claim_many(self.source_queues(), self.batch_size, CLAIM_TIMEOUT_S)
        except redis.exceptions.ConnectionError as exc:
            log_event(self.log, "worker.redis_error", level=logging.ERROR, error=str(exc))
            self._sleep(ERROR_BACKOFF_S)
            return []
        return jobs

    def _handle(self, jobs: list[Job], ahead: LookAhead | None = None) -> None:
        """Prepare ``jobs`` (unless the look-ahead did), start on the next claim,
        process, settle."""
        self.state = WorkerState.BUSY
        for job in jobs:
            log_event(self.log, "job.started", **self._job_fields(job), attempt=job.attempts + 1)
        started = time.monotonic()
        self._interruptible = True
        try:
            if self._force:
                raise ShutdownForced
            prepared, error = self._prepared(jobs, ahead)
            self._start_look_ahead()
            if error is not None:  # the whole claim failed: each job carries the reason
                results: dict[str, BaseException | None] = {job.raw: error for job in jobs}
            else:
                results = self._run_handler(jobs, prepared)
        finally:
            self._interruptible = False
        duration = time.monotonic() - started
        for job in jobs:
            self._settle(job, results.get(job.raw, _missing_result(job)), duration)
        self._in_hand = []

    def _prepared(self, jobs: list[Job], ahead: LookAhead | None) -> tuple[Any, Exception | None]:
        if ahead is not None:
            ahead.wait()  # usually long done: it ran while the previous claim was processed
            if ahead.error is None:
                return ahead.prepared, None
            if isinstance(ahead.error, Exception):
                return None, ahead.error
            raise ahead.error  # KeyboardInterrupt and the like are not job failures
        try:
            return self.prepare_batch(jobs), None
        except Exception as exc:
            return None, exc

    def _run_handler(self, jobs: list[Job], prepared: Any) -> dict[str, BaseException | None]:
        try:
            return self.process_batch(jobs, prepared)
        except Exception as exc:  # the whole batch failed: each job carries the reason
            return {job.raw: exc for job in jobs}

    # -- look-ahead ------------------------------------------------------------------

    def _start_look_ahead(self) -> None:
        """Claim the next batch now, without waiting, and prepare it in a side thread."""
        if not self.look_ahead or self.mode is RunMode.ONCE or self.stopping:
            return
        if not self.ready_to_claim():
            return
        # Not interruptible: a forced stop between the move and the bookkeeping would
        # leave jobs in our processing list that only the reaper would give back.
        self._interruptible = False
        try:
            jobs = self.queue.claim_many(self.source_queues(), self.batch_size, 0)
        except redis.exceptions.ConnectionError as exc:
            # Not fatal: the loop claims again after this batch, and reports trouble there.
            log_event(self.log, "worker.redis_error", level=logging.ERROR, error=str(exc))
            jobs = []
        finally:
            self._interruptible = True
        if jobs:
            self._ahead = LookAhead(jobs, self.prepare_batch, name=f"prepare-{self.stage}")
            log_event(self.log, "worker.look_ahead", level=logging.DEBUG, stage=self.stage,
                      jobs=",".join(j.short_id for j in jobs))  # fmt: skip
        if self._force:  # a second stop came during the claim: hand back both claims
            raise ShutdownForced

    def _drop_look_ahead(self) -> None:
        """Hand the look-ahead back unprocessed (a stop): after its preparation ends,
        so nothing still works on jobs that someone else may claim, unless a second
        stop signal says not to wait."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        while not ahead.wait(0.2):
            if self._force:
                break
        else:
            if ahead.error is None:
                try:
                    self.discard_prepared(ahead.jobs, ahead.prepared)
                except Exception:  # the jobs still go back; leftovers are only disk space
                    self.log.exception("discard_prepared failed")
        self._release(ahead.jobs)

    def _settle(self, job: Job, error: BaseException | None, duration_s: float) -> None:
        fields = self._job_fields(job)
        if error is None:
            self.queue.ack(job)
            log_event(self.log, "job.done", **fields, duration_s=duration_s)
        elif isinstance(error, PermanentJobError):
            self.queue.dead_letter(job, f"{type(error).__name__}: {error}")
            self._final_failure(job, error)
        else:
            self.log.debug("job %s failed", job.short_id, exc_info=error)
            if not self.queue.retry(job, error):
                self._final_failure(job, error)

    def _final_failure(self, job: Job, error: BaseException) -> None:
        try:
            self.on_job_failed(job, error)
        except Exception:  # a failing hook must not stop the worker; the job is dead-lettered
            self.log.exception("on_job_failed hook failed for job %s", job.short_id)

    def _job_fields(self, job: Job) -> dict[str, Any]:
        fields: dict[str, Any] = {"stage": self.stage, "job": job.short_id, "queue": job.queue}
        for key in ("batch_id", "audio_id"):
            if key in job.payload:
                fields[key] = job.payload[key]
        return fields

    def _hand_back(self) -> None:
        """Return the jobs in hand and any look-ahead, without waiting for it."""
        ahead, self._ahead = self._ahead, None
        jobs = self._in_hand + (ahead.jobs if ahead is not None else [])
        self._in_hand = []
        self._release(jobs)

    def _release(self, jobs: list[Job]) -> None:
        # Each release pushes onto the head: last claimed first keeps the queue's order.
        for job in reversed(jobs):
            self.queue.release(job)

    def _sleep(self, seconds: float) -> None:
        """Sleep, but wake early when a stop is requested."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _shutdown(self) -> None:
        try:
            self.teardown()
        finally:
            self._stop_beating.set()
            if self._beat_thread is not None:
                self._beat_thread.join(timeout=5)
            try:
                self.queue.unregister()
            except redis.exceptions.RedisError as exc:
                log_event(self.log, "worker.unregister_failed", level=logging.WARNING,
                          error=str(exc))  # fmt: skip
            if self._db is not None:
                self._db.close()

    # -- heartbeat and reaper (side thread) ----------------------------------------

    def _start_heartbeat(self) -> None:
        self._beat()  # before the first claim, so the reaper never sees us as dead
        self._beat_thread = threading.Thread(
            target=self._beat_loop, name=f"heartbeat-{self.stage}", daemon=True
        )
        self._beat_thread.start()

    def current_job(self) -> tuple[str, str]:
        """(short id, payload excerpt) of the work in hand, for heartbeats and `status`."""
        short = ",".join(j.short_id for j in self._in_hand)
        return short, self._in_hand[0].raw[:500] if self._in_hand else ""

    def _beat(self) -> None:
        current, current_raw = self.current_job()
        self.queue.heartbeat(
            self.heartbeat_ttl_s,
            {
                "stage": self.stage, "host": self.settings.worker_host, "pid": os.getpid(),
                "state": self.state.value, "started_at": self._started_at, "job": current,
                "job_raw": current_raw,
                "look_ahead": len(self._ahead.jobs) if self._ahead is not None else 0,
                "queues": ",".join(self.source_queues()),
            },
        )  # fmt: skip

    def _beat_loop(self) -> None:
        next_reap = time.monotonic() + self.reaper_interval_s
        while not self._stop_beating.wait(self.heartbeat_interval_s):
            try:
                self._beat()
                if time.monotonic() >= next_reap:
                    next_reap = time.monotonic() + self.reaper_interval_s
                    self.queue.reap()
            except redis.exceptions.RedisError as exc:
                log_event(self.log, "worker.heartbeat_failed", level=logging.ERROR,
                          error=str(exc))  # fmt: skip

    # -- signals -------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # tests may run the loop in a thread; signals stay with the runner
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self.stopping:
            self.stopping = True
            self.state = WorkerState.STOPPING  # shown in the heartbeat / `status`
            log_event(self.log, "worker.stop_requested", stage=self.stage, signal=name,
                      jobs_in_hand=len(self._in_hand))  # fmt: skip
            return
        self._force = True
        log_event(self.log, "worker.stop_forced", stage=self.stage, signal=name,
                  jobs_in_hand=len(self._in_hand))  # fmt: skip
        if self._interruptible:
            raise ShutdownForced

    def request_stop(self) -> None:
        """Ask the loop to stop after the job in hand (what the first SIGTERM does)."""
        self.stopping = True


def _missing_result(job: Job) -> BaseException:
    return RuntimeError(f"process_batch returned no result for job {job.short_id}")


def build_arg_parser(
    prog: str | None = None, description: str | None = None
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--once", action="store_true", help="handle one claim, then exit")
    modes.add_argument(
        "--drain", action="store_true", help="work until the source queues are empty, then exit"
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="default: $LOG_LEVEL or INFO",
    )
    return parser


def run_worker(worker_cls: type[Worker], argv: Sequence[str] | None = None) -> int:
    """The command line shared by every worker; returns the process exit code."""
    parser = build_arg_parser(
        prog=f"{worker_cls.stage}-worker", description=(worker_cls.__doc__ or "").strip()
    )
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    mode = RunMode.ONCE if args.once else RunMode.DRAIN if args.drain else RunMode.FOREVER
    try:
        worker = worker_cls(load_settings(), mode=mode)
    except ConfigError as exc:
        print(f"{worker_cls.stage}-worker: {exc}", file=sys.stderr)
        return 2
    return worker.work()
