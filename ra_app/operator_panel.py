"""What the operator's page shows, gathered by the functions `audio-pipeline status`
and `failed` use (queue_admin, records.batches), never a copy of them.

The pipeline's Redis is reached through OPERATOR_REDIS_URL, an ACL user of its own
(the app's REDIS_* user may touch only the login limiter's keys). Each part of the
page fails on its own: Redis down or not configured leaves the batches, PostgreSQL
down leaves the queues, and Prometheus only ever adds the trend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis
from flask import Flask, current_app
from sqlalchemy.exc import SQLAlchemyError

from audio_pipeline import dead_letter_actions, queue_admin
from audio_pipeline.records import batches as batch_records
from ra_app.extensions import db
from ra_app.queue_trend import Trend, fetch_trend

IN_FLIGHT_BATCH_LIMIT = 50  # oldest unfinished batches listed; the counts cover all
REDIS_TIMEOUT_S = 5.0  # a page must not hang on a Redis that does not answer
_CLIENT_KEY = "operator_redis"


class NotConfiguredError(RuntimeError):
    """A setting the operator's page needs is not set; the message names it."""


def operator_redis(app: Flask | None = None) -> redis.Redis:
    """The app's client for the pipeline's Redis (one pool per process)."""
    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    client = app.extensions.get(_CLIENT_KEY)
    if client is None:
        url = app.config.get("OPERATOR_REDIS_URL") or ""
        if not url:
            raise NotConfiguredError(
                "the pipeline's queues are not configured for this app (OPERATOR_REDIS_URL)"
            )
        client = redis.Redis.from_url(
            url,
            decode_responses=True,  # queue_admin compares and parses text
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
        )
        app.extensions[_CLIENT_KEY] = client
    return client  # type: ignore[no-any-return]


def pipeline_database_url() -> str:
    url = current_app.config.get("OPERATOR_DATABASE_URL") or ""
    if not url:
        raise NotConfiguredError(
            "requeueing needs the pipeline's database role (OPERATOR_DATABASE_URL), "
            "which puts the job's rows back in play; purge works without it"
        )
    return str(url)


@dataclass(frozen=True)
class DeadLetter:
    index: int
    raw: str
    entry: dict[str, Any] | None
    fingerprint: str


@dataclass
class Panel:
    """Everything on the page; a part that could not be read has an error instead."""

    queues: list[dict[str, Any]] = field(default_factory=list)
    status: dict[str, Any] | None = None
    queues_error: str | None = None
    dead_letters: list[DeadLetter] = field(default_factory=list)
    seen: dead_letter_actions.Seen | None = None
    stages: list[str] = field(default_factory=list)
    batches: dict[str, Any] | None = None
    batches_error: str | None = None
    trend: Trend | None = None
    trend_note: str | None = None
    can_requeue: bool = False


def queue_host(key: str) -> tuple[str, str]:
    """(queue, host) of a queue key: per-host queues are ``queue:<stage>:<host>``."""
    prefix, _, rest = key.partition(":")
    stage, _, host = rest.partition(":")
    return f"{prefix}:{stage}", host


def collect() -> Panel:
    panel = Panel(can_requeue=bool(current_app.config.get("OPERATOR_DATABASE_URL")))
    _collect_queues(panel)
    _collect_batches(panel)
    _collect_trend(panel)
    return panel


def _collect_queues(panel: Panel) -> None:
    try:
        r = operator_redis()
        status = queue_admin.queue_status(r)
        raws = queue_admin.read_failed(r)
    except NotConfiguredError as exc:
        panel.queues_error = str(exc)
        return
    except redis.RedisError as exc:
        panel.queues_error = f"the pipeline's Redis did not answer: {type(exc).__name__}: {exc}"
        return
    panel.status = status
    for key, depth in status["queues"].items():
        queue, host = queue_host(key)
        panel.queues.append({"key": key, "queue": queue, "host": host, "depth": depth})
    panel.dead_letters = [
        DeadLetter(i, raw, entry, dead_letter_actions.fingerprint(raw)) for i, raw, entry in raws
    ]
    # The digest of exactly the list shown: a purge deletes these and nothing else.
    panel.seen = dead_letter_actions.seen_of([raw for _, raw, _ in raws])
    panel.stages = sorted({str(e["stage"]) for _, _, e in raws if e and e.get("stage")})


def _collect_batches(panel: Panel) -> None:
    # The app's own role may read batches and audio_files; status_summary takes a
    # psycopg connection, which is the one under the session's.
    try:
        conn = db.session.connection().connection.driver_connection
        panel.batches = batch_records.status_summary(conn, IN_FLIGHT_BATCH_LIMIT)  # type: ignore[arg-type]
    except (SQLAlchemyError, psycopg.Error) as exc:
        db.session.rollback()
        panel.batches_error = f"PostgreSQL did not answer: {type(exc).__name__}"


def _collect_trend(panel: Panel) -> None:
    url = current_app.config.get("PROMETHEUS_URL") or ""
    if not url:
        panel.trend_note = "No Prometheus configured (PROMETHEUS_URL): live depths only."
        return
    trend = fetch_trend(str(url))
    if trend.error:
        panel.trend_note = f"{trend.error}: live depths only."
        return
    panel.trend = trend
