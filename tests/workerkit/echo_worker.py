"""A tiny real Worker used only by tests, run as ``python -m workerkit.echo_worker``.

Each job is ``{"id": str, "sleep": seconds, "fail": "transient"|"permanent",
"fail_times": n}``. The worker records the job id in Redis list ``echo:started``
when it begins and commits it to ``echo:done`` when it finishes (its "result
write"), so tests can prove nothing was lost or done twice. Queues come from
ECHO_QUEUES (comma-separated, default queue:echo), batch size from ECHO_BATCH_SIZE.
"""

from __future__ import annotations

import os
import sys
import time

from audio_pipeline.queue import Job, PermanentJobError, require_fields
from audio_pipeline.worker import Worker, run_worker

STARTED_KEY = "echo:started"
DONE_KEY = "echo:done"
BATCHES_KEY = "echo:batches"


class EchoWorker(Worker):
    """Test worker: sleeps, fails on request, records what it did."""

    stage = "echo"
    batch_size = int(os.environ.get("ECHO_BATCH_SIZE", "1"))

    def source_queues(self) -> list[str]:
        return os.environ.get("ECHO_QUEUES", "queue:echo").split(",")

    def process_batch(self, jobs: list[Job]) -> dict[str, BaseException | None]:
        self.redis.rpush(BATCHES_KEY, len(jobs))
        return super().process_batch(jobs)

    def process(self, job: Job) -> None:
        require_fields(job.payload, {"id": str})
        self.redis.rpush(STARTED_KEY, job.payload["id"])
        deadline = time.monotonic() + float(job.payload.get("sleep", 0))
        while time.monotonic() < deadline:
            time.sleep(0.05)
        fail = job.payload.get("fail")
        if fail == "permanent":
            raise PermanentJobError(f"job {job.payload['id']} asked to fail permanently")
        if fail == "transient" and job.attempts < int(job.payload.get("fail_times", 1)):
            raise RuntimeError(f"transient failure {job.attempts + 1} of job {job.payload['id']}")
        self.redis.rpush(DONE_KEY, job.payload["id"])


def main() -> int:
    return run_worker(EchoWorker)


if __name__ == "__main__":
    sys.exit(main())
