"""The process service every worker runs as: loop, run modes, signals, heartbeat.

A service repeats one turn, ``iterate()``, until it is stopped or its run mode says
it is done:

    forever  a systemd service: until SIGTERM/SIGINT
    once     one turn that did work, or one that found nothing left (``drained()``)
    drain    until a turn does nothing and ``drained()`` says nothing is left

Shutdown is two-stage (like RQ's warm and cold stop): the first SIGTERM/SIGINT sets
``stopping``, so the turn in hand may finish and the loop ends, and starts the stop
grace (WORKER_STOP_GRACE_S). A second signal, or the grace running out first, sets
``stop_forced`` and, while the service is inside ``interruptible()``, raises
ShutdownForced there to abandon the work in hand: child processes (ffmpeg) are
terminated and ``on_forced_stop`` gives the work back unspent (a queue worker
releases its jobs to the head of their queues, no attempt counted). So a deploy
never waits past the grace and never costs an attempt; the units set a grace
shorter than their TimeoutStopSec, which stays the hard bound. Either way the exit
code is 0 unless the run itself set ``exit_code``.

A side thread keeps the heartbeat hash alive (what ``audio-pipeline status`` shows)
and runs the reaper, which returns the jobs of workers whose heartbeat lapsed; every
service runs it, whatever it consumes.

Under systemd (Type=notify, WatchdogSec=) the service tells it READY=1 once setup()
is done (so model loading is not watched), EXTEND_TIMEOUT_USEC while start-up waits
out an outage, STOPPING=1 when a stop begins, and feeds the watchdog from the main
thread only: every loop turn, every ``sleep()``, and ``alive()``, which stage code
calls at progress points of a long job. A job that hangs stops the pings, systemd
kills and restarts the process, and the reaper returns the job once the dead
worker's heartbeat lapses. The heartbeat thread never pings: it would keep a hung
worker looking alive.

A Redis or PostgreSQL outage never ends the process: start-up steps and turns that
meet one wait for the backend (``runtime.outage``: capped, jittered backoff; one
``redis.unavailable`` / ``postgres.unavailable`` line and one ``*.recovered``) and
then carry on where they stopped.

``queue_worker.QueueWorker`` builds the queue consumer on this class; the transfer
worker is a polling service built on it directly.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import redis
from psycopg_pool import ConnectionPool

from audio_pipeline.config import EnvReader, EnvSettings, Settings, read_all
from audio_pipeline.logs import log_event
from audio_pipeline.metrics import MetricsSettings, WorkerMetrics
from audio_pipeline.metrics import serve as serve_metrics
from audio_pipeline.queue import JobQueue, RetryPolicy, utc_now_iso
from audio_pipeline.redis_conn import get_redis
from audio_pipeline.runtime.heartbeat import Heartbeat, HeartbeatTimings
from audio_pipeline.runtime.outage import (
    Backend,
    Backoff,
    backend_unavailable,
    probe_postgres,
    probe_redis,
)
from audio_pipeline.runtime.systemd_notify import SystemdNotifier

T = TypeVar("T")

JOB_EXCERPT_CHARS = 500  # of the payload in hand, in the heartbeat hash
# How long the first stop signal lets the work in hand go on before it is handed
# back, where nothing sets WORKER_STOP_GRACE_S (a terminal, a test). The units set
# their own, below their TimeoutStopSec.
DEFAULT_STOP_GRACE_S = 60.0
# The grace runs out on SIGALRM, so it works whatever the main thread is blocked in.
GRACE_SIGNAL = signal.SIGALRM
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# While start-up waits out an outage, systemd is asked for this much more time past
# TimeoutStartSec at each wait: enough for setup() (model loading) once the backend
# is back, since the last extension is all the time setup() then gets.
START_EXTENSION_S = 900.0


class RunMode(StrEnum):
    FOREVER = "forever"  # a systemd service
    ONCE = "once"  # one claim (or one scan), then exit
    DRAIN = "drain"  # until the source is empty (queues and their pending retries)


class ServiceState(StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"


class ShutdownForced(BaseException):
    """Second stop signal: raised inside ``interruptible()`` to abandon the work in hand.

    A BaseException so a handler's ``except Exception`` cannot swallow it.
    """


@dataclass(frozen=True)
class ServiceTimings(EnvSettings):
    """How a worker process keeps time: its heartbeat, and the grace a stop gives the
    work in hand (WORKER_STOP_GRACE_S; 0: hand it back at the first signal)."""

    heartbeat: HeartbeatTimings = field(default_factory=HeartbeatTimings)
    stop_grace_s: float = DEFAULT_STOP_GRACE_S

    @classmethod
    def read(cls, env: EnvReader) -> ServiceTimings:
        return cls(
            heartbeat=HeartbeatTimings.read(env),
            stop_grace_s=env.seconds("WORKER_STOP_GRACE_S", DEFAULT_STOP_GRACE_S, allow_zero=True),
        )


@dataclass(frozen=True)
class ServiceConfig:
    """Everything a worker process reads from its environment, read once at start-up."""

    settings: Settings
    timings: ServiceTimings
    retry: RetryPolicy
    stage: Any  # the stage's own settings: ``read_stage_settings``
    metrics: MetricsSettings = field(default_factory=MetricsSettings)


def read_service_config(
    service_cls: type[Service], environ: Mapping[str, str] | None = None
) -> ServiceConfig:
    """Read every setting ``service_cls`` needs with one reader, so a ConfigError
    lists every missing or malformed variable of the process at once."""
    env = EnvReader(environ)
    config = ServiceConfig(
        settings=Settings.read(env),
        timings=ServiceTimings.read(env),
        retry=RetryPolicy.read(env),
        stage=service_cls.read_stage_settings(env),
        metrics=MetricsSettings.read(env),
    )
    env.raise_if_errors()
    return config


@dataclass(frozen=True)
class InHand:
    """The work a service holds now, as heartbeats, `status` and stop lines show it."""

    ids: str = ""  # short ids (or a batch id), comma-separated
    excerpt: str = ""  # the payload, cut to JOB_EXCERPT_CHARS
    count: int = 0  # jobs (or archives) in hand
    ahead: int = 0  # jobs claimed ahead and being prepared


class Service:
    """Base of every worker process; see the module docstring for the contract."""

    stage: str = ""
    # The stage's own settings class, read with the shared ones by read_service_config.
    stage_settings_class: type[EnvSettings] | None = None

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        mode: RunMode = RunMode.FOREVER,
        worker_id: str | None = None,
        timings: ServiceTimings | None = None,
        retry: RetryPolicy | None = None,
        stage_settings: Any = None,
        metrics: MetricsSettings | None = None,
    ) -> None:
        """With ``settings`` given, nothing is read from the environment: ``timings``,
        ``retry``, ``stage_settings`` and ``metrics`` not given are the built-in defaults (what
        ``read_stage_settings`` makes of an empty environment). Without, every one is
        read from it. ``worker_id`` defaults to ``{stage}:{host}:{pid}``; pass one only
        to run several workers in one process (tests), since ids must be unique."""
        if not self.stage:
            raise TypeError(f"{type(self).__name__} must set the class attribute 'stage'")
        if settings is None:
            config = read_service_config(type(self))
            settings, timings, retry = config.settings, config.timings, config.retry
            stage_settings = config.stage if stage_settings is None else stage_settings
            metrics = config.metrics if metrics is None else metrics
        elif stage_settings is None:
            stage_settings = read_all(type(self).read_stage_settings, {})
        self.settings = settings
        self.stage_settings = stage_settings
        self.timings = timings or ServiceTimings()
        self.mode = RunMode(mode)
        self.worker_id = worker_id or f"{self.stage}:{self.settings.worker_host}:{os.getpid()}"
        self.log = logging.getLogger(f"audio_pipeline.workers.{self.stage}")
        self.redis: redis.Redis = get_redis(self.settings)
        # Registration, heartbeats and the reaper go through the queue's registry.
        self.queue = JobQueue(
            self.redis, self.worker_id, self.stage, retry_policy=retry or RetryPolicy()
        )
        self.stopping = False
        self.exit_code = 0  # a subclass sets 1 when --once/--drain could not do its work
        self.state = ServiceState.STARTING
        self._stop_forced = False
        self._interruptible = False  # True only inside interruptible()
        self._signals_installed = False  # handlers (and the grace timer) are ours
        # systemd's notify socket, opened by work(): nothing reads the environment
        # before that (a process given its settings reads no other).
        self._systemd: SystemdNotifier | None = None
        self._ready = False  # setup() done: READY=1 sent, the watchdog armed
        self._db: ConnectionPool | None = None
        self._db_lock = threading.Lock()  # a side thread may be the first to ask
        self._started_at = utc_now_iso()
        # One per backend and process: the main loop and the heartbeat thread share
        # them, so an outage is logged once, not once per thread or per retry.
        # Counted from here on; served on METRICS_PORT once work() starts.
        self.metrics = WorkerMetrics(self.stage, self.settings.worker_host)
        self._metrics_settings = metrics or MetricsSettings()
        self.backends = {
            name: Backend(
                name,
                self.log,
                on_change=self.metrics.backend_available,
                stage=self.stage,
                worker=self.worker_id,
            )
            for name in ("redis", "postgres")
        }
        self.heartbeat = Heartbeat(
            self.queue,
            self.timings.heartbeat,
            self._heartbeat_fields,
            self.log,
            self.backends["redis"],
        )

    # -- what a service built on this one provides ---------------------------------

    @classmethod
    def read_stage_settings(cls, env: EnvReader) -> Any:
        """The stage's own settings (read at start-up with the others); None: none."""
        return None if cls.stage_settings_class is None else cls.stage_settings_class.read(env)

    def iterate(self) -> bool:
        """One turn of the loop; True when it did (or tried) some work."""
        raise NotImplementedError

    def drained(self) -> bool:
        """True when nothing is left for this service (--once and --drain stop then)."""
        raise NotImplementedError

    def in_hand(self) -> InHand:
        return InHand()

    def describe(self) -> dict[str, str]:
        """Fields that say what this service consumes, for worker.started and heartbeats."""
        return {}

    def on_start(self) -> None:
        """Before the reaper's first run and setup()."""

    def on_stop(self) -> None:
        """After the loop ended without a forced stop."""

    def on_forced_stop(self) -> None:
        """After ShutdownForced: give back the work abandoned in hand."""

    # -- what each stage provides ----------------------------------------------------

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
        self._systemd = SystemdNotifier(log=self.log)
        if self._systemd.watchdog_s is not None:
            # The watchdog's SIGABRT then prints every thread's stack: where it hung.
            faulthandler.enable(all_threads=True)
        port = serve_metrics(self._metrics_settings)
        if port is not None:
            self.log_stage_event("worker.metrics", addr=self._metrics_settings.addr, port=port)
        try:
            self.through_outages(self.heartbeat.beat)  # before the first claim (the reaper)
            self.heartbeat.start()
            self.through_outages(self.on_start)
            self.through_outages(self.queue.reap)
            self.through_outages(self.setup)
            self._ready = True
            self._systemd.ready(status=f"{self.stage} worker {self.worker_id}")
            self.log_stage_event(
                "worker.started", worker=self.worker_id, mode=self.mode.value, **self.describe()
            )
            while not self.stopping:
                self.alive()
                try:
                    did_work = self.iterate()
                    if self.mode is RunMode.ONCE and (did_work or self.drained()):
                        break
                    if self.mode is RunMode.DRAIN and not did_work and self.drained():
                        break
                except Exception as exc:
                    # A turn cut short by an outage holds nothing (jobs in hand are
                    # settled by the queue worker itself): wait, then turn again.
                    name = backend_unavailable(exc)
                    if name is None:
                        raise
                    self.backends[name].failed(exc)
                    self.wait_for(name)
            self.on_stop()
        except ShutdownForced:
            self._disarm_grace()
            # Nothing may still work on what goes back (an ffmpeg started just before
            # the stop): another worker may claim it at once.
            self._terminate_children()
            try:
                self.on_forced_stop()
            except Exception as exc:
                self._stopped_during_outage(exc)
        except Exception as exc:
            self._stopped_during_outage(exc)
        finally:
            self._disarm_grace()
            self.state = ServiceState.STOPPING
            self._shutdown()
        self.log_stage_event("worker.stopped", worker=self.worker_id, exit_code=self.exit_code)
        return self.exit_code

    # -- outages ---------------------------------------------------------------------

    def _stopped_during_outage(self, exc: Exception) -> None:
        """A stop came while a backend was away: exit cleanly all the same. Whatever
        was in hand stays in this worker's processing lists; the reaper returns it
        once the heartbeat lapses. Any other error is the caller's."""
        if not self.stopping or backend_unavailable(exc) is None:
            raise exc
        self.log_stage_event(
            "worker.stopped_during_outage",
            level=logging.WARNING,
            error=f"{type(exc).__name__}: {exc}",
        )

    def through_outages(self, fn: Callable[[], T]) -> T:
        """``fn()``, retried while Redis or PostgreSQL is away (until a stop).

        Only for steps that are safe to repeat from the start.
        """
        backoff = Backoff()
        failed: set[str] = set()
        while True:
            try:
                result = fn()
            except Exception as exc:
                name = backend_unavailable(exc)
                if name is None or self.stopping:
                    raise
                self.backends[name].failed(exc)
                failed.add(name)
                self.sleep(backoff.next_delay())
                continue
            for name in failed:
                self.backends[name].succeeded()  # what fn() needed is back
            return result

    def redis_call(self, fn: Callable[[], T]) -> T:
        """A Redis call that must happen (a settle, a push of results): retried while
        Redis is away. A stop ends the wait (the error is raised): the job is still in
        this worker's processing list, so nothing is lost by exiting."""
        return self.backends["redis"].call(fn, sleep=self.sleep, give_up=lambda: self.stopping)

    def wait_for(self, name: str) -> None:
        """Block until backend ``name`` answers again (or a stop is requested)."""
        backend = self.backends[name]
        probe = (
            probe_redis(self.redis)
            if name == "redis"
            else probe_postgres(self.settings.database_url)
        )
        backoff = Backoff()
        while not self.stopping:
            try:
                probe()
            except Exception as exc:
                if backend_unavailable(exc) != name:
                    raise
                backend.failed(exc)
                self.sleep(backoff.next_delay())
                continue
            backend.succeeded()
            return

    def log_stage_event(self, event: str, *, level: int = logging.INFO, **fields: Any) -> None:
        """``event`` with this service's stage as its first field, where operators look."""
        log_event(self.log, event, level=level, stage=self.stage, **fields)

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake early when a stop is requested. Keeps systemd content
        meanwhile: watchdog pings once started, more start-up time before."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            self._still_here()
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def alive(self) -> None:
        """The main loop is making progress: ping systemd's watchdog (rate-limited).

        Stage code calls it at progress points of a long job (an archive member, a
        file converted, a model batch). Only the main thread's calls count: a side
        thread that runs on while the main one hangs proves nothing.
        """
        if self._ready and self._systemd is not None and _on_main_thread():
            self._systemd.watchdog()

    def _still_here(self) -> None:
        if self._systemd is None or not _on_main_thread():
            return
        if self._ready:
            self._systemd.watchdog()
        else:  # start-up waiting out an outage: do not let systemd time it out
            self._systemd.extend_start(START_EXTENSION_S)

    def _shutdown(self) -> None:
        try:
            self.teardown()
        finally:
            self.heartbeat.stop()
            if self._systemd is not None:
                self._systemd.close()
            try:
                self.queue.unregister()
            except redis.exceptions.RedisError as exc:
                log_event(
                    self.log, "worker.unregister_failed", level=logging.WARNING, error=str(exc)
                )
            if self._db is not None:
                self._db.close()

    # -- stopping ------------------------------------------------------------------

    @property
    def stop_forced(self) -> bool:
        """A second stop signal came: work in hand should be abandoned, not finished."""
        return self._stop_forced

    def request_stop(self) -> None:
        """Ask the loop to stop after the turn in hand (what the first SIGTERM does)."""
        self.stopping = True

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """Work that a second stop signal may abandon: ShutdownForced is raised inside.

        Only for work whose every step is safe to cut: what it holds must be handed
        back by ``on_forced_stop`` or resumed by a later run.
        """
        if self._stop_forced:
            raise ShutdownForced
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    @contextmanager
    def shielded(self) -> Iterator[None]:
        """Inside ``interruptible()``, a step a forced stop must not cut in two (a claim
        and its bookkeeping): a second signal during it takes effect as it ends."""
        was, self._interruptible = self._interruptible, False
        try:
            yield
        finally:
            self._interruptible = was
        if was and self._stop_forced:
            raise ShutdownForced

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # tests may run the loop in a thread; signals stay with the runner
        for signum in (*STOP_SIGNALS, GRACE_SIGNAL):
            signal.signal(signum, self._on_stop_signal)
        self._signals_installed = True

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM/SIGINT: the first starts the grace, the second forces the stop;
        SIGALRM: the grace ran out, which forces it too. Runs on the main thread,
        whatever it is blocked in (a subprocess wait, a lock, Python code)."""
        if signum == GRACE_SIGNAL:
            if self.stopping and not self._stop_forced:  # else a stray alarm
                self._force_stop("worker.stop_grace_expired", grace_s=self.timings.stop_grace_s)
            return
        name = signal.Signals(signum).name
        if not self.stopping:
            self.stopping = True
            self.state = ServiceState.STOPPING  # shown in the heartbeat / `status`
            if self._systemd is not None:
                self._systemd.stopping(status=f"stopping on {name}")
            grace = self.timings.stop_grace_s
            self.log_stage_event(
                "worker.stop_requested",
                signal=name,
                jobs_in_hand=self.in_hand().count,
                grace_s=grace,
            )
            if grace > 0:
                if self._signals_installed:  # else the alarm is not ours to set
                    signal.setitimer(signal.ITIMER_REAL, grace)
            else:
                self._force_stop("worker.stop_grace_expired", grace_s=grace)
            return
        self._force_stop("worker.stop_forced", signal=name)

    def force_stop(self, **why: Any) -> None:
        """What a second stop signal does, for a stage whose work in hand cannot finish
        in this process (its ffmpeg got the stop signal too): hand it back now."""
        self.stopping = True
        self.state = ServiceState.STOPPING
        self._force_stop("worker.stop_forced", **why)

    def _force_stop(self, event: str, **fields: Any) -> None:
        """Abandon the work in hand: ShutdownForced inside ``interruptible()``; the
        jobs named in ``event`` go back once it has unwound (``on_forced_stop``)."""
        self._disarm_grace()
        self._stop_forced = True
        held = self.in_hand()
        self.log_stage_event(
            event, jobs_in_hand=held.count, jobs=held.ids, look_ahead=held.ahead, **fields
        )
        if self._interruptible:
            raise ShutdownForced

    def _disarm_grace(self) -> None:
        if self._signals_installed:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _terminate_children(self) -> None:
        """SIGTERM this process's children: their work was abandoned. Without it the
        exit would wait for each (an ffmpeg thread pool joins its threads)."""
        pids = terminate_children()
        if pids:
            self.log_stage_event(
                "worker.children_terminated", pids=",".join(str(pid) for pid in pids)
            )

    def _heartbeat_fields(self) -> dict[str, Any]:
        held = self.in_hand()
        return {
            "stage": self.stage,
            "host": self.settings.worker_host,
            "pid": os.getpid(),
            "state": self.state.value,
            "started_at": self._started_at,
            "job": held.ids,
            "job_raw": held.excerpt[:JOB_EXCERPT_CHARS],
            "look_ahead": held.ahead,
            **self.describe(),
        }


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def terminate_children() -> list[int]:
    """SIGTERM every child process of this one (found in /proc: Linux); their pids."""
    me = os.getpid()
    pids: list[int] = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        # after "pid (comm) ": state, ppid, ... (comm may hold spaces and parentheses)
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1] == str(me):
            pids.append(int(stat.parent.name))
    for pid in pids:
        with suppress(ProcessLookupError):  # ended meanwhile
            os.kill(pid, signal.SIGTERM)
    return pids
