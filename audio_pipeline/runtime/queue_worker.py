"""A service that consumes Redis queues: claim, look-ahead, settle.

A stage subclasses QueueWorker, sets ``stage``, lists its ``source_queues()`` and
implements ``process(job)`` (or ``process_batch(jobs, prepared)`` with
``batch_size`` > 1). Each turn of the service's loop reads as a sentence::

    promote due retries -> ready to claim? -> claim -> prepare -> process
    -> ack / retry / dead letter

Look-ahead (``look_ahead = True``; the gpu worker's PREFETCH): once a claim is
prepared, the worker claims the next one at once, without waiting, and runs
``prepare_batch`` on it in a side thread while ``process_batch`` runs on this one, so
the model never waits for decoding or downloads. The look-ahead jobs sit in this
worker's processing lists like any claimed job (a crash loses nothing: the reaper
returns them); a stop hands them back to the head of their queues, in order,
unprocessed. ``prepare_batch`` must therefore only do work that is harmless to
redo or drop: read, download, decode; never a result write.

On the service's two-stage stop: the first signal lets the claim in hand go on for
the stop grace (``WORKER_STOP_GRACE_S``); a second signal, or the grace running out,
interrupts the handler and hands the claim back to the head of its queue, unspent.
Either way nothing is lost.

Outages: a claim cut by a Redis outage waits for Redis, then hands back whatever
part of it had already moved into this worker's processing lists. Settling (ack,
retry, dead letter, release) is retried until Redis answers, so a job processed
during an outage is settled once it is back, neither lost nor run twice. A job
that failed because Redis or PostgreSQL was away costs no attempt: the worker
waits for the backend and hands the job back to the head of its queue.

Poison isolation: when a claim of several jobs fails as a whole (``prepare_batch``
or ``process_batch`` raised, so no job is to blame), no job pays for it. The worker
runs the claim again in parts, each part prepared and processed on its own and
settled as soon as it ends: one job at a time (``worker.claim_isolated``), so the
good files complete now and only a job that also fails alone is retried (an attempt
of its own) and in the end dead-lettered; or, when the claim ran out of GPU memory
(``runtime.out_of_memory``), in halves (``worker.claim_halved``), halved again while
they run out of memory, down to one job, whose out-of-memory is an ordinary retry.
The size that fitted also becomes the claim size for the next claims for a while
(``runtime.claim_size``: ``worker.claim_size_lowered``, then
``worker.claim_size_restored``). A claim that failed because a backend was away is
not split: it is handed back as above.

The parts run here, in the worker, rather than being retried through the queue one
by one: the good files are done without waiting out a retry's backoff, no marker has
to travel in payloads to keep the jobs from being claimed together again, and the
jobs never leave this worker's processing lists until each is settled, so a kill -9
mid-isolation loses nothing (the reaper returns the unsettled ones) and a forced stop
hands back every unsettled job of the claim, in order, at no attempt's cost. A first
stop lets the isolation finish, as it lets any claim in hand finish.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from typing import Any

from audio_pipeline.logs import log_context, log_event
from audio_pipeline.queue import Job, PermanentJobError, processing_key
from audio_pipeline.runtime.claim_size import DEFAULT_HOLD_S, ClaimSize
from audio_pipeline.runtime.look_ahead import LookAhead
from audio_pipeline.runtime.out_of_memory import is_out_of_memory
from audio_pipeline.runtime.outage import backend_unavailable, redis_unavailable
from audio_pipeline.runtime.service import InHand, RunMode, Service, ServiceState

CLAIM_TIMEOUT_S = 1.0  # longest wait in one claim; bounds how late a stop is noticed
BACKPRESSURE_SLEEP_S = 2.0  # pause while ready_to_claim() says no


class QueueWorker(Service):
    """Base of the queue-consuming stages; see the module docstring for the contract."""

    batch_size: int = 1
    look_ahead: bool = False  # claim and prepare the next batch while this one runs
    claim_size_hold_s: float = DEFAULT_HOLD_S  # claims stay smaller this long after an OOM

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_hand: list[Job] = []  # claimed and not yet settled, in claim order
        self._claim_size = ClaimSize(self.claim_size_hold_s)
        self._ahead: LookAhead | None = None
        self._strays_possible = False  # a claim was cut short: check our processing lists

    # -- hooks for stages ----------------------------------------------------------

    def source_queues(self) -> list[str]:
        raise NotImplementedError

    def process(self, job: Job) -> None:
        raise NotImplementedError

    def prepare_batch(self, jobs: list[Job]) -> Any:
        """Work for ``jobs`` that needs no result write (downloads, decoding).

        Its return value is handed to ``process_batch``. With ``look_ahead`` it runs
        in a side thread while the previous claim is processed, and its jobs may be
        handed back unprocessed on a stop (then ``discard_prepared`` is called), so it
        must be harmless to redo. An exception fails the claim as a whole: it is then
        run again in parts (see "Poison isolation" in the module docstring), each part
        prepared again on its own.
        """
        return None

    def discard_prepared(self, jobs: list[Job], prepared: Any) -> None:
        """Release what prepare_batch made for jobs handed back unprocessed."""

    def process_batch(
        self, jobs: list[Job], prepared: Any = None
    ) -> dict[str, BaseException | None]:
        """Default: one process() call per job; override to batch model calls.

        Returns each job's outcome keyed by ``job.raw``: None (done) or the error. An
        exception fails the claim as a whole, which is then run again in parts.
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

    # -- the service's hooks -------------------------------------------------------

    def describe(self) -> dict[str, str]:
        return {"queues": ",".join(self.source_queues())}

    def in_hand(self) -> InHand:
        held, ahead = self._in_hand, self._ahead
        return InHand(
            ids=",".join(j.short_id for j in held),
            excerpt=held[0].raw if held else "",
            count=len(held),
            ahead=len(ahead.jobs) if ahead is not None else 0,
        )

    def on_start(self) -> None:
        self.queue.recover_own()

    def on_stop(self) -> None:
        self._drop_look_ahead()

    def on_forced_stop(self) -> None:
        """Return the jobs in hand and any look-ahead, without waiting for it."""
        ahead, self._ahead = self._ahead, None
        jobs = self._in_hand + (ahead.jobs if ahead is not None else [])
        self._in_hand = []
        self._release(jobs)

    def iterate(self) -> bool:
        """One claim handled; True when a job was handled (or tried)."""
        self._settle_reaped()
        ahead = self._ahead
        if ahead is not None:
            jobs = ahead.jobs
        else:
            if not self.ready_to_claim():
                self.state = ServiceState.IDLE
                self.metrics.backpressure.inc()
                self.sleep(BACKPRESSURE_SLEEP_S)
                return False
            jobs = self._claim()
            if not jobs:
                self.state = ServiceState.IDLE
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
            self.state = ServiceState.STOPPING
        return True

    def drained(self) -> bool:
        """True when nothing is left for this worker: queues empty, no pending retries."""
        queues = self.source_queues()
        if any(self.redis.llen(q) for q in queues):
            return False
        return self.queue.pending_retries(queues) == 0

    # -- one claim -----------------------------------------------------------------

    def _claim(self) -> list[Job]:
        if self._strays_possible:
            self.redis_call(self._hand_back_strays)
        try:
            jobs = self.queue.claim_many(self.source_queues(), self._claim_limit(), CLAIM_TIMEOUT_S)
            self.metrics.jobs_claimed([job.queue_wait_s() for job in jobs])
            return jobs
        except Exception as exc:
            if not redis_unavailable(exc):
                raise
            # claim_many may have moved some jobs before the outage cut it short.
            self._strays_possible = True
            self.backends["redis"].failed(exc)
            self.wait_for("redis")
            return []

    def _hand_back_strays(self) -> None:
        """Give back what sits in our processing lists but is not in hand (a claim
        the outage cut short), to the head of its queue, in order, at no attempt's cost."""
        held = {job.raw for job in self._in_hand}
        if self._ahead is not None:
            held.update(job.raw for job in self._ahead.jobs)
        for queue in self.source_queues():
            raws = self.redis.lrange(processing_key(self.worker_id, queue), 0, -1)
            strays = [Job(queue=queue, raw=raw, payload={}) for raw in raws if raw not in held]
            self._release(strays)
        self._strays_possible = False

    def _claim_limit(self) -> int:
        """Jobs the next claim may take: ``batch_size``, or fewer for a while after an OOM."""
        size, restored = self._claim_size.size(self.batch_size)
        if restored:
            self.log_stage_event("worker.claim_size_restored", claim_size=size)
        return size

    def _handle(self, jobs: list[Job], ahead: LookAhead | None = None) -> None:
        """Prepare ``jobs`` (unless the look-ahead did), start on the next claim,
        process, settle; a claim that fails as a whole is run again in parts."""
        # Every line logged meanwhile names the job (or the claim's jobs).
        ids = self._ids(jobs[0]) if len(jobs) == 1 else {"jobs": ",".join(j.short_id for j in jobs)}
        with log_context(**ids):
            self._handle_claim(jobs, ahead)

    def _handle_claim(self, jobs: list[Job], ahead: LookAhead | None) -> None:
        self.state = ServiceState.BUSY
        for job in jobs:
            log_event(self.log, "job.started", **self._job_fields(job), attempt=job.attempts + 1)
        started = time.monotonic()
        results: dict[str, BaseException | None] = {}
        with self.interruptible():
            prepared, error = self._prepared(jobs, ahead)
            self._start_look_ahead()
            if error is None:
                results, error = self._run_handler(jobs, prepared)
            prepared = None  # a split prepares its parts anew; free this claim's first
            if error is not None and self._splits(jobs, error):
                failure, error = ClaimFailure.of(error), None
                self._split(jobs, failure)  # settles every job of the claim
                return
        duration = time.monotonic() - started
        for job in jobs:
            if error is not None:  # the whole claim failed: each job carries the reason
                outcome: BaseException | None = error
            else:
                outcome = results.get(job.raw, _missing_result(job))
            self._settle(job, outcome, duration)
        self._in_hand = []

    def _prepared(self, jobs: list[Job], ahead: LookAhead | None) -> tuple[Any, Exception | None]:
        if ahead is not None:
            ahead.wait()  # usually long done: it ran while the previous claim was processed
            if ahead.error is None:
                prepared, ahead.prepared = ahead.prepared, None  # held here only
                return prepared, None
            if isinstance(ahead.error, Exception):
                return None, ahead.error
            raise ahead.error  # KeyboardInterrupt and the like are not job failures
        try:
            return self.prepare_batch(jobs), None
        except Exception as exc:
            return None, exc

    def _run_handler(
        self, jobs: list[Job], prepared: Any
    ) -> tuple[dict[str, BaseException | None], Exception | None]:
        """(each job's outcome, None), or ({}, the error) when the claim failed as a whole."""
        try:
            return self.process_batch(jobs, prepared), None
        except Exception as exc:
            return {}, exc

    # -- poison isolation: a claim that failed as a whole, run again in parts --------

    def _splits(self, jobs: list[Job], error: Exception) -> bool:
        """Whether a claim that failed as a whole with ``error`` is run again in parts:
        when it has several jobs and no backend was away (then it is handed back)."""
        return len(jobs) > 1 and backend_unavailable(error) is None

    def _split(self, jobs: list[Job], failure: ClaimFailure) -> None:
        """Run ``jobs`` again in parts: halves after a GPU out-of-memory, else one job
        at a time. Each part is settled as it ends (see the module docstring)."""
        fields: dict[str, Any] = {"jobs": ",".join(j.short_id for j in jobs), "error": failure.text}
        if failure.out_of_memory:
            half = (len(jobs) + 1) // 2
            parts = [jobs[:half], jobs[half:]]
            self.log_stage_event(
                "worker.claim_halved",
                level=logging.WARNING,
                claim_size=len(jobs),
                new_size=half,
                **fields,
            )
            if self._claim_size.lower(half):
                self.log_stage_event(
                    "worker.claim_size_lowered",
                    level=logging.WARNING,
                    claim_size=half,
                    configured=self.batch_size,
                    hold_s=self._claim_size.hold_s,
                )
        else:
            parts = [[job] for job in jobs]
            self.log_stage_event(
                "worker.claim_isolated", level=logging.WARNING, claim_size=len(jobs), **fields
            )
        for part in parts:
            self._run_part(part)

    def _run_part(self, jobs: list[Job]) -> None:
        """Prepare, process and settle one part of a split claim (splitting it again
        when it fails as a whole)."""
        self.alive()  # an isolated claim runs many model calls in one turn of the loop
        started = time.monotonic()
        results: dict[str, BaseException | None] = {}
        try:
            prepared = self.prepare_batch(jobs)
        except Exception as exc:
            error: Exception | None = exc
        else:
            results, error = self._run_handler(jobs, prepared)
            prepared = None
        if error is not None and self._splits(jobs, error):
            failure, error = ClaimFailure.of(error), None
            self._split(jobs, failure)
            return
        duration = time.monotonic() - started
        for job in jobs:
            outcome = error if error is not None else results.get(job.raw, _missing_result(job))
            # Whole: a forced stop must not find a job settled and still in hand (it
            # would be handed back too); it takes effect once this job is settled.
            with self.shielded():
                self._settle(job, outcome, duration)
                self._in_hand = [held for held in self._in_hand if held is not job]

    def _settle(self, job: Job, error: BaseException | None, duration_s: float) -> None:
        with log_context(**self._ids(job)):
            self._settle_one(job, error, duration_s)

    def _settle_one(self, job: Job, error: BaseException | None, duration_s: float) -> None:
        fields = self._job_fields(job)
        self.metrics.duration.observe(duration_s)
        # Each settling step goes through redis_call: it waits out an outage, since a
        # job left in our processing list while we live would never be settled.
        if error is None:
            self.redis_call(lambda: self.queue.ack(job))
            self.metrics.done.inc()
            log_event(self.log, "job.done", **fields, duration_s=duration_s)
            return
        away = backend_unavailable(error)
        if away is not None:
            # Not the job's fault: wait for the backend, then give the job back untried.
            self.backends[away].failed(error)
            self.wait_for(away)
            self.redis_call(lambda: self.queue.release(job))
            self.metrics.handed_back.inc()
        elif isinstance(error, PermanentJobError):
            self.redis_call(lambda: self.queue.dead_letter(job, f"{type(error).__name__}: {error}"))
            self.metrics.dead_lettered.inc()
            self._final_failure(job, error)
        else:
            self.log.debug("job %s failed", job.short_id, exc_info=error)
            if self.redis_call(lambda: self.queue.retry(job, error)):
                self.metrics.retried.inc()
            else:
                self.metrics.dead_lettered.inc()
                self._final_failure(job, error)

    def _final_failure(self, job: Job, error: BaseException) -> None:
        try:
            self.on_job_failed(job, error)
        except Exception:  # must not stop the worker; _settle_reaped runs it again later
            self.log.exception("on_job_failed hook failed for job %s", job.short_id)
            return
        self.redis_call(lambda: self.queue.forget_dead_letter(job))

    def _settle_reaped(self) -> None:
        """on_job_failed for this stage's jobs the reaper dead-lettered (queue.py)."""
        for dead in self.queue.reaped_dead_letters():
            try:
                self.on_job_failed(dead.job, dead.error)
            except Exception:  # left listed: the next turn (or worker) runs it again
                self.log.exception("on_job_failed hook failed for reaped job %s", dead.job.short_id)
                return
            self.redis_call(lambda dead=dead: self.queue.forget_reaped(dead))

    def _ids(self, job: Job) -> dict[str, Any]:
        """What every log line about ``job`` carries (logs.log_context)."""
        ids: dict[str, Any] = {"job": job.short_id}
        for key in ("batch_id", "audio_id"):
            value = job.payload.get(key)
            if isinstance(value, str | int) and not isinstance(value, bool):
                ids[key] = value
        return ids

    def _job_fields(self, job: Job) -> dict[str, Any]:
        fields: dict[str, Any] = {"stage": self.stage, "job": job.short_id, "queue": job.queue}
        for key in ("batch_id", "audio_id"):
            if key in job.payload:
                fields[key] = job.payload[key]
        return fields

    def _release(self, jobs: list[Job]) -> None:
        # Each release pushes onto the head: last claimed first keeps the queue's order.
        for job in reversed(jobs):
            self.redis_call(lambda job=job: self.queue.release(job))
            self.metrics.handed_back.inc()

    # -- look-ahead ------------------------------------------------------------------

    def _start_look_ahead(self) -> None:
        """Claim the next batch now, without waiting, and prepare it in a side thread."""
        if not self.look_ahead or self.mode is RunMode.ONCE or self.stopping:
            return
        if not self.ready_to_claim():
            return
        # Shielded: a forced stop between the move and the bookkeeping would leave jobs
        # in our processing list that only the reaper would give back.
        with self.shielded():
            try:
                jobs = self.queue.claim_many(self.source_queues(), self._claim_limit(), 0)
                self.metrics.jobs_claimed([job.queue_wait_s() for job in jobs])
            except Exception as exc:
                if not redis_unavailable(exc):
                    raise
                # Not fatal: the loop claims again after this batch (and hands back
                # first what this cut-short claim may have moved).
                self.backends["redis"].failed(exc)
                self._strays_possible = True
                jobs = []
            if jobs:
                self._ahead = LookAhead(jobs, self.prepare_batch, name=f"prepare-{self.stage}")
                self.log_stage_event(
                    "worker.look_ahead",
                    level=logging.DEBUG,
                    jobs=",".join(j.short_id for j in jobs),
                )

    def _drop_look_ahead(self) -> None:
        """Hand the look-ahead back unprocessed (a stop): after its preparation ends,
        so nothing still works on jobs that someone else may claim, unless a second
        stop signal says not to wait."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        while not ahead.wait(0.2):
            if self.stop_forced:
                break
        else:
            if ahead.error is None:
                try:
                    self.discard_prepared(ahead.jobs, ahead.prepared)
                except Exception:  # the jobs still go back; leftovers are only disk space
                    self.log.exception("discard_prepared failed")
        self._release(ahead.jobs)


@dataclass(frozen=True)
class ClaimFailure:
    """Why a claim failed as a whole, kept without the error itself."""

    text: str  # "{type}: {message}", for the log line
    out_of_memory: bool  # the GPU ran out of memory: run the claim again in halves

    @classmethod
    def of(cls, error: BaseException) -> ClaimFailure:
        """Read ``error``, then let go of what its tracebacks hold: the failed call's
        frames keep its arguments and locals alive (a claim's decoded audio, the GPU
        tensors of a model call), and they must be freed before the parts run, or the
        halves of an out-of-memory claim would meet the same full GPU."""
        failure = cls(f"{type(error).__name__}: {error}", is_out_of_memory(error))
        seen: set[int] = set()
        current: BaseException | None = error
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            if current.__traceback__ is not None:
                traceback.clear_frames(current.__traceback__)
            current = current.__cause__ or current.__context__
        return failure


def _missing_result(job: Job) -> BaseException:
    return RuntimeError(f"process_batch returned no result for job {job.short_id}")
