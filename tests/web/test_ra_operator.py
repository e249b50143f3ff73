"""The operator's page (/admin/operator): what it shows, and requeue/purge through the
same code as `audio-pipeline requeue` / `purge-failed`, refused when the list changed.

Real Redis (as the role's ACL user), real PostgreSQL; the trend's Prometheus is the
one thing not on the dev stack: an unreachable one is tested, and a stand-in that
answers the query_range API with a fixed body checks the chart is drawn from it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from audio_pipeline.config import QUEUE_FAILED, QUEUE_TRANSCRIBE, QUEUE_UNPACK, Settings
from audio_pipeline.queue import ENQUEUED_FIELD, JobQueue
from ra_app.extensions import db
from tests.support.metrics_scrape import free_port
from tests.support.operator_page import dead_letter, operator_redis_user
from tests.support.rows import add_audio_file, add_batch
from tests.support.web import add_user, login, make_app

pytestmark = pytest.mark.integration

PAGE = "/admin/operator/"
REQUEUE_FORM = re.compile(
    r'name="index" value="(\d+)">\s*<input type="hidden" name="fingerprint" value="([0-9a-f]+)"'
)
PURGE_FORM = re.compile(
    r'name="count" value="(\d+)">\s*<input type="hidden" name="digest" value="([0-9a-f]+)"'
)


@pytest.fixture
def operator_url(redis_client: redis.Redis, pipeline_env: dict[str, str]) -> Iterator[str]:
    with operator_redis_user(redis_client, int(pipeline_env["REDIS_DB"])) as url:
        yield url


def _app(ra_env: dict[str, str], **extra: str) -> Iterator[Flask]:
    application = make_app({**ra_env, **extra})
    yield application
    with application.app_context():
        db.engine.dispose()


@pytest.fixture
def op_app(ra_env: dict[str, str], operator_url: str, settings: Settings) -> Iterator[Flask]:
    yield from _app(
        ra_env, OPERATOR_REDIS_URL=operator_url, OPERATOR_DATABASE_URL=settings.database_url
    )


@pytest.fixture
def op_admin(op_app: Flask) -> tuple[FlaskClient, str]:
    add_user(op_app, "boss", "admin")
    c = op_app.test_client()
    return c, login(c, "boss")


def _page(client: FlaskClient) -> str:
    response = client.get(PAGE)
    assert response.status_code == 200
    return response.get_data(as_text=True)


def _requeue_buttons(html: str) -> list[tuple[int, str]]:
    return [(int(i), f) for i, f in REQUEUE_FORM.findall(html)]


def _audit_rows(app: Flask, action: str) -> list[Any]:
    with app.app_context():
        return list(
            db.session.execute(
                text("SELECT * FROM ra_audit_log WHERE action = :a ORDER BY id"), {"a": action}
            ).mappings()
        )


def test_admin_sees_queues_workers_dead_letters_and_batches(
    op_admin: tuple[FlaskClient, str], redis_client: redis.Redis, db_conn: Any
) -> None:
    client, _ = op_admin
    redis_client.rpush(QUEUE_UNPACK, '{"batch_id": "b-wait-1"}', '{"batch_id": "b-wait-2"}')
    redis_client.rpush(f"{QUEUE_TRANSCRIBE}:gpu-07", '{"audio_id": 1, "opus_path": "/a"}')
    worker = JobQueue(redis_client, "gpu:gpu-07:42", "gpu")
    worker.heartbeat(
        60,
        {
            "stage": "gpu",
            "host": "gpu-07",
            "state": "busy",
            "job_raw": '{"audio_id": 31337}',
            "look_ahead": 2,
        },
    )
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "b-broken"})
    add_batch(db_conn, "b-flight", "unpacked", file_count=4)
    batch_files = [("a.mp3", "done"), ("b.mp3", "failed"), ("c.mp3", "pending")]
    for name, status in batch_files:
        add_audio_file(db_conn, "b-flight", name, status)
    db_conn.commit()

    html = _page(client)
    # queues, per host, with their live depths (no Prometheus configured)
    assert re.search(
        r'data-queue="queue:unpack"><td>queue:unpack</td><td></td><td class="depth">2<', html
    )
    assert re.search(
        r'data-queue="queue:transcribe:gpu-07"><td>queue:transcribe</td><td>gpu-07</td>'
        r'<td class="depth">1<',
        html,
    )
    assert "No Prometheus configured" in html
    # the live worker, its current job and look-ahead
    assert "gpu:gpu-07:42" in html
    assert "31337" in html
    assert re.search(r"<td><code>[^<]*31337[^<]*</code></td><td>2</td>", html)
    # the dead letter with its error and a requeue button; the purge and stage buttons
    assert "unpack broke" in html
    assert len(_requeue_buttons(html)) == 1
    assert 'id="purge"' in html
    assert 'data-stage="unpack"' in html
    # the batch in flight with its files' progress (done + failed of file_count)
    assert 'data-batch="b-flight"' in html
    assert '<progress max="4" value="2">' in html
    # live refresh is a static script (the CSP forbids inline ones)
    assert 'src="/static/operator.js"' in html
    assert "<script>" not in html


def test_an_ra_is_refused(op_app: Flask, redis_client: redis.Redis) -> None:
    add_user(op_app, "ann")
    client = op_app.test_client()
    token = login(client, "ann")
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "x1"})
    assert client.get(PAGE).status_code == 403
    for path, form in (
        ("requeue", {"index": "0", "fingerprint": "0" * 16}),
        ("requeue-stage", {"stage": "unpack"}),
        ("purge", {"count": "1", "digest": "0" * 32}),
    ):
        response = client.post(f"{PAGE}{path}", data={**form, "csrf_token": token})
        assert response.status_code == 403
    assert redis_client.llen(QUEUE_FAILED) == 1


def test_requeue_one_puts_the_job_and_its_rows_back_and_audits_it(
    op_app: Flask,
    op_admin: tuple[FlaskClient, str],
    redis_client: redis.Redis,
    db_conn: Any,
) -> None:
    client, token = op_admin
    add_batch(db_conn, "b-dead", "failed", error="unpack broke")
    db_conn.commit()
    dead_letter(redis_client, "gpu", QUEUE_TRANSCRIBE, {"audio_id": 5, "opus_path": "/o"})
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "b-dead"}, attempts=4)
    buttons = dict(_requeue_buttons(_page(client)))
    assert set(buttons) == {0, 1}

    response = client.post(
        f"{PAGE}requeue", data={"index": "1", "fingerprint": buttons[1], "csrf_token": token}
    )
    assert response.status_code == 302
    assert "1 job(s) requeued" in client.get(PAGE).get_data(as_text=True)
    (job,) = [json.loads(x) for x in redis_client.lrange(QUEUE_UNPACK, 0, -1)]
    assert time.time() - job.pop(ENQUEUED_FIELD) < 60
    assert job == {"batch_id": "b-dead"}  # attempts reset
    assert redis_client.llen(QUEUE_FAILED) == 1  # the other one stays
    # the batch is back in play, as `audio-pipeline requeue` leaves it
    row = db_conn.execute("SELECT status, error FROM batches WHERE batch_id = 'b-dead'").fetchone()
    assert row == {"status": "transferred", "error": None}
    (audit,) = _audit_rows(op_app, "dead_letter.requeue")
    assert audit["actor_username"] == "boss"
    assert audit["target"] == "queue:failed[1]"
    assert audit["details"]["requeued"] == 1
    assert audit["details"]["entries"][0]["rows"] == "batch b-dead"


def test_requeue_a_stage(
    op_app: Flask, op_admin: tuple[FlaskClient, str], redis_client: redis.Redis
) -> None:
    client, token = op_admin
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "x1"})
    dead_letter(redis_client, "gpu", f"{QUEUE_TRANSCRIBE}:testhost", {"audio_id": 1})
    dead_letter(redis_client, "gpu", QUEUE_TRANSCRIBE, {"audio_id": 2})
    response = client.post(f"{PAGE}requeue-stage", data={"stage": "gpu", "csrf_token": token})
    assert response.status_code == 302
    assert redis_client.llen(f"{QUEUE_TRANSCRIBE}:testhost") == 1  # back to its own source
    assert redis_client.llen(QUEUE_TRANSCRIBE) == 1
    assert redis_client.llen(QUEUE_UNPACK) == 0
    assert redis_client.llen(QUEUE_FAILED) == 1
    (audit,) = _audit_rows(op_app, "dead_letter.requeue")
    assert audit["details"]["requeued"] == 2
    assert audit["target"] == "queue:failed stage=gpu"


def test_purge_deletes_only_the_letters_seen(
    op_app: Flask, op_admin: tuple[FlaskClient, str], redis_client: redis.Redis
) -> None:
    client, token = op_admin
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "seen-1"})
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "seen-2"})
    (seen,) = PURGE_FORM.findall(_page(client))
    assert seen[0] == "2"
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "arrived-later"})

    form = {"count": seen[0], "digest": seen[1], "csrf_token": token}
    assert client.post(f"{PAGE}purge", data=form).status_code == 302
    (left,) = [json.loads(x) for x in redis_client.lrange(QUEUE_FAILED, 0, -1)]
    assert json.loads(left["job"])["batch_id"] == "arrived-later"
    (audit,) = _audit_rows(op_app, "dead_letter.purge")
    assert audit["details"] == {"deleted": 2}

    # the same button again: what it saw is gone, so nothing is deleted
    client.post(f"{PAGE}purge", data=form)
    assert "nothing deleted" in client.get(PAGE).get_data(as_text=True)
    assert redis_client.llen(QUEUE_FAILED) == 1
    assert len(_audit_rows(op_app, "dead_letter.purge")) == 1


def test_a_stale_index_is_refused(
    op_app: Flask, op_admin: tuple[FlaskClient, str], redis_client: redis.Redis
) -> None:
    client, token = op_admin
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "first"})
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "second"})
    buttons = dict(_requeue_buttons(_page(client)))
    # someone else requeues "first": "second" moves up to index 0
    redis_client.lpop(QUEUE_FAILED)

    response = client.post(
        f"{PAGE}requeue", data={"index": "0", "fingerprint": buttons[0], "csrf_token": token}
    )
    assert response.status_code == 302
    assert "no longer the one shown" in client.get(PAGE).get_data(as_text=True)
    assert redis_client.llen(QUEUE_FAILED) == 1
    assert redis_client.llen(QUEUE_UNPACK) == 0
    # an index past the end is refused the same way
    client.post(
        f"{PAGE}requeue", data={"index": "1", "fingerprint": buttons[1], "csrf_token": token}
    )
    assert redis_client.llen(QUEUE_FAILED) == 1
    assert _audit_rows(op_app, "dead_letter.requeue") == []


def test_missing_or_wrong_csrf_token_is_refused(
    op_app: Flask, op_admin: tuple[FlaskClient, str], redis_client: redis.Redis
) -> None:
    client, _ = op_admin
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "x1"})
    ((index, fingerprint),) = _requeue_buttons(_page(client))
    (seen,) = PURGE_FORM.findall(_page(client))
    for token in ({}, {"csrf_token": "forged"}):
        requeue = {"index": str(index), "fingerprint": fingerprint, **token}
        assert client.post(f"{PAGE}requeue", data=requeue).status_code == 400
        stage = {"stage": "unpack", **token}
        assert client.post(f"{PAGE}requeue-stage", data=stage).status_code == 400
        purge = {"count": seen[0], "digest": seen[1], **token}
        assert client.post(f"{PAGE}purge", data=purge).status_code == 400
    assert redis_client.llen(QUEUE_FAILED) == 1
    assert redis_client.llen(QUEUE_UNPACK) == 0
    assert _audit_rows(op_app, "dead_letter.requeue") == []


def test_without_operator_settings_the_page_says_so(ra_env: dict[str, str], db_conn: Any) -> None:
    add_batch(db_conn, "b-flight", "unpacked", file_count=1)
    db_conn.commit()
    for application in _app(ra_env):
        add_user(application, "boss", "admin")
        client = application.test_client()
        login(client, "boss")
        html = _page(client)
        assert "queues are not configured for this app (OPERATOR_REDIS_URL)" in html
        assert 'data-batch="b-flight"' in html  # the rest of the page still works


def test_requeue_is_off_without_the_pipeline_database_role(
    ra_env: dict[str, str], operator_url: str, redis_client: redis.Redis
) -> None:
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "x1"})
    for application in _app(ra_env, OPERATOR_REDIS_URL=operator_url):
        add_user(application, "boss", "admin")
        client = application.test_client()
        token = login(client, "boss")
        html = _page(client)
        assert 'id="requeue-off"' in html
        assert _requeue_buttons(html) == []
        assert 'id="purge"' in html
        client.post(
            f"{PAGE}requeue", data={"index": "0", "fingerprint": "0" * 16, "csrf_token": token}
        )
        assert "OPERATOR_DATABASE_URL" in client.get(PAGE).get_data(as_text=True)
        assert redis_client.llen(QUEUE_FAILED) == 1


def test_an_unreachable_prometheus_leaves_the_live_depths(
    ra_env: dict[str, str], operator_url: str, redis_client: redis.Redis
) -> None:
    redis_client.rpush(QUEUE_UNPACK, '{"batch_id": "b1"}')
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for application in _app(ra_env, OPERATOR_REDIS_URL=operator_url, PROMETHEUS_URL=url):
        add_user(application, "boss", "admin")
        client = application.test_client()
        login(client, "boss")
        html = _page(client)
        assert "Prometheus did not answer" in html
        assert "live depths only" in html
        assert re.search(r'data-queue="queue:unpack">.*?<td class="depth">1<', html)


class _QueryRange(BaseHTTPRequestHandler):
    """Answers /api/v1/query_range as Prometheus does, with two series."""

    queries: list[str] = []

    def do_GET(self) -> None:
        type(self).queries.append(self.path)
        now = time.time()
        body = {
            "status": "success",
            "data": {
                "resultType": "matrix",
                "result": [
                    {
                        "metric": {"key": "queue:unpack"},
                        "values": [[now - 3600, "3"], [now - 1800, "7"], [now, "1"]],
                    },
                    {
                        "metric": {"key": "queue:transcribe:gpu-07"},
                        "values": [[now - 3600, "0"], [now, "2"]],
                    },
                ],
            },
        }
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_the_trend_is_drawn_from_prometheus(
    ra_env: dict[str, str], operator_url: str, redis_client: redis.Redis
) -> None:
    redis_client.rpush(QUEUE_UNPACK, '{"batch_id": "b1"}')
    server = HTTPServer(("127.0.0.1", 0), _QueryRange)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        for application in _app(ra_env, OPERATOR_REDIS_URL=operator_url, PROMETHEUS_URL=url):
            add_user(application, "boss", "admin")
            client = application.test_client()
            login(client, "boss")
            html = _page(client)
    finally:
        server.shutdown()
    (query,) = [q for q in _QueryRange.queries if q.startswith("/api/v1/query_range?")]
    assert "redis_key_size" in query
    assert "step=300" in query
    assert "(peak 7)" in html
    unpack_row = re.search(r'data-queue="queue:unpack">(.*?)</tr>', html, re.S)
    assert unpack_row
    assert "<polyline" in unpack_row.group(1)
    # a queue with no series in Prometheus (queue:failed here) says so
    failed_row = re.search(r'data-queue="queue:failed">(.*?)</tr>', html, re.S)
    assert failed_row
    assert "no data" in failed_row.group(1)


def test_a_redis_that_does_not_answer_is_said_and_the_rest_shown(
    ra_env: dict[str, str], settings: Settings, db_conn: Any
) -> None:
    add_batch(db_conn, "b-flight", "unpacked", file_count=1)
    db_conn.commit()
    dead = f"redis://ra-operator:pw@127.0.0.1:{free_port()}/0"  # nothing listens there
    for application in _app(
        ra_env, OPERATOR_REDIS_URL=dead, OPERATOR_DATABASE_URL=settings.database_url
    ):
        add_user(application, "boss", "admin")
        client = application.test_client()
        token = login(client, "boss")
        html = _page(client)
        assert "the pipeline&#39;s Redis did not answer: ConnectionError" in html
        assert 'data-batch="b-flight"' in html
        response = client.post(
            f"{PAGE}requeue-stage", data={"stage": "unpack", "csrf_token": token}
        )
        assert response.status_code == 302
        assert "Requeue stopped (ConnectionError" in client.get(PAGE).get_data(as_text=True)
        (audit,) = _audit_rows(application, "dead_letter.requeue")
        assert audit["details"]["error"].startswith("ConnectionError")
