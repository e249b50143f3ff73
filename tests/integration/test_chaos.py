"""The project's own chaos test: the whole pipeline under every fault at once.

Real worker processes run on a Redis and a PostgreSQL of this module's own (S3 and
the collection host's sshd are the shared stack's): a transfer worker fetching the
archives over SSH as they arrive, and two gpu "hosts", each an unpack worker and a
gpu worker with its own WORKER_HOST and scratch and the small real models. While
work flows, a seeded schedule:

- kills -9 a worker of every kind several times (a busy one where there is one),
  with its children, as systemd kills a unit's cgroup;
- restarts Redis (SHUTDOWN SAVE: its data comes back, as the fleet's appendonly
  Redis keeps it) and PostgreSQL (``pg_ctl stop -m fast``, then start) once each;
- loses one gpu host for good while files wait in its queue: both its workers
  killed and never restarted, its scratch deleted with its disk, so its files reach
  the other host only through the reaper's move and S3.

A supervisor restarts every killed worker, as systemd's Restart= would; any other
exit fails the test. The schedule is written in terms of progress (archives
transferred, unpacked, files done), not time, so it lands on work in flight on a
fast or a slow machine.

Required in the end: every file of every archive has exactly one transcript and one
verdict per policy, nothing lost, nothing twice, no row in a working state (every
batch done, no file failed), every queue, processing list, delayed retry and dead
letter empty, and every surviving worker stops with 0 on SIGTERM. The figures are
printed in the terminal summary; ``CHAOS_SEED=N`` replays a schedule (which busy
worker a kill meets still depends on timing), ``CHAOS_LOG_DIR`` keeps the logs.

One race the chaos can meet, too rarely to count on, is also played out step by step:
a redelivered unpack job and its batch's last file (the unpack job completes the
batch).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from audio_pipeline import s3_utils
from audio_pipeline.config import QUEUE_FAILED, QUEUE_TRANSCRIBE, QUEUE_UNPACK, Settings
from audio_pipeline.queue import DELAYED_KEY, PROCESSING_PREFIX, UNSETTLED_PREFIX, heartbeat_key
from audio_pipeline.queue_admin import queue_status
from audio_pipeline.records.batches import mark_unpacking
from devtools import devstack
from devtools.dev_models import install_whisper
from devtools.sample import SampleBatch, make_speech_batch
from tests.support.media import wer
from tests.support.private_stack import (
    backend_env,
    pipeline_url,
    redis_client,
    restart_postgres,
    restart_redis,
    running_private_stack,
)
from tests.support.rows import add_policy
from tests.support.workerkit.procs import FAST_ENV, REPO_ROOT, finish, start_module

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# -- size: a few minutes on 2 CPU cores (the terminal summary says how long) ----------
ARCHIVES = 20
FILES_PER_ARCHIVE = (2, 4)  # inclusive range, drawn per archive
SPEECH_S = (1.5, 3.5)  # length range of one file
ARRIVAL_GAP_S = 2.0  # between two archives landing on the collection host
KILLS_PER_KIND = 4
WORK_TIMEOUT_S = 420.0  # from the first archive to every batch done
QUIET_TIMEOUT_S = 60.0  # for the last settles, after every batch is done
STOP_TIMEOUT_S = 60.0  # for every worker to stop on SIGTERM at the end
STALL_S = 30.0  # nothing queued and no progress this long: the run is over, done or not

HOSTS = ("gpu-a", "gpu-b")
COLLECTOR = "collector"  # the transfer worker's WORKER_HOST
POLICIES = {
    "insults": ["garbage", "useless", "trash"],
    "threats": ["kick", "dirty hands"],
}
DURATION_TOLERANCE_S = 0.5  # an Opus cut short by a kill would be found out by its length
# Above the most disruptions one job can meet here (every kill of its stage, the lost
# host, the restarts), so a dead letter is a bug, not the dice.
MAX_ATTEMPTS = 2 * KILLS_PER_KIND + 4
BUSY_WAIT_S = 8.0  # a kill waits this long for a worker of its kind to hold a job
HOST_QUEUE_WAIT_S = 60.0  # losing a host waits this long for files in its queue...
HOST_QUEUE_MIN = 2  # ...and for at least this many
# Redis and PostgreSQL stay away this long when restarted: long enough for every
# worker to meet refused connections mid-job, not an outage of minutes
# (test_outages.py has those).
RESTART_DOWN_S = 3.0

# Worker timings: a lapsed heartbeat is noticed within seconds, retries come at once.
# The TTL leaves room for a heartbeat thread starved on 2 busy cores.
TIMINGS = {
    **FAST_ENV,
    "WORKER_HEARTBEAT_INTERVAL_S": "0.5",
    "WORKER_HEARTBEAT_TTL_S": "3",
    "WORKER_REAPER_INTERVAL_S": "1",
    "QUEUE_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
}
SUMMARY_PROPERTY = "terminal_summary"  # printed by tests/conftest.py's summary hook


class Kind(StrEnum):
    TRANSFER = "transfer"
    UNPACK = "unpack"
    GPU = "gpu"


MODULES = {
    Kind.TRANSFER: "audio_pipeline.workers.transfer_worker",
    Kind.UNPACK: "audio_pipeline.workers.unpack_worker",
    Kind.GPU: "audio_pipeline.workers.gpu_worker",
}


class Measure(StrEnum):
    """What a disruption waits for: a share of archives transferred or unpacked, or of
    files done."""

    TRANSFERRED = "transferred"
    UNPACKED = "unpacked"
    DONE = "files done"


class Action(StrEnum):
    KILL_TRANSFER = "kill -9 transfer"
    KILL_UNPACK = "kill -9 unpack"
    KILL_GPU = "kill -9 gpu"
    RESTART_REDIS = "restart redis"
    RESTART_POSTGRES = "restart postgres"
    LOSE_HOST = "lose host"


KILL_KINDS = {
    Action.KILL_TRANSFER: Kind.TRANSFER,
    Action.KILL_UNPACK: Kind.UNPACK,
    Action.KILL_GPU: Kind.GPU,
}


@dataclass(frozen=True)
class Disruption:
    action: Action
    measure: Measure
    at: float  # the share of ``measure`` reached that lets it happen

    def __str__(self) -> str:
        return f"{self.action} at {self.at:.0%} {self.measure}"


def chaos_plan(rng: random.Random) -> list[Disruption]:
    """Every disruption of one run, in the order they are due."""
    plan = [
        *(Disruption(Action.KILL_TRANSFER, Measure.TRANSFERRED, rng.uniform(0.05, 0.8))
          for _ in range(KILLS_PER_KIND)),
        *(Disruption(Action.KILL_UNPACK, Measure.UNPACKED, rng.uniform(0.05, 0.75))
          for _ in range(KILLS_PER_KIND)),
        *(Disruption(Action.KILL_GPU, Measure.DONE, rng.uniform(0.05, 0.75))
          for _ in range(KILLS_PER_KIND)),
        Disruption(Action.RESTART_REDIS, Measure.DONE, rng.uniform(0.2, 0.5)),
        Disruption(Action.RESTART_POSTGRES, Measure.DONE, rng.uniform(0.35, 0.65)),
        Disruption(Action.LOSE_HOST, Measure.DONE, rng.uniform(0.25, 0.55)),
    ]  # fmt: skip
    return sorted(plan, key=lambda d: d.at)


# -- the worker processes and their supervisor ----------------------------------------


@dataclass
class Worker:
    """One supervised worker (a systemd unit): restarted after each kill."""

    name: str
    kind: Kind
    host: str
    env: dict[str, str] = field(repr=False)
    log_dir: Path = field(repr=False)
    proc: subprocess.Popen[str] | None = None
    runs: int = 0
    lost: bool = False  # its host is gone: never started again

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.{self.runs}.log"

    @property
    def worker_id(self) -> str:
        assert self.proc is not None
        return f"{self.kind}:{self.host}:{self.proc.pid}"

    def start(self) -> None:
        self.runs += 1
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(REPO_ROOT),
            **TIMINGS,
            **self.env,
        }
        with self.log_path.open("w") as log:
            # Its own process group: a kill takes its ffmpeg children too, as systemd
            # kills a unit's whole cgroup.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", MODULES[self.kind]],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )

    def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def holds_a_job(self, r: redis.Redis) -> bool:
        """Its heartbeat names work in hand (False while Redis is away)."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            return bool(r.hget(heartbeat_key(self.worker_id), "job"))
        except redis.exceptions.RedisError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class UnexpectedExit(AssertionError):
    pass


