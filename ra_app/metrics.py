"""The RA app's Prometheus metrics (``ra_app_*``), served at /metrics to monitoring only.

gunicorn runs the app in several worker processes, and a scrape reaches whichever
one accepts it. So, as prometheus-client's multiprocess mode has it, every process
writes its counters and histograms to its own files under PROMETHEUS_MULTIPROC_DIR
and a scrape sums the files of all of them, live or recycled (gunicorn.conf.py
empties the directory when the master starts and tells the client when a worker
exits). Without that variable (``flask run``, tests) the process's own registry is
served.

Every metric has labels, so importing this module in gunicorn's master (the app is
preloaded there) writes no file: the master's would outlive the directory's cleaning.

Items waiting for review are not a process's number but the database's: they are
counted from PostgreSQL by the worker that answers the scrape, once per scrape.

/metrics answers only a client on loopback that came straight to gunicorn:
Prometheus runs on the orchestrator beside it, nginx (the door open to the RAs'
networks) refuses the path and always adds X-Forwarded-For to what it passes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from enum import StrEnum
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, request
from flask.signals import request_started
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from ra_app import assignment
from ra_app.extensions import db

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The endpoint label of a request no route matched (a 404, a 405): never the raw path,
# which any client could vary without end.
NO_ENDPOINT = "none"
OTHER_METHOD = "other"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNKNOWN_POLICY = "unknown"  # a label made where the pipeline had no policy row left
# milliseconds the scrape's count may take before it is given up
QUEUE_QUERY_TIMEOUT_MS = 2000
_ENDPOINT_KEY = "ra_app.metrics.endpoint"

# seconds: from a page served from memory to a long CSV export (RA_TIMEOUT_S)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# seconds an RA spends on one item: from a glance to the cap of labels.MAX_TIME_ON_TASK_MS
REVIEW_BUCKETS = (5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 1800, 3600, 86400)

REQUEST_SECONDS = Histogram(
    "ra_app_request_duration_seconds",
    "Requests by Flask endpoint, method and status, timed until the response was sent.",
    ("endpoint", "method", "status"),
    buckets=REQUEST_BUCKETS,
)
LABELS_RECORDED = Counter(
    "ra_app_labels_recorded_total", "Labels recorded (web form and API), by policy.", ("policy",)
)
ITEM_REVIEW_SECONDS = Histogram(
    "ra_app_item_review_seconds",
    "Time an RA spent on an item, as the label records it (time on task), by policy.",
    ("policy",),
    buckets=REVIEW_BUCKETS,
)
LOGINS = Counter("ra_app_logins_total", "Successful logins, by role.", ("role",))
LOGIN_FAILURES = Counter(
    "ra_app_login_failures_total",
    "Refused logins: credentials (unknown name or wrong password) or inactive "
    "(right password, deactivated account). Rate-limited attempts are the login "
    "endpoint's 429s in ra_app_request_duration_seconds.",
    ("reason",),
)


class LoginFailure(StrEnum):
    CREDENTIALS = "credentials"
    INACTIVE = "inactive"


def login_succeeded(role: str) -> None:
    LOGINS.labels(role=role).inc()


def login_failed(reason: LoginFailure) -> None:
    LOGIN_FAILURES.labels(reason=reason.value).inc()


def label_recorded(policy: str | None, time_on_task_ms: int) -> None:
    name = policy or UNKNOWN_POLICY
    LABELS_RECORDED.labels(policy=name).inc()
    ITEM_REVIEW_SECONDS.labels(policy=name).observe(time_on_task_ms / 1000)


# -- requests ---------------------------------------------------------------------------

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def _observe(environ: dict[str, Any], status: str, started: float) -> None:
    method = environ.get("REQUEST_METHOD", "")
    REQUEST_SECONDS.labels(
        endpoint=environ.get(_ENDPOINT_KEY, NO_ENDPOINT),
        method=method if method in KNOWN_METHODS else OTHER_METHOD,
        status=status,
    ).observe(time.perf_counter() - started)


class _TimedBody:
    """The response body, observed when the server closes it: after the last byte of
    a stream (audio, an export) has gone, and also when the client left early."""

    def __init__(self, body: Iterable[bytes], done: Callable[[bool], None]) -> None:
        self._body = body
        self._done = done
        self._failed = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._body
        except Exception:  # not GeneratorExit: a client that left is no server error
            self._failed = True
            raise

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._done(self._failed)


class RequestTimer:
    """WSGI middleware around the whole app: a request that fails anywhere, in a
    before-request check, a view or halfway through a stream, is still counted (as a
    500 when the app raised rather than answered)."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Any:
        started = time.perf_counter()
        status = ["500"]

        def capture(status_line: str, headers: Any, exc_info: Any = None) -> Any:
            status[0] = status_line.split(" ", 1)[0]
            return start_response(status_line, headers, exc_info)

        try:
            body = self.app(environ, capture)
        except BaseException:
            _observe(environ, "500", started)
            raise

        def done(failed: bool) -> None:
            _observe(environ, "500" if failed else status[0], started)

        return _TimedBody(body, done)


