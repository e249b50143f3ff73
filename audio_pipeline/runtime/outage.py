"""Riding out a Redis or PostgreSQL outage: which errors mean "the service is away",
a capped, jittered backoff, and one log line when a backend goes and one when it is back.

A worker never exits for an outage: it waits, retrying with backoff, and resumes where
it stopped. Each backend has one ``Backend`` per process, shared by the main loop and
the heartbeat thread, so an outage logs ``{name}.unavailable`` once and
``{name}.recovered`` once however many calls fail in between.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
import psycopg.errors
import redis
from psycopg_pool import PoolTimeout

from audio_pipeline.logs import log_event

T = TypeVar("T")

RECONNECT_BASE_S = 0.5  # first wait after a failed call
RECONNECT_CAP_S = 10.0  # no wait longer: a backend back is noticed within this
# Failures in a row before a backend counts as away: after a restart each pooled
# connection fails once, and that alone is no outage worth a line.
FAILURES_TO_DECLARE = 2
PROBE_TIMEOUT_S = 5  # connect timeout of a PostgreSQL availability probe

# Server-side codes that mean "this server is going or not yet there", not "your query
# is wrong": admin_shutdown, crash_shutdown, cannot_connect_now.
_PG_AWAY_STATES = {"57P01", "57P02", "57P03"}


def redis_unavailable(exc: BaseException) -> bool:
    """Redis cannot be reached (refused, reset, timed out, still loading its data).

    redis' TimeoutError is not a ConnectionError, so both are named.
    """
    return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)


def postgres_unavailable(exc: BaseException) -> bool:
    """PostgreSQL cannot be reached, as opposed to a query it refused.

    OperationalError also covers deadlocks and cancelled statements, which are the
    job's own failures: only a broken or refused connection (no SQLSTATE from the
    server, or a connection-class one) and a pool that found no connection count.
    """
    if isinstance(exc, PoolTimeout):
        return True
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in _PG_AWAY_STATES


def backend_unavailable(exc: BaseException) -> str | None:
    """Which backend (``redis``, ``postgres``) ``exc`` or its cause says is away, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if redis_unavailable(current):
            return "redis"
        if postgres_unavailable(current):
            return "postgres"
        current = current.__cause__ or current.__context__
    return None


class Backoff:
    """Capped exponential backoff with jitter, so a fleet does not reconnect in step."""

    def __init__(self, base_s: float = RECONNECT_BASE_S, cap_s: float = RECONNECT_CAP_S) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * 2**self.failures)
        self.failures += 1
        # Half fixed, half random: never a busy loop, never all hosts at once.
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.failures = 0


class Backend:
    """Whether one backend is reachable, as this process last saw it."""

    def __init__(
        self,
        name: str,
        log: logging.Logger,
        on_change: Callable[[str, bool], None] | None = None,
        **fields: str,
    ) -> None:
        self.name = name
        self.log = log
        self.fields = fields  # e.g. stage, worker: where operators look for the line
        # told (name, available) when an outage is declared and when it ends (metrics)
        self._on_change = on_change
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._first_failure: float | None = None  # of the failures since the last success
        self._failures = 0
        self._recovered_at = float("-inf")

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def seconds_since_recovery(self) -> float:
        return time.monotonic() - self._recovered_at

    def failed(self, exc: BaseException) -> None:
        """A call failed because the backend is away: log it if it just went."""
        with self._lock:
            self._failures += 1
            if self._first_failure is None:
                self._first_failure = time.monotonic()
            if self._down_since is not None or self._failures < FAILURES_TO_DECLARE:
                return
            self._down_since = self._first_failure
        if self._on_change is not None:
            self._on_change(self.name, False)
        log_event(
            self.log,
            f"{self.name}.unavailable",
            level=logging.ERROR,
            **self.fields,
            error=f"{type(exc).__name__}: {exc}",
        )

    def succeeded(self) -> None:
        """A call went through: log the recovery if the backend was away."""
        if self._first_failure is None:  # the common case, without the lock
            return
        with self._lock:
            self._first_failure = None
            if self._down_since is None:
                self._failures = 0  # a single dropped connection: no outage
                return
            down_s = time.monotonic() - self._down_since
            failures, self._failures = self._failures, 0
            self._down_since = None
            self._recovered_at = time.monotonic()
        if self._on_change is not None:
            self._on_change(self.name, True)
        log_event(
            self.log,
            f"{self.name}.recovered",
            level=logging.WARNING,
            **self.fields,
            down_s=down_s,
            failed_calls=failures,
        )

    def call(
        self,
        fn: Callable[[], T],
        *,
        sleep: Callable[[float], None],
        give_up: Callable[[], bool] = lambda: False,
    ) -> T:
        """``fn()``, retried with backoff while this backend is away.

        Errors that do not say the backend is away go to the caller at once; so does
        the outage error once ``give_up()`` says so (a forced stop).
        """
        backoff = Backoff()
        while True:
            try:
                result = fn()
            except Exception as exc:
                if backend_unavailable(exc) != self.name or give_up():
                    raise
                self.failed(exc)
                sleep(backoff.next_delay())
                continue
            self.succeeded()
            return result


def probe_redis(client: redis.Redis) -> Callable[[], object]:
    return client.ping


def probe_postgres(database_url: str) -> Callable[[], object]:
    """A fresh connection, not the pool's: the pool may still hold dead ones."""

    def probe() -> None:
        with psycopg.connect(database_url, connect_timeout=PROBE_TIMEOUT_S) as conn:
            conn.execute("SELECT 1")

    return probe
