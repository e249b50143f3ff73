"""The RA app's ``ra_app_*`` metrics: counted once whichever gunicorn worker served the
request, and /metrics answered only to a client on loopback that no proxy relayed.

The main test runs the real gunicorn with ra_app/gunicorn.conf.py and several
workers (prometheus-client's multiprocess mode, as the unit runs it) against the
test's PostgreSQL, opens a new connection per request so the workers share them,
and checks that a scrape adds up to exactly what was done.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest
from flask import Flask, Response
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from ra_app.extensions import db
from ra_app.metrics import WorkerFiles
from ra_app.models import Role
from tests.support.metrics_scrape import free_port
from tests.support.web import PASSWORD, add_user, make_app, seed_items, user_named

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WORKERS = 3
SERVER_START_TIMEOUT_S = 60.0
# A worker observes a request when the server closes its response, which may be just
# after the client has read it: a scrape is retried this long for the counts to settle.
SETTLE_TIMEOUT_S = 10.0
HEALTH_REQUESTS = 60
CSRF_RE = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')
LABEL_FORM = {
    "violates": "yes",
    "severity": "high",
    "categories": ["harassment", "hate_speech"],
    "notes": "slur at 0:03",
    "time_on_task_ms": "4200",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(body: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests_of(samples: Samples, endpoint: str, method: str, status: str) -> float:
    return value(
        samples,
        "ra_app_request_duration_seconds_count",
        endpoint=endpoint,
        method=method,
        status=status,
    )


# -- over the Flask test client (one process, the default registry) ---------------------


def scrape_client(client: Any, **kwargs: Any) -> Samples:
    with client.get("/metrics", **kwargs) as response:
        assert response.status_code == 200
        assert response.mimetype == "text/plain"
        return parse(response.get_data(as_text=True))


def test_metrics_refuse_a_proxied_or_remote_client(app: Flask) -> None:
    client = app.test_client()
    with client.get("/metrics") as response:
        assert response.status_code == 200
        assert "# TYPE ra_app_request_duration_seconds histogram" in response.get_data(as_text=True)
    for kwargs in (
        {"headers": {"X-Forwarded-For": "127.0.0.1"}},  # through nginx, whatever it says
        {"headers": {"Forwarded": "for=127.0.0.1"}},
        {"environ_base": {"REMOTE_ADDR": "10.0.1.50"}},  # gunicorn bound beyond loopback
    ):
        with client.get("/metrics", **kwargs) as response:
            assert response.status_code == 404, kwargs
            assert b"ra_app_" not in response.get_data()
    with client.get("/metrics", environ_base={"REMOTE_ADDR": "::1"}) as response:
        assert response.status_code == 200


def test_requests_are_labelled_by_endpoint_never_by_path(app: Flask) -> None:
    def boom() -> str:
        raise RuntimeError("a bug in a view")

    def broken_stream() -> Response:
        def chunks() -> Iterator[bytes]:
            yield b"the first rows,"
            raise RuntimeError("the database went away mid-export")

        return Response(chunks())

    app.add_url_rule("/boom", "boom", boom)
    app.add_url_rule("/broken-stream", "broken_stream", broken_stream)
    client = app.test_client()
    before = scrape_client(client)
    for path in ("/no/such/page/1", "/no/such/page/2"):
        with client.get(path) as response:
            assert response.status_code == 404
    with client.post("/healthz") as response:
        assert response.status_code == 405
    with client.open("/healthz", method="BREW") as response:
        assert response.status_code == 405
    with pytest.raises(RuntimeError):  # TESTING: the exception reaches the caller
        client.get("/boom")
    with client.get("/broken-stream") as response:
        assert response.status_code == 200  # sent before the stream broke
        with pytest.raises(RuntimeError):
            response.get_data()
    after = scrape_client(client)

    def added(endpoint: str, method: str, status: str) -> float:
        return requests_of(after, endpoint, method, status) - requests_of(
            before, endpoint, method, status
        )

    assert added("none", "GET", "404") == 2
    assert added("none", "POST", "405") == 1
    assert added("none", "other", "405") == 1
    assert added("boom", "GET", "500") == 1
    assert added("broken_stream", "GET", "500") == 1
    assert added("broken_stream", "GET", "200") == 0
    assert added("metrics", "GET", "200") == 1  # the first scrape; the second is in flight
    assert not any("/no/such" in str(labels) for _, labels in after)


def test_items_waiting_are_counted_per_policy_from_the_database(app: Flask, db_conn: Any) -> None:
    seed_items(db_conn, 3, policy="hate")
    seed_items(db_conn, 2, batch="batch-2", policy="spam")
    # Synced by the scrape itself: nobody has asked for an item yet.
    scraped = scrape_client(app.test_client())
    assert value(scraped, "ra_app_items_waiting", policy="hate") == 3
    assert value(scraped, "ra_app_items_waiting", policy="spam") == 2


def test_a_scrape_skips_a_worker_file_still_being_created(tmp_path: Path) -> None:
    """The moment between a worker creating its file and sizing it, as a scrape by
    another worker may find it: the stock collector fails on it, ours skips it."""
    (tmp_path / "counter_4242.db").touch()
    with pytest.raises(struct.error):
        list(MultiProcessCollector(CollectorRegistry(), str(tmp_path)).collect())
    assert list(WorkerFiles(CollectorRegistry(), str(tmp_path)).collect()) == []


# -- real gunicorn, several workers ------------------------------------------------------


@dataclass
class Session:
    """One client's cookie; every request goes on a new connection."""

    port: int
    cookie: str = ""
    calls: list[tuple[str, str, int]] = field(default_factory=list)

    def send(
        self,
        method: str,
        path: str,
        form: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPResponse, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = dict(headers or {})
        if self.cookie:
            sent["Cookie"] = self.cookie
        body = None
        if form is not None:
            body = urlencode(form, doseq=True)
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            text = response.read().decode()
        finally:
            conn.close()
        for cookie in response.headers.get_all("Set-Cookie") or []:
            if cookie.startswith("session="):
                self.cookie = cookie.split(";", 1)[0]
        return response.status, response, text

    def csrf(self, path: str) -> str:
        status, _, page = self.send("GET", path)
        assert status == 200, page
        found = CSRF_RE.search(page)
        assert found, f"no CSRF token on {path}"
        return found.group(1)

    def login(self, name: str, password: str = PASSWORD) -> int:
        token = self.csrf("/login")
        form = {"username": name, "password": password, "csrf_token": token}
        status, _, _ = self.send("POST", "/login", form)
        return status


@dataclass
class Server:
    env: dict[str, str]
    metrics_dir: Path
    log: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [
                    str(BIN / "gunicorn"),
                    "-c",
                    "ra_app/gunicorn.conf.py",
                    "ra_app:create_app()",
                ],
                env={**self.env, "RA_BIND": f"127.0.0.1:{self.port}"},
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            try:
                if Session(self.port).send("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(self.log.read_text())
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
        self.proc = None

    def scrape(self) -> Samples:
        status, _, body = Session(self.port).send("GET", "/metrics")
        assert status == 200, body
        return parse(body)

    def settled(self, check: Callable[[Samples], None]) -> Samples:
        """The first scrape that passes ``check`` (the last one's failure if none)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            samples = self.scrape()
            try:
                check(samples)
                return samples
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    def worker_files(self) -> set[str]:
        """The pids that wrote request timings into the shared directory."""
        return {p.stem.split("_")[-1] for p in self.metrics_dir.glob("histogram_*.db")}


@pytest.fixture
def server(ra_env: dict[str, str], db_conn: Any, tmp_path: Path) -> Iterator[Server]:
    seed_items(db_conn, 3, policy="hate")
    app = make_app(ra_env)  # the migrations, and the accounts
    add_user(app, "ann")
    add_user(app, "boss", Role.ADMIN.value)
    add_user(app, "gone")
    with app.app_context():
        user_named("gone").active = False
        db.session.commit()
        db.engine.dispose()
    metrics_dir = tmp_path / "metrics"
    env = {
        **os.environ,
        **ra_env,
        "RA_WORKERS": str(WORKERS),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "RA_ACCESS_LOG": "-",
    }
    srv = Server(env, metrics_dir, tmp_path / "gunicorn.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_metrics_add_up_across_gunicorn_workers(server: Server) -> None:
    before = server.scrape()
    assert value(before, "ra_app_items_waiting", policy="hate") == 3

    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = list(
            pool.map(lambda _: Session(server.port).send("GET", "/healthz")[0], range(60))
        )
    assert statuses == [200] * HEALTH_REQUESTS

    good = [Session(server.port) for _ in range(2)]
    assert [s.login("ann") for s in good] == [302, 302]
    boss = Session(server.port)
    assert boss.login("boss") == 302
    refused = [
        Session(server.port).login("ann", "wrong-password-1"),
        Session(server.port).login("ann", "wrong-password-2"),
        Session(server.port).login("nobody-by-this-name"),
        Session(server.port).login("gone"),  # right password, deactivated account
    ]
    assert refused == [401] * 4

    ann = good[0]
    status, claimed, _ = ann.send("POST", "/next", {"csrf_token": ann.csrf("/")})
    assert status == 302
    review = claimed.headers["Location"]
    assert "/review/" in review
    assert ann.send("GET", review)[0] == 200
    status, labelled, _ = ann.send(
        "POST", f"{review}/label", {**LABEL_FORM, "csrf_token": ann.csrf("/")}
    )
    assert status == 302
    following = labelled.headers["Location"]
    assert "/review/" in following  # on to the next item
    assert following != review
    with psycopg.connect(server.env["DATABASE_URL"]) as conn:  # ra_labels: the app's role
        (time_on_task_ms,) = conn.execute("SELECT time_on_task_ms FROM ra_labels").fetchone()
    assert Session(server.port).send("GET", "/no/such/page")[0] == 404

    def added(after: Samples, name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    def as_done(after: Samples) -> None:
        assert (
            requests_of(after, "healthz", "GET", "200")
            - requests_of(before, "healthz", "GET", "200")
            == HEALTH_REQUESTS
        )
        assert (
            requests_of(after, "auth.login", "POST", "302")
            - requests_of(before, "auth.login", "POST", "302")
            == 3
        )
        assert (
            requests_of(after, "auth.login", "POST", "401")
            - requests_of(before, "auth.login", "POST", "401")
            == 4
        )
        # 7 login forms, and 2 pages read for a CSRF token
        assert requests_of(after, "queue.index", "GET", "200") == 2
        assert (
            requests_of(after, "auth.login", "GET", "200")
            - requests_of(before, "auth.login", "GET", "200")
            == 7
        )
        assert requests_of(after, "queue.next_item", "POST", "302") == 1
        assert requests_of(after, "review.show", "GET", "200") == 1
        assert requests_of(after, "review.submit", "POST", "302") == 1
        assert requests_of(after, "none", "GET", "404") == 1
        assert added(after, "ra_app_logins_total", role="ra") == 2
        assert added(after, "ra_app_logins_total", role="admin") == 1
        assert added(after, "ra_app_login_failures_total", reason="credentials") == 3
        assert added(after, "ra_app_login_failures_total", reason="inactive") == 1
        assert added(after, "ra_app_labels_recorded_total", policy="hate") == 1
        assert added(after, "ra_app_item_review_seconds_count", policy="hate") == 1
        assert added(after, "ra_app_item_review_seconds_sum", policy="hate") == pytest.approx(
            time_on_task_ms / 1000
        )
        # one labelled, one handed out by the label's "next item": one left to hand out
        assert value(after, "ra_app_items_waiting", policy="hate") == 1

    after = server.settled(as_done)
    time.sleep(1)  # and nothing is counted twice: a later scrape says the same
    again = server.scrape()
    as_done(again)
    # Each scrape is counted by the worker that served it, like any other request.
    assert requests_of(again, "metrics", "GET", "200") > requests_of(after, "metrics", "GET", "200")
    # Prometheus's scrape and nginx's refusal aside, nothing says where it came from.
    assert all("/review/" not in str(labels) for _, labels in again)
    # The sums above spanned processes: more than one worker served requests.
    assert len(server.worker_files()) >= 2, server.worker_files()

    # Through the proxy (nginx always adds the header): refused, and not leaked.
    status, _, body = Session(server.port).send(
        "GET", "/metrics", headers={"X-Forwarded-For": "198.51.100.7"}
    )
    assert status == 404
    assert "ra_app_" not in body


def test_a_restarted_gunicorn_starts_counting_from_zero(server: Server) -> None:
    assert Session(server.port).login("ann") == 302
    server.settled(lambda s: value(s, "ra_app_logins_total", role="ra") == 1 or _fail())
    server.stop()
    assert server.worker_files(), "the stopped run left its files, as a crash would"
    server.start()
    fresh = server.scrape()
    assert value(fresh, "ra_app_logins_total", role="ra") == 0
    assert requests_of(fresh, "auth.login", "POST", "302") == 0
    assert Session(server.port).login("ann") == 302
    server.settled(lambda s: value(s, "ra_app_logins_total", role="ra") == 1 or _fail())


def _fail() -> None:
    raise AssertionError("not yet")