def _note_endpoint(sender: Flask, **_: Any) -> None:
    # Routing has run when a request starts; the rule's endpoint is a bounded name.
    rule = request.url_rule
    request.environ[_ENDPOINT_KEY] = rule.endpoint if rule is not None else NO_ENDPOINT


# -- items waiting, from the database ---------------------------------------------------


class QueueCollector(Collector):
    """ra_app_items_waiting{policy}: items with a coder slot still open, per active policy.

    Synced first (as "Next item" would), so what the pipeline flagged since the last
    claim counts too: the number matters most when no RA is working. A database that
    does not answer leaves the family out of this scrape rather than failing it.
    """

    def collect(self) -> Iterator[Metric]:
        try:
            assignment.maybe_sync_queue()
            db.session.execute(text(f"SET LOCAL statement_timeout = {QUEUE_QUERY_TIMEOUT_MS}"))
            rows = db.session.execute(
                text("""
                SELECT p.name AS policy, count(i.classification_id) AS waiting
                FROM policies p
                LEFT JOIN ra_items i ON i.policy_id = p.id AND i.open_slots > 0
                WHERE p.active
                GROUP BY p.name ORDER BY p.name
                """)
            ).all()
        except SQLAlchemyError as exc:
            log.warning("metrics: items waiting not counted: %s", exc)
            return
        finally:
            db.session.rollback()
        family = GaugeMetricFamily(
            "ra_app_items_waiting",
            "Items with a coder slot open, per active policy (counted at scrape time).",
            labels=["policy"],
        )
        for row in rows:
            family.add_metric([row.policy], int(row.waiting))
        yield family


class WorkerFiles(MultiProcessCollector):
    """The workers' files, less any a worker has only just created: the client opens a
    new file empty and sizes it a moment later, and reading it in between fails the
    whole scrape (struct.error). Such a file holds no value yet, so nothing is lost."""

    def __init__(self, registry: CollectorRegistry, path: str) -> None:
        super().__init__(registry, path)
        self.path = Path(path)

    def collect(self) -> Iterable[Metric]:
        files = []
        for f in self.path.glob("*.db"):
            with contextlib.suppress(FileNotFoundError):
                if f.stat().st_size > 0:
                    files.append(str(f))
        return self.merge(files, accumulate=True)


class _Together:
    def __init__(self, *collectors: Any) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for c in self.collectors:
            yield from c.collect()


def _scrape_source() -> _Together:
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        # A fresh registry per scrape, as the client's documentation asks: the files
        # are read anew each time.
        registry = CollectorRegistry()
        WorkerFiles(registry, directory)
        return _Together(registry, QueueCollector())
    return _Together(REGISTRY, QueueCollector())


def _straight_from_loopback() -> bool:
    environ = request.environ
    # ProxyFix keeps the header; nginx always sets it, so its presence means proxied.
    if any(h in environ for h in ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")):
        return False
    try:
        return ip_address(environ.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:  # a unix socket: no address
        return False


def metrics_view() -> Any:
    if not _straight_from_loopback():
        abort(404)
    return Response(generate_latest(_scrape_source()), content_type=CONTENT_TYPE_LATEST)


def init_app(app: Flask) -> None:
    """Time every request and serve /metrics (no login: Prometheus has no session)."""
    app.wsgi_app = RequestTimer(app.wsgi_app)  # type: ignore[method-assign]
    request_started.connect(_note_endpoint, app)
    app.add_url_rule("/metrics", endpoint="metrics", view_func=metrics_view, methods=["GET"])
