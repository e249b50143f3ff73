"""Queue overhead: our JobQueue + QueueWorker loop against RQ's SimpleWorker, empty jobs.

    .venv/bin/python -m bench.bench_queue [--smoke] [--out PATH]

Both sides run on the same Redis (the local stack's, in a database number of this
run's own), in this process, with logging at WARNING, on N jobs enqueued
beforehand; only the draining is timed, in interleaved rounds (fastest of each
side counts). Each job "does nothing but store a result": our handler SETs a
result key with a TTL (what RQ stores per job), then the loop acks it.

- ours: a ``QueueWorker`` subclass run through ``QueueWorker.work()``, the same loop,
  heartbeat thread, claim (promote due retries + LMOVE into a processing list),
  ack (LREM) and logging calls the pipeline's workers use; once with batch_size 1
  and once with batch_size 8 (``claim_many``, as the gpu worker claims).
- RQ (pinned in the dev extra): ``SimpleWorker.work(burst=True)`` (no fork per
  job) on jobs made by ``Queue.enqueue``, result TTL as ours.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from audio_pipeline.config import load_settings
from audio_pipeline.logs import configure_logging
from audio_pipeline.queue import Job
from audio_pipeline.runtime.queue_worker import QueueWorker
from audio_pipeline.runtime.service import RunMode
from bench import benchlib

FULL_JOBS, SMOKE_JOBS = 3000, 200
# Interleaved rounds, fastest of each side counts: a neighbour's burst on this shared
# machine then slows one round, not one side.
FULL_ROUNDS, SMOKE_ROUNDS = 3, 1
BENCH_QUEUE = "queue:bench"
RESULT_TTL_S = 500  # RQ's default result_ttl
TARGET_MS_PER_JOB = 1.0
TARGET_VS_RQ = 5.0


class EmptyJobWorker(QueueWorker):
    """Stores a result for each job and stops once ``expected`` jobs are done."""

    stage = "bench"

    def __init__(self, *args: Any, expected: int, batch_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expected = expected
        self.batch_size = batch_size
        self.done = 0

    def source_queues(self) -> list[str]:
        return [BENCH_QUEUE]

    def process(self, job: Job) -> None:
        self.redis.set(f"bench:result:{job.short_id}", "ok", ex=RESULT_TTL_S)
        self.done += 1

    def iterate(self) -> bool:
        # Stop on the last job instead of waiting out --drain's final empty claim
        # (up to CLAIM_TIMEOUT_S), which would be timed as per-job overhead.
        did = super().iterate()
        if self.done >= self.expected:
            self.request_stop()
        return did


def run_ours(iso: benchlib.Isolated, n_jobs: int, batch_size: int) -> float:
    r = iso.redis()
    r.flushdb()
    pipe = r.pipeline(transaction=False)
    for i in range(n_jobs):
        pipe.rpush(BENCH_QUEUE, f'{{"n":{i}}}')
    pipe.execute()
    worker = EmptyJobWorker(
        load_settings(iso.env),
        mode=RunMode.FOREVER,
        worker_id=f"bench-{batch_size}",
        expected=n_jobs,
        batch_size=batch_size,
    )
    started = time.perf_counter()
    worker.work()
    wall = time.perf_counter() - started
    if worker.done != n_jobs or r.llen(BENCH_QUEUE) != 0:
        raise SystemExit(f"our worker did {worker.done} of {n_jobs} jobs")
    return wall


def run_rq(iso: benchlib.Isolated, n_jobs: int) -> float:
    from rq import Queue, SimpleWorker

    conn = iso.redis(decode=False)
    conn.flushdb()
    queue = Queue("bench", connection=conn)
    for _ in range(n_jobs):
        queue.enqueue(benchlib.empty_job, result_ttl=RESULT_TTL_S)
    worker = SimpleWorker([queue], connection=conn)
    started = time.perf_counter()
    worker.work(burst=True, logging_level="WARNING")
    wall = time.perf_counter() - started
    done = len(queue.finished_job_registry)
    if done != n_jobs:
        raise SystemExit(f"RQ finished {done} of {n_jobs} jobs")
    return wall


def main(argv: Sequence[str] | None = None) -> int:
    args = benchlib.parse_args(__doc__.split("\n\n")[0], argv)
    report = benchlib.Report("queue", args.smoke)
    configure_logging("WARNING")
    logging.getLogger("rq").setLevel(logging.WARNING)
    n = SMOKE_JOBS if args.smoke else FULL_JOBS
    with benchlib.isolated_stack("queue", database=False, bucket=False) as iso:
        run_ours(iso, min(n, 100), 1)  # warm-up: imports, connections, scripts loaded
        rounds: dict[str, list[float]] = {"rq": [], "ours": [], "ours_batch8": []}
        for _ in range(SMOKE_ROUNDS if args.smoke else FULL_ROUNDS):
            rounds["rq"].append(run_rq(iso, n))
            rounds["ours"].append(run_ours(iso, n, 1))
            rounds["ours_batch8"].append(run_ours(iso, n, 8))
    rq_wall, ours_wall, ours_batch_wall = (min(rounds[k]) for k in ("rq", "ours", "ours_batch8"))
    walls = {"rq": rq_wall, "ours": ours_wall, "ours_batch8": ours_batch_wall}
    per_job = {k: round(w / n * 1000, 4) for k, w in walls.items()}
    vs_rq = benchlib.ratio(rq_wall, ours_wall)
    vs_rq_batch = benchlib.ratio(rq_wall, ours_batch_wall)
    report.data.update(
        {
            "jobs": n,
            "rounds_wall_s": {k: [round(w, 3) for w in v] for k, v in rounds.items()},
            "baseline": {
                "name": "rq.SimpleWorker burst",
                "wall_s": round(rq_wall, 3),
                "jobs_per_s": round(n / rq_wall, 1),
                "ms_per_job": per_job["rq"],
            },
            "candidate": {
                "name": "JobQueue + Worker, batch 1",
                "wall_s": round(ours_wall, 3),
                "jobs_per_s": round(n / ours_wall, 1),
                "ms_per_job": per_job["ours"],
            },
            "candidate_batch8": {
                "name": "JobQueue + Worker, batch 8",
                "wall_s": round(ours_batch_wall, 3),
                "jobs_per_s": round(n / ours_batch_wall, 1),
                "ms_per_job": per_job["ours_batch8"],
            },
            "speedup": vs_rq,
            "speedup_batch8": vs_rq_batch,
            "targets": {"ms_per_job_max": TARGET_MS_PER_JOB, "speedup_min": TARGET_VS_RQ},
            "meets_targets": per_job["ours"] < TARGET_MS_PER_JOB and vs_rq >= TARGET_VS_RQ,
        }
    )
    report.row("jobs", str(n))
    report.row("RQ SimpleWorker", f"{per_job['rq']:.3f} ms/job", f"{n / rq_wall:.0f} jobs/s")
    report.row("ours, batch 1", f"{per_job['ours']:.3f} ms/job", f"{n / ours_wall:.0f} jobs/s")
    report.row(
        "ours, batch 8", f"{per_job['ours_batch8']:.3f} ms/job", f"{n / ours_batch_wall:.0f} jobs/s"
    )
    report.row("vs RQ (batch 1)", f"{vs_rq:.2f}x", f"target >= {TARGET_VS_RQ}x, < 1 ms/job")
    report.row("vs RQ (batch 8)", f"{vs_rq_batch:.2f}x")
    report.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