@dataclass
class Fleet:
    workers: list[Worker]
    kills: Counter[str] = field(default_factory=Counter)
    kills_mid_job: Counter[str] = field(default_factory=Counter)
    unexpected_exits: list[str] = field(default_factory=list)

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def live(self, kind: Kind) -> list[Worker]:
        return [w for w in self.workers if w.kind is kind and not w.lost]

    def check(self) -> None:
        """Fail at once on a worker that exited without being killed."""
        for w in self.workers:
            if w.lost or w.proc is None:
                continue
            code = w.proc.poll()
            if code is not None:
                self.unexpected_exits.append(f"{w.name} run {w.runs}: {code}")
                raise UnexpectedExit(
                    f"{w.name} (run {w.runs}) exited with {code} without being killed; "
                    f"its log ends:\n{w.log_tail()}"
                )

    def wait(self, predicate: Callable[[], object], timeout: float) -> bool:
        """Poll ``predicate`` while supervising; False if it never held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            if predicate():
                return True
            time.sleep(0.05)
        return False

    def kill_and_restart(self, w: Worker, mid_job: bool) -> None:
        w.kill()
        self.kills[w.kind] += 1
        self.kills_mid_job[w.kind] += mid_job
        w.start()

    def stop(self) -> dict[str, int]:
        """SIGTERM every worker still running; each one's exit code (-9: had to be
        killed). Never raises, so an earlier failure is the one reported."""
        running = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for w in running:
            assert w.proc is not None
            w.proc.send_signal(signal.SIGTERM)
        codes: dict[str, int] = {}
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for w in running:
            assert w.proc is not None
            try:
                codes[w.name] = w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill()
                codes[w.name] = -9
        return codes


@dataclass
class Arrivals:
    """The archives still to land on the collection host, one every ARRIVAL_GAP_S.

    Dropped from the main loop and also while a disruption waits for its moment (a
    busy worker, files queued on the host to lose): a wait that stopped the arrivals
    could starve the very work it waits for on a machine that keeps up."""

    pending: list[SampleBatch]
    collection: Path
    next_at: float = 0.0  # monotonic time the next one lands

    def drop_due(self) -> None:
        now = time.monotonic()
        if self.pending and now >= self.next_at:
            drop(self.pending.pop(0), self.collection)
            self.next_at = now + ARRIVAL_GAP_S


@dataclass
class Chaos:
    """Carries out the disruptions of a plan on a running fleet and records them."""

    fleet: Fleet
    stack: devstack.Stack  # the private one
    shared: devstack.Stack  # S3 and sshd
    redis_client: redis.Redis
    rng: random.Random
    lost_host: str
    root: Path  # each host's scratch is root/{host}
    arrivals: Arrivals
    started: float = 0.0  # monotonic time the work started
    restarts: dict[str, float] = field(default_factory=dict)  # service -> seconds down
    lost_queued: int | None = None  # files in the lost host's queue when it went
    fired: list[str] = field(default_factory=list)

    def fire(self, d: Disruption) -> None:
        if d.action in KILL_KINDS:
            self.kill(KILL_KINDS[d.action])
        elif d.action is Action.RESTART_REDIS:
            down = time.monotonic()
            restart_redis(self.stack, RESTART_DOWN_S)
            self.restarts["redis"] = time.monotonic() - down
        elif d.action is Action.RESTART_POSTGRES:
            down = time.monotonic()
            restart_postgres(self.stack, RESTART_DOWN_S)
            self.restarts["postgres"] = time.monotonic() - down
        elif d.action is Action.LOSE_HOST:
            self.lose_host()
        self.fired.append(f"{d} ({time.monotonic() - self.started:.0f} s)")

    def wait(self, predicate: Callable[[], object], timeout: float) -> bool:
        """``fleet.wait`` with the archives still arriving meanwhile."""

        def arriving() -> object:
            self.arrivals.drop_due()
            return predicate()

        return self.fleet.wait(arriving, timeout)

    def kill(self, kind: Kind) -> None:
        """kill -9 a worker of ``kind`` that holds a job (any, if none does in time)."""
        candidates = self.fleet.live(kind)
        busy: list[Worker] = []

        def some_busy() -> bool:
            busy[:] = [w for w in candidates if w.holds_a_job(self.redis_client)]
            return bool(busy)

        mid_job = self.wait(some_busy, BUSY_WAIT_S)
        self.fleet.kill_and_restart(self.rng.choice(busy or candidates), mid_job)

    def lose_host(self) -> None:
        """Once files wait in its queue: both its workers killed for good, its disk gone."""
        host_queue = f"{QUEUE_TRANSCRIBE}:{self.lost_host}"

        def files_waiting() -> bool:
            # Queued for the host or claimed by its gpu worker: a gpu worker that keeps
            # up (a quiet machine) claims its queue as soon as files arrive, so the
            # queue alone may never hold several.
            try:
                held = int(self.redis_client.llen(host_queue))
                for key in self.redis_client.scan_iter(
                    match=f"{PROCESSING_PREFIX}gpu:{self.lost_host}:*"
                ):
                    held += int(self.redis_client.llen(key))
            except redis.exceptions.RedisError:
                return False
            return held >= HOST_QUEUE_MIN

        queued = self.wait(files_waiting, HOST_QUEUE_WAIT_S)
        assert queued, (
            f"{self.lost_host} never held {HOST_QUEUE_MIN} files (queued or claimed) in "
            f"{HOST_QUEUE_WAIT_S:.0f} s: "
            "the host could not be lost with work queued (a schedule too late?); "
            f"{services(self.shared)}\n"
            f"queues: {json.dumps(queue_status(self.redis_client), indent=1, default=str)}"
        )
        for w in self.fleet.workers:
            if w.host == self.lost_host:
                w.lost = True
                w.kill()
        self.lost_queued = int(self.redis_client.llen(host_queue))
        shutil.rmtree(self.root / self.lost_host)


# -- what the test watches ---------------------------------------------------------


def read_progress(db: str, batches: int, files: int) -> dict[Measure, float] | None:
    """Shares reached so far; None while PostgreSQL is away."""
    try:
        with psycopg.connect(db, connect_timeout=2) as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM batches WHERE transferred_at IS NOT NULL),"
                " (SELECT count(*) FROM batches WHERE unpacked_at IS NOT NULL),"
                " (SELECT count(*) FROM audio_files WHERE status = 'done')"
            ).fetchone()
    except psycopg.OperationalError:
        return None
    assert row is not None
    return {
        Measure.TRANSFERRED: row[0] / batches,
        Measure.UNPACKED: row[1] / batches,
        Measure.DONE: row[2] / files,
    }


def all_batches_done(db: str, batches: int) -> bool:
    try:
        with psycopg.connect(db, connect_timeout=2) as conn:
            row = conn.execute("SELECT count(*) FROM batches WHERE status = 'done'").fetchone()
    except psycopg.OperationalError:
        return False
    return row is not None and row[0] == batches


def leftovers(r: redis.Redis) -> dict[str, int]:
    """Every queue item, processing list, delayed retry and unsettled dead letter left
    (the dead letters themselves are counted apart)."""
    left: dict[str, int] = {}
    for key in r.scan_iter(match="queue:*", count=500):
        if key != QUEUE_FAILED and r.type(key) == "list" and r.llen(key):
            left[key] = r.llen(key)
    for pattern in (PROCESSING_PREFIX + "*", UNSETTLED_PREFIX + "*"):
        for key in r.scan_iter(match=pattern, count=500):
            if r.llen(key):
                left[key] = r.llen(key)
    if r.zcard(DELAYED_KEY):
        left[DELAYED_KEY] = r.zcard(DELAYED_KEY)
    return left


def quiet(r: redis.Redis) -> bool:
    try:
        return not leftovers(r)
    except redis.exceptions.RedisError:
        return False


def count_events(log_dir: Path, event: str, field_name: str | None = None) -> int:
    """Lines of ``event`` in every log, or the sum of their ``field_name=N``."""
    pattern = re.compile(rf"event={re.escape(event)}\b(?:.*?\b{field_name}=(\d+))?")
    total = 0
    for log in log_dir.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            match = pattern.search(line)
            if match:
                total += int(match.group(1) or 0) if field_name else 1
    return total


def services(shared: devstack.Stack) -> str:
    """Whether the shared S3 and sshd answer: a test session that started the shared
    stack stops it when it ends, which no worker rides out."""
    up = devstack.status(shared)
    return "shared stack: " + ", ".join(
        f"{name} {'up' if up[name] else 'DOWN'}" for name in ("s3", "sshd")
    )


def error_lines(log_dir: Path, limit: int = 30) -> str:
    lines = [
        f"{log.name}: {line}"
        for log in sorted(log_dir.glob("*.log"))
        for line in log.read_text(errors="replace").splitlines()
        if "level=error" in line.lower() or "Traceback" in line
    ]
    return "\n".join(lines[-limit:])


# -- the final account ---------------------------------------------------------------


@dataclass
class Account:
    """What must all be zero, with the details that explain a non-zero."""

    files_lost: list[str] = field(default_factory=list)
    duplicate_rows: dict[str, int] = field(default_factory=dict)
    working_rows: list[str] = field(default_factory=list)
    queue_items_left: dict[str, int] = field(default_factory=dict)
    dead_letters: list[str] = field(default_factory=list)
    extra_files: list[str] = field(default_factory=list)
    wer: dict[str, float] = field(default_factory=dict)  # file -> its transcript's WER

    def zeros(self) -> dict[str, int]:
        return {
            "files lost": len(self.files_lost),
            "duplicate rows": sum(self.duplicate_rows.values()),
            "rows in a working state": len(self.working_rows),
            "queue items left": sum(self.queue_items_left.values()),
            "dead letters": len(self.dead_letters),
            "rows from no archive": len(self.extra_files),
        }


def take_account(
    db: str, r: redis.Redis, samples: dict[str, SampleBatch], policies: int
) -> Account:
    account = Account()
    with psycopg.connect(db) as conn:
        files = conn.execute(
            "SELECT a.batch_id, a.rel_path, a.status, a.duration_s, t.text,"
            " (SELECT count(DISTINCT c.policy_id) FROM classifications c"
            "   WHERE c.audio_id = a.id) AS verdicts"
            " FROM audio_files a LEFT JOIN transcripts t ON t.audio_id = a.id"
        ).fetchall()
        duplicates = conn.execute(
            "SELECT (SELECT count(*) - count(DISTINCT (batch_id, rel_path)) FROM audio_files),"
            " (SELECT count(*) - count(DISTINCT audio_id) FROM transcripts),"
            " (SELECT count(*) - count(DISTINCT (audio_id, policy_id, model))"
            "  FROM classifications),"
            " (SELECT count(*) FROM classifications) - %s * (SELECT count(*) FROM transcripts)",
            (policies,),
        ).fetchone()
        batches = conn.execute(
            "SELECT b.batch_id, b.status, b.files_failed, b.error,"
            " count(a.id) FILTER (WHERE a.status = 'done'), count(a.id)"
            " FROM batches b LEFT JOIN audio_files a USING (batch_id)"
            " GROUP BY b.batch_id ORDER BY b.batch_id"
        ).fetchall()
    assert duplicates is not None
    account.duplicate_rows = {
        name: n
        for name, n in zip(
            ("audio_files", "transcripts", "classifications", "classifications per transcript"),
            duplicates,
            strict=True,
        )
        if n
    }
    found = {(b, rel): (status, dur, text, n) for b, rel, status, dur, text, n in files}
    for batch_id, sample in samples.items():
        for rel, seconds in sample.durations.items():
            got = found.get((batch_id, rel))
            if got is None:
                account.files_lost.append(f"{batch_id}/{rel}: no row")
                continue
            status, duration, text, verdicts = got
            if status != "done" or not text or verdicts != policies:
                account.files_lost.append(
                    f"{batch_id}/{rel}: {status}, transcript {text!r}, {verdicts} verdicts"
                )
            elif duration is None or abs(duration - seconds) > DURATION_TOLERANCE_S:
                account.files_lost.append(
                    f"{batch_id}/{rel}: {duration} s of audio, {seconds:.2f} s in the archive"
                )
            else:
                account.wer[f"{batch_id}/{rel}"] = wer(sample.manifest[rel], text)
    expected = {(b, rel) for b, s in samples.items() for rel in s.manifest}
    account.extra_files = [f"{b}/{rel}" for b, rel in found if (b, rel) not in expected]
    account.working_rows = [
        f"file {b}/{rel}: {status}" for (b, rel), (status, *_) in found.items() if status != "done"
    ] + [
        f"batch {b}: {status} with {done} of {n} files done "
        f"(files_failed={failed}, error={error!r})"
        for b, status, failed, error, done, n in batches
        if status != "done" or failed
    ]
    missing = set(samples) - {b for b, *_ in batches}
    account.working_rows += [f"batch {b}: no row" for b in sorted(missing)]
    account.queue_items_left = leftovers(r)
    account.dead_letters = r.lrange(QUEUE_FAILED, 0, -1)
    return account


# -- the test ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_stack() -> Iterator[devstack.Stack]:
    with running_private_stack("chaos-stack-") as stack:
        yield stack


@pytest.fixture
def collection(stack_env: dict[str, str]) -> Iterator[Path]:
    """This test's own directory on the collection host (the shared stack's sshd)."""
    path = Path(stack_env["COLLECTION_DIR"]) / f"chaos-{uuid.uuid4().hex[:10]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_archives(out: Path, rng: random.Random) -> dict[str, SampleBatch]:
    samples = {}
    for i in range(ARCHIVES):
        batch_id = f"chaos-{i:02d}"
        samples[batch_id] = make_speech_batch(
            out,
            batch_id,
            n_files=rng.randint(*FILES_PER_ARCHIVE),
            seed=rng.randrange(1 << 30),
            min_seconds=SPEECH_S[0],
            max_seconds=SPEECH_S[1],
            cache_dir=out / "wav-cache",
        )
    return samples


def drop(sample: SampleBatch, collection: Path) -> None:
    """Land an archive on the collection host at once, as a finished upload."""
    hidden = collection / f".{sample.tar_path.name}.partial"
    shutil.copyfile(sample.tar_path, hidden)
    hidden.rename(collection / sample.tar_path.name)


def build_fleet(
    st: devstack.Stack,
    stack_env: dict[str, str],
    bucket: str,
    collection: Path,
    root: Path,
    log_dir: Path,
) -> Fleet:
    common = {
        **{k: v for k, v in stack_env.items() if k.startswith("S3_")},
        "S3_BUCKET": bucket,
        **backend_env(st),
        "MODELS_ROOT": str(root / "models"),
    }
    workers = [
        Worker(
            "transfer",
            Kind.TRANSFER,
            COLLECTOR,
            {
                **common,
                **{k: v for k, v in stack_env.items() if k.startswith("COLLECTION_SSH_")},
                "COLLECTION_DIR": str(collection),
                "WORKER_HOST": COLLECTOR,
                "SCRATCH_ROOT": str(root / COLLECTOR),
                "TRANSFER_STABLE_S": "0.3",
                "TRANSFER_POLL_S": "0.2",
                "TRANSFER_RETRY_BASE_S": "0.2",
            },
            log_dir,
        )
    ]
    for host in HOSTS:
        on_host = {**common, "WORKER_HOST": host, "SCRATCH_ROOT": str(root / host)}
        workers.append(
            Worker(
                f"unpack-{host}",
                Kind.UNPACK,
                host,
                # A short host queue: archives are unpacked as the gpu worker keeps
                # up, so unpacking goes on (and is killed) throughout the run.
                {**on_host, "UNPACK_MIN_FREE_BYTES": "0", "UNPACK_MAX_HOST_QUEUE": "4"},
                log_dir,
            )
        )
        workers.append(
            Worker(
                f"gpu-{host}",
                Kind.GPU,
                host,
                {
                    **on_host,
                    "BATCH_SIZE": "2",
                    "ASR_DEVICE": "cpu",
                    "CLASSIFIER_DEVICE": "cpu",
                    "ASR_CPU_THREADS": "1",
                    # One host claims ahead, so kills also meet look-ahead jobs.
                    "PREFETCH": "1" if host == HOSTS[1] else "0",
                },
                log_dir,
            )
        )
    return Fleet(workers)


def test_nothing_is_lost_under_kills_restarts_and_a_lost_host(
    private_stack: devstack.Stack,
    stack: devstack.Stack,
    stack_env: dict[str, str],
    bucket: str,
    collection: Path,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    started = time.monotonic()
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1 << 31))
    rng = random.Random(seed)
    plan = chaos_plan(rng)
    lost_host = rng.choice(HOSTS)
    print(f"chaos seed {seed} (replay with CHAOS_SEED={seed}); plan: {'; '.join(map(str, plan))}")
    st = private_stack
    db = pipeline_url(st)
    r = redis_client(st)
    r.flushall()

    samples = make_archives(tmp_path / "archives", rng)
    total_files = sum(len(s.manifest) for s in samples.values())
    with psycopg.connect(db) as conn:
        for name, terms in POLICIES.items():
            add_policy(conn, name, f"# {name.title()}", lexicon=terms)
    (tmp_path / "models").mkdir()
    install_whisper(tmp_path / "models")
    for host in (COLLECTOR, *HOSTS):
        (tmp_path / host).mkdir()
    log_dir = Path(os.environ.get("CHAOS_LOG_DIR") or tmp_path / "logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    fleet = build_fleet(st, stack_env, bucket, collection, tmp_path, log_dir)

    arrivals = Arrivals(list(samples.values()), collection)
    chaos = Chaos(fleet, st, stack, r, rng, lost_host, tmp_path, arrivals)
    account: Account | None = None
    codes: dict[str, int] = {}
    work_s = 0.0

    try:
        fleet.start()
        work_started = chaos.started = last_change = time.monotonic()
        last_progress: dict[Measure, float] | None = None
        pending = list(plan)
        while True:
            fleet.check()
            arrivals.drop_due()
            now = time.monotonic()
            progress = read_progress(db, ARCHIVES, total_files)
            if progress is not None:
                due = [d for d in pending if progress[d.measure] >= d.at]
                if due:
                    pending.remove(due[0])
                    chaos.fire(due[0])
                    continue
                if progress != last_progress:
                    last_progress, last_change = progress, now
            if not arrivals.pending and not pending and quiet(r):
                if all_batches_done(db, ARCHIVES):
                    break
                if now - last_change > STALL_S:
                    break  # nothing moves any more: the account says what is stuck
            assert now - work_started < WORK_TIMEOUT_S, (
                f"the work did not finish in {WORK_TIMEOUT_S:.0f} s (progress {progress}); "
                f"disruptions not yet fired: {[str(d) for d in pending]}; {services(stack)}\n"
                f"queues: {json.dumps(queue_status(r), indent=1, default=str)}\n"
                f"errors in the logs:\n{error_lines(log_dir)}"
            )
            time.sleep(0.2)
        work_s = time.monotonic() - work_started
        fleet.wait(lambda: quiet(r), QUIET_TIMEOUT_S)
        fleet.check()
        account = take_account(db, r, samples, len(POLICIES))
    finally:
        codes = fleet.stop()
        figures = report(
            seed=seed,
            samples=samples,
            fleet=fleet,
            chaos=chaos,
            log_dir=log_dir,
            db=db,
            account=account,
            codes=codes,
            scratch_left={
                place: sorted(
                    str(f.relative_to(tmp_path / place))
                    for f in (tmp_path / place).rglob("*")
                    if f.is_file()
                )
                for place in (COLLECTOR, *HOSTS)
                if place != lost_host
            },
            work_s=work_s,
            total_s=time.monotonic() - started,
        )
        record_property(SUMMARY_PROPERTY, figures)
        print(figures)

    assert account is not None
    assert not account.files_lost, f"files lost: {account.files_lost}"
    assert not account.extra_files, f"rows for files in no archive: {account.extra_files}"
    assert not account.duplicate_rows, f"duplicate rows: {account.duplicate_rows}"
    assert not account.working_rows, f"rows left in a working state: {account.working_rows}"
    assert not account.queue_items_left, f"left in Redis: {account.queue_items_left}"
    assert not account.dead_letters, f"dead letters: {account.dead_letters}"
    assert codes == {w.name: 0 for w in fleet.workers if not w.lost}, (
        f"exit codes on SIGTERM: {codes}\n{error_lines(log_dir)}"
    )
    assert sorted(p.name for p in collection.iterdir()) == ["transferred"]
    assert len(list((collection / "transferred").iterdir())) == ARCHIVES
    s3 = s3_utils.client_from_env({**stack_env, "S3_BUCKET": bucket})
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="audio/").get("KeyCount", 0)
    assert listed == total_files, f"{listed} Opus objects in S3 for {total_files} files"
    assert fleet.kills == {kind: KILLS_PER_KIND for kind in Kind}, fleet.kills
    assert set(chaos.restarts) == {"redis", "postgres"}
    survivors = [h for h in HOSTS if h != lost_host]
    moved = count_events(log_dir, "queue.host_lost", "moved")
    lost_queued = chaos.lost_queued
    assert lost_queued is not None
    assert moved >= lost_queued, (
        f"{lost_queued} files waited for {lost_host} when it was lost, but the reaper "
        f"moved {moved} to {QUEUE_TRANSCRIBE} (the {survivors[0]} workers' logs)"
    )
    # its scratch went with it: what it had unpacked came from S3
    assert count_events(log_dir, "gpu.fetched") >= 1


def report(
    *,
    seed: int,
    samples: dict[str, SampleBatch],
    fleet: Fleet,
    chaos: Chaos,
    log_dir: Path,
    db: str,
    account: Account | None,
    codes: dict[str, int],
    scratch_left: dict[str, list[str]],
    work_s: float,
    total_s: float,
) -> str:
    """The figures of one run, for the terminal summary (also on a failure)."""
    files = sum(len(s.manifest) for s in samples.values())
    speech = sum(s.total_seconds for s in samples.values())
    kills = ", ".join(
        f"{kind} {fleet.kills[kind]} ({fleet.kills_mid_job[kind]} mid-job)" for kind in Kind
    )
    down = ", ".join(f"{name} down {s:.1f} s" for name, s in sorted(chaos.restarts.items()))
    repeated: Any = "?"
    try:
        with psycopg.connect(db, connect_timeout=2) as conn:
            row = conn.execute(
                "SELECT coalesce(sum(greatest(attempts - 1, 0)), 0) FROM audio_files"
            ).fetchone()
        repeated = row[0] if row else "?"
    except psycopg.Error:
        pass
    bad_exits = [*fleet.unexpected_exits, *(f"{n} on SIGTERM: {c}" for n, c in codes.items() if c)]
    zeros = account.zeros() if account is not None else {"(final account not reached)": -1}
    wers = account.wer.values() if account is not None else []
    worst = max(account.wer.items(), key=lambda kv: kv[1]) if wers else ("-", 0.0)
    return "\n".join(
        [
            f"chaos seed {seed} (replay: CHAOS_SEED={seed})",
            f"archives {len(samples)}, files {files} ({speech:.0f} s of speech), "
            f"policies {len(POLICIES)}",
            f"kills -9: {kills}",
            (
                f"lost host {chaos.lost_host}: both workers killed with {chaos.lost_queued} files "
                f"in its queue; moved to {QUEUE_TRANSCRIBE} by the reaper: "
                f"{count_events(log_dir, 'queue.host_lost', 'moved')}"
                if chaos.lost_queued is not None
                else f"host {chaos.lost_host} not lost: the run ended before"
            ),
            f"restarts: {down or 'none'}",
            f"jobs retried {count_events(log_dir, 'job.retry')}, returned by the reaper "
            f"{count_events(log_dir, 'reaper.returned', 'jobs')}, recovered at start "
            f"{count_events(log_dir, 'worker.recovered', 'jobs')}, lost ownership "
            f"{count_events(log_dir, 'job.lost_ownership')}, files transcribed again {repeated}, "
            f"Opus fetched from S3 {count_events(log_dir, 'gpu.fetched')}",
            f"transcripts' word error rate: mean {sum(wers) / max(1, len(wers)):.2f}, "
            f"worst {worst[1]:.2f} ({worst[0]})",
            f"outage lines: redis.unavailable {count_events(log_dir, 'redis.unavailable')}, "
            f"postgres.unavailable {count_events(log_dir, 'postgres.unavailable')}",
            "files left in scratch (not required to be none): "
            + ", ".join(
                f"{place} {len(left)}" + (f" {left[:3]}" if left else "")
                for place, left in scratch_left.items()
            ),
            f"duration: {total_s:.0f} s in all, "
            + (f"{work_s:.0f} s" if work_s else "not reached")
            + " from the first archive to the end of the work",
            "disruptions: " + "; ".join(chaos.fired),
            ", ".join(f"{name} {n}" for name, n in zeros.items())
            + f", worker exits but the kills {len(bad_exits)}"
            + (f" {bad_exits}" if bad_exits else ""),
        ]
    )


# -- a race the chaos can meet: a redelivered unpack job and its batch's last file -------


def test_a_redelivered_unpack_job_that_meets_its_batch_finished_leaves_it_done(
    pipeline_env: dict[str, str],
    settings: Settings,
    db_conn: psycopg.Connection[Any],
    redis_client: redis.Redis,
    s3_client: Any,
    tmp_path: Path,
) -> None:
    """What a kill -9 between the unpack worker's last push and its ack leads to: the
    reaper hands the job back, and the gpu worker stores the batch's last file while the
    redelivered job holds the batch (after its mark_unpacking, before its mark_unpacked)."""
    install_whisper(settings.models_root)
    sample = make_speech_batch(tmp_path / "sample", "b-race", n_files=2, seed=7, max_seconds=3)
    key = s3_utils.archive_key("b-race")
    s3_utils.upload_file(s3_client, settings.s3_bucket, sample.tar_path, key)
    job = json.dumps({"batch_id": "b-race", "s3_key": key})

    def drain(module: str) -> None:
        code, out = finish(start_module(module, pipeline_env, ["--drain"]), 180)
        assert code == 0, out

    redis_client.rpush(QUEUE_UNPACK, job)
    drain(MODULES[Kind.UNPACK])  # unpacked, its files queued; then killed before the ack
    redis_client.rpush(QUEUE_UNPACK, job)  # the reaper hands the job back
    # The redelivery takes the batch before the gpu worker stores its last file...
    mark_unpacking(db_conn, "b-race", key, settings.worker_host)
    db_conn.commit()
    drain(MODULES[Kind.GPU])
    drain(MODULES[Kind.UNPACK])  # ...and ends after it
    rows = db_conn.execute(
        "SELECT b.status, count(a.id) FILTER (WHERE a.status = 'done') AS done"
        " FROM batches b JOIN audio_files a USING (batch_id)"
        " WHERE b.batch_id = 'b-race' GROUP BY b.status"
    ).fetchall()
    assert [r["done"] for r in rows] == [2], rows
    # The redelivered job completes the batch: the gpu worker that stored the last file
    # saw it 'unpacking' and had to leave it.
    assert rows[0]["status"] == "done", f"batch b-race is {rows[0]['status']!r}, files all done"
