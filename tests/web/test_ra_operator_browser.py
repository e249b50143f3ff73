"""Headless Chromium against a real gunicorn: an admin opens the operator page,
requeues one dead letter with its button, and sees the job back in its queue (and
Redis has it there); then purges the other after the page's confirmation. Uses
Debian's chromium; never downloads a browser."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from audio_pipeline.config import QUEUE_FAILED, QUEUE_TRANSCRIBE, QUEUE_UNPACK, Settings
from tests.support import ra_server
from tests.support.browser_kit import CHROMIUM, CHROMIUM_ARGS, login_by_keyboard
from tests.support.operator_page import dead_letter, operator_redis_user
from tests.support.rows import add_batch
from tests.support.web import PASSWORD

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.slow]

SCREENSHOT = Path(os.environ.get("RA_SCREENSHOT_DIR", "/tmp")) / "ra_operator_page.png"


@pytest.fixture
def server(
    pipeline_env: dict[str, str],
    settings: Settings,
    redis_client: redis.Redis,
    db_conn: Any,
    tmp_path: Path,
) -> Iterator[str]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed")
    add_batch(db_conn, "b-dead", "failed", error="unpack broke")
    db_conn.commit()
    dead_letter(redis_client, "gpu", QUEUE_TRANSCRIBE, {"audio_id": 5, "opus_path": "/o"})
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "b-dead"}, attempts=4)
    with operator_redis_user(redis_client, int(pipeline_env["REDIS_DB"])) as operator_url:
        env = {
            **os.environ,
            **pipeline_env,
            "SECRET_KEY": "browser-test",
            "RA_WORKERS": "2",
            "RA_NEW_PASSWORD": PASSWORD,
            "OPERATOR_REDIS_URL": operator_url,
            "OPERATOR_DATABASE_URL": settings.database_url,
        }
        ra_server.prepare(env, [("boss", "admin")])
        with ra_server.gunicorn(env, tmp_path / "gunicorn.log") as url:
            yield url


def test_requeue_one_dead_letter_from_the_operator_page(
    server: str, redis_client: redis.Redis, db_conn: Any
) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        # A CSP refusal or a script error shows up on the console; a missing file as a
        # failed response (the browser's own favicon request is no page's).
        problems: list[str] = []
        page.on(
            "console",
            lambda m: (
                problems.append(m.text)
                if m.type == "error" and "Failed to load resource" not in m.text
                else None
            ),
        )
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on(
            "response",
            lambda r: (
                problems.append(f"{r.status} {r.url}")
                if r.status >= 400 and not r.url.endswith("/favicon.ico")
                else None
            ),
        )
        login_by_keyboard(page, server, "boss", PASSWORD)
        page.click("nav >> text=Operator")
        page.wait_for_url("**/admin/operator/")
        depth = page.locator('tr[data-queue="queue:unpack"] td.depth')
        assert depth.inner_text() == "0"
        assert page.locator("tr.dead-letter").count() == 2
        unpack_letter = page.locator("tr.dead-letter", has_text="unpack broke")
        assert unpack_letter.get_attribute("data-index") == "1"

        unpack_letter.locator("button.requeue").click()
        page.wait_for_load_state("load")
        page.wait_for_selector("text=1 job(s) requeued")
        assert depth.inner_text() == "1"
        assert page.locator("tr.dead-letter").count() == 1
        assert page.locator("tr.dead-letter", has_text="unpack broke").count() == 0
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        # purge asks first (static/operator.js, loaded under the app's CSP)
        questions: list[str] = []

        def answer(dialog: Any) -> None:
            questions.append(dialog.message)
            dialog.accept()

        page.once("dialog", answer)
        page.click("#purge")
        page.wait_for_selector("text=Deleted 1 dead letter(s).")
        assert questions == ["Delete these 1 dead letter(s) for good?"]
        assert not problems, problems
        browser.close()

    (job,) = [json.loads(x) for x in redis_client.lrange(QUEUE_UNPACK, 0, -1)]
    assert job["batch_id"] == "b-dead"
    assert "_attempts" not in job
    assert redis_client.llen(QUEUE_FAILED) == 0
    row = db_conn.execute("SELECT status FROM batches WHERE batch_id = 'b-dead'").fetchone()
    assert row["status"] == "transferred"
