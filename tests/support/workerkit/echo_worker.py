"""A tiny real queue worker used only by tests.

Run as ``python -m tests.support.workerkit.echo_worker``.

Each job is ``{"id": str, "sleep": seconds, "fail": "transient"|"permanent",
"fail_times": n}``. The worker records the job id in Redis list ``echo:started``
when it begins and commits it to ``echo:done`` when it finishes (its "result
write"), so tests can prove nothing was lost or done twice. Queues come from
ECHO_QUEUES (comma-separated, default queue:echo), batch size from ECHO_BATCH_SIZE.

With ECHO_LOOK_AHEAD=1 the worker claims ahead: ``prepare_batch`` records each id
in ``echo:prepared`` (after ``prepare_sleep`` seconds, if a job asks for it) and
``discard_prepared`` records the ids it is handed back in ``echo:discarded``. A job
with ``"await_prepared": id`` is processed only once ``id`` has been prepared (or after
AWAIT_PREPARED_S), so a test can prove the look-ahead overlaps processing without
racing it.

Whole-claim failures (poison isolation): a job with ``"poison": "process"`` makes
``process_batch`` raise for any claim it is in (alone too), before any job of it is
processed; ``"poison": "prepare"`` makes ``prepare_batch`` raise instead. A job with
``"oom_above": n`` makes ``process_batch`` raise a CUDA out-of-memory error (as
ctranslate2 words it) for any claim of more than n jobs. ``echo:batches`` records
each claim's size as ``process_batch`` gets it, and ``echo:done_attempt`` (a hash)
the attempt on which each id was done. ECHO_CLAIM_SIZE_HOLD_S sets how long claims
stay smaller after an out-of-memory.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from audio_pipeline.queue import Job, PermanentJobError, require_fields
from audio_pipeline.runtime.command import run_worker
from audio_pipeline.runtime.queue_worker import QueueWorker

STARTED_KEY = "echo:started"
DONE_KEY = "echo:done"
BATCHES_KEY = "echo:batches"
PREPARED_KEY = "echo:prepared"
DISCARDED_KEY = "echo:discarded"
EVENTS_KEY = "echo:events"  # "prepared:{id}" and "done:{id}" in the order they happened
DONE_ATTEMPT_KEY = "echo:done_attempt"  # hash: id -> the attempt (1 = first) it was done on
OOM_MESSAGE = "CUDA failed with error out of memory"  # ctranslate2's words
AWAIT_PREPARED_S = 15.0


def poison_error(jobs: list[Job], where: str) -> RuntimeError | None:
    """The error a claim holding a job poisoned ``where`` fails with, if it holds one."""
    for job in jobs:
        if job.payload.get("poison") == where:
            return RuntimeError(f"poison job {job.payload.get('id')} sinks its claim at {where}")
    return None


class EchoWorker(QueueWorker):
    """Test worker: sleeps, fails on request, records what it did."""

    stage = "echo"
    batch_size = int(os.environ.get("ECHO_BATCH_SIZE", "1"))
    look_ahead = os.environ.get("ECHO_LOOK_AHEAD") == "1"
    if "ECHO_CLAIM_SIZE_HOLD_S" in os.environ:
        claim_size_hold_s = float(os.environ["ECHO_CLAIM_SIZE_HOLD_S"])

    def source_queues(self) -> list[str]:
        return os.environ.get("ECHO_QUEUES", "queue:echo").split(",")

    def prepare_batch(self, jobs: list[Job]) -> list[str] | None:
        poisoned = poison_error(jobs, "prepare")
        if poisoned is not None:
            raise poisoned
        if not self.look_ahead:
            return None
        ids = [str(j.payload.get("id")) for j in jobs]
        time.sleep(max(float(j.payload.get("prepare_sleep", 0)) for j in jobs))
        for job in jobs:
            if job.attempts < int(job.payload.get("prepare_fail_times", 0)):
                raise RuntimeError(f"prepare failure {job.attempts + 1} of job {job.payload['id']}")
        self.redis.rpush(PREPARED_KEY, *ids)
        self.redis.rpush(EVENTS_KEY, *[f"prepared:{i}" for i in ids])
        return ids

    def discard_prepared(self, jobs: list[Job], prepared: Any) -> None:
        self.redis.rpush(DISCARDED_KEY, *prepared)

    def process_batch(
        self, jobs: list[Job], prepared: Any = None
    ) -> dict[str, BaseException | None]:
        self.redis.rpush(BATCHES_KEY, len(jobs))
        poisoned = poison_error(jobs, "process")
        if poisoned is not None:
            raise poisoned
        limits = [int(j.payload["oom_above"]) for j in jobs if "oom_above" in j.payload]
        if limits and len(jobs) > min(limits):
            raise RuntimeError(f"{OOM_MESSAGE} (a claim of {len(jobs)} jobs)")
        return super().process_batch(jobs, prepared)

    def process(self, job: Job) -> None:
        require_fields(job.payload, {"id": str})
        self.redis.rpush(STARTED_KEY, job.payload["id"])
        deadline = time.monotonic() + float(job.payload.get("sleep", 0))
        while time.monotonic() < deadline:
            time.sleep(0.05)
        awaited = job.payload.get("await_prepared")
        if awaited is not None:
            # gives up rather than hangs, so a worker without look-ahead fails the test's
            # order check instead of its timeout
            give_up = time.monotonic() + AWAIT_PREPARED_S
            while (
                awaited not in self.redis.lrange(PREPARED_KEY, 0, -1) and time.monotonic() < give_up
            ):
                time.sleep(0.05)
        fail = job.payload.get("fail")
        if fail == "permanent":
            raise PermanentJobError(f"job {job.payload['id']} asked to fail permanently")
        if fail == "transient" and job.attempts < int(job.payload.get("fail_times", 1)):
            raise RuntimeError(f"transient failure {job.attempts + 1} of job {job.payload['id']}")
        self.redis.rpush(DONE_KEY, job.payload["id"])
        self.redis.hset(DONE_ATTEMPT_KEY, job.payload["id"], job.attempts + 1)
        self.redis.rpush(EVENTS_KEY, f"done:{job.payload['id']}")


def main() -> int:
    return run_worker(EchoWorker)


if __name__ == "__main__":
    sys.exit(main())
