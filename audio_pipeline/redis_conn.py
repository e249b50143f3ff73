"""Redis connections for workers and tools (password, timeouts, health checks)."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from audio_pipeline.config import Settings, load_settings

SOCKET_TIMEOUT = 30.0  # seconds; must exceed the longest blocking claim timeout
HEALTH_CHECK_INTERVAL = 15  # seconds between PINGs on an idle pooled connection
# A few quick retries absorb a dropped pooled connection (a Redis restart); a longer
# outage is left to the caller's own backoff (runtime.outage), which logs it once.
CLIENT_RETRIES = 3
CLIENT_RETRY_CAP_S = 0.5


def get_redis(settings: Settings | None = None) -> redis.Redis:
    """A client with decoded strings; queue payloads are JSON text."""
    s = settings or load_settings()
    return redis.Redis(
        host=s.redis_host,
        port=s.redis_port,
        db=s.redis_db,
        password=s.redis_password,
        decode_responses=True,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=5.0,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        retry=Retry(
            ExponentialWithJitterBackoff(base=0.05, cap=CLIENT_RETRY_CAP_S), CLIENT_RETRIES
        ),
    )
