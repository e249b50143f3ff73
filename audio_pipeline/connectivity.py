"""Can this host reach Redis, PostgreSQL and S3 with its own settings and credentials?

``audio-pipeline check-connections`` runs these with a host's rendered environment
(health-check.yml does so on every worker host), so a wrong password, a closed
firewall port or a missing bucket shows up by host and service instead of as a
worker that keeps retrying. Each check makes a real round trip that needs the
credentials: an authenticated PING, ``SELECT 1`` as the pipeline role, and
HeadBucket on the pipeline's bucket. Nothing is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from audio_pipeline import s3_utils
from audio_pipeline.config import Settings
from audio_pipeline.redis_conn import get_redis

CONNECT_TIMEOUT_S = 5  # per service; a health check reports an outage, it does not wait it out
ERROR_CHARS = 300  # one error per report line


@dataclass(frozen=True)
class CheckResult:
    service: str  # redis | postgres | s3
    target: str  # where, without credentials
    ok: bool
    detail: str  # what answered, or the error as "ExceptionClass: message"
    elapsed_s: float


def _redis(settings: Settings) -> str:
    client = get_redis(settings)
    try:
        if not client.ping():
            raise RuntimeError("PING did not answer PONG")
    finally:
        client.close()
    return "PONG"


def _postgres(settings: Settings) -> str:
    with psycopg.connect(settings.database_url, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        row = conn.execute("SELECT 1, current_user").fetchone()
    assert row is not None
    return f"SELECT 1 as {row[1]}"


def _s3(settings: Settings) -> str:
    client = s3_utils.get_s3_client(settings, max_attempts=1)
    client.head_bucket(Bucket=settings.s3_bucket)
    return "HeadBucket"


def _error(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    if len(text) > ERROR_CHARS:
        text = text[: ERROR_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {text}"


def _run(service: str, target: str, check: Callable[[], str]) -> CheckResult:
    started = time.monotonic()
    try:
        detail, ok = check(), True
    except Exception as exc:  # every failure is the answer, reported by name
        detail, ok = _error(exc), False
    return CheckResult(service, target, ok, detail, round(time.monotonic() - started, 3))


def check_connections(settings: Settings) -> list[CheckResult]:
    """One result per service, in the order redis, postgres, s3."""
    s = settings
    return [
        _run("redis", f"{s.redis_host}:{s.redis_port} db {s.redis_db}", lambda: _redis(s)),
        _run(
            "postgres",
            f"{s.postgres_host}:{s.postgres_port}/{s.postgres_db} as {s.postgres_user}",
            lambda: _postgres(s),
        ),
        _run("s3", f"{s.s3_endpoint} bucket {s.s3_bucket}", lambda: _s3(s)),
    ]


def report(settings: Settings, results: list[CheckResult]) -> dict[str, Any]:
    return {
        "host": settings.worker_host,
        "ok": all(r.ok for r in results),
        "checks": [asdict(r) for r in results],
    }
