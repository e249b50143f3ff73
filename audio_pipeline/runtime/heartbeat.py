"""The side thread of every worker: its heartbeat hash and the reaper.

The heartbeat hash ``worker:{worker_id}`` (what ``audio-pipeline status`` shows)
expires unless refreshed; the reaper, run here by every worker whatever it
consumes, returns the in-flight jobs of workers whose hash has expired.

The thread never dies: an error is logged and the next beat comes. While Redis is
away it tries again with jittered backoff, never slower than the beat interval; once
Redis is back it beats at once but waits before reaping, because every hash expired
during the outage and the other live workers need a moment to beat again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from audio_pipeline.config import EnvReader, EnvSettings
from audio_pipeline.logs import log_event
from audio_pipeline.queue import JobQueue
from audio_pipeline.runtime.outage import RECONNECT_CAP_S, Backend, Backoff, redis_unavailable

DEFAULT_HEARTBEAT_INTERVAL_S = 5.0  # between heartbeat refreshes
DEFAULT_HEARTBEAT_TTL_S = 30.0  # a worker silent this long is presumed dead and reaped
DEFAULT_REAPER_INTERVAL_S = 60.0  # between reaper runs (each also runs at start)
# After Redis comes back the reaper waits the TTL plus this: long enough for every live
# worker to notice (its reconnect backoff is capped) and beat again.
REAP_GRACE_AFTER_OUTAGE_S = 2 * RECONNECT_CAP_S


@dataclass(frozen=True)
class HeartbeatTimings(EnvSettings):
    """How often a worker proves it is alive and reaps the dead, in seconds."""

    interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    ttl_s: float = DEFAULT_HEARTBEAT_TTL_S
    reaper_interval_s: float = DEFAULT_REAPER_INTERVAL_S

    @classmethod
    def read(cls, env: EnvReader) -> HeartbeatTimings:
        return cls(
            interval_s=env.seconds("WORKER_HEARTBEAT_INTERVAL_S", DEFAULT_HEARTBEAT_INTERVAL_S),
            ttl_s=env.seconds("WORKER_HEARTBEAT_TTL_S", DEFAULT_HEARTBEAT_TTL_S),
            reaper_interval_s=env.seconds("WORKER_REAPER_INTERVAL_S", DEFAULT_REAPER_INTERVAL_S),
        )


class Heartbeat:
    """Refreshes the hash with ``fields()`` every ``interval_s`` and reaps now and then."""

    def __init__(
        self,
        queue: JobQueue,
        timings: HeartbeatTimings,
        fields: Callable[[], Mapping[str, Any]],
        log: logging.Logger,
        redis_backend: Backend | None = None,
    ) -> None:
        self.queue = queue
        self.timings = timings
        self.fields = fields
        self.log = log
        self.redis_backend = redis_backend or Backend("redis", log, stage=queue.stage)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread; the caller beats once first, so the reaper never sees us
        as dead before our first claim."""
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{self.queue.stage}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def beat(self) -> None:
        self.queue.heartbeat(self.timings.ttl_s, self.fields())

    def _run(self) -> None:
        next_reap = time.monotonic() + self.timings.reaper_interval_s
        backoff = Backoff(cap_s=min(RECONNECT_CAP_S, self.timings.interval_s))
        wait = self.timings.interval_s
        while not self._stop.wait(wait):
            wait = self.timings.interval_s
            try:
                self.beat()
                self.redis_backend.succeeded()
                backoff.reset()
                if time.monotonic() >= next_reap and self._reap_allowed():
                    next_reap = time.monotonic() + self.timings.reaper_interval_s
                    self.queue.reap()
            except Exception as exc:  # whatever it is, the next beat must still come
                if redis_unavailable(exc):
                    self.redis_backend.failed(exc)
                    wait = backoff.next_delay()
                elif isinstance(exc, redis.exceptions.RedisError):
                    log_event(
                        self.log, "worker.heartbeat_failed", level=logging.ERROR, error=str(exc)
                    )
                else:
                    self.log.exception("heartbeat thread error (it carries on)")

    def _reap_allowed(self) -> bool:
        hold_off = self.timings.ttl_s + REAP_GRACE_AFTER_OUTAGE_S
        return self.redis_backend.seconds_since_recovery() >= hold_off
