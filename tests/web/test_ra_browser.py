"""Headless Chromium against a real gunicorn: log in, review three items by
keyboard only, export. Uses Debian's chromium; never downloads a browser."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.support.browser_kit import (
    CHROMIUM,
    CHROMIUM_ARGS,
    download_export_as_admin,
    login_by_keyboard,
)
from tests.support.media import tone
from tests.support.web import PASSWORD, seed_items

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT = 30.0  # seconds
SCREENSHOT = Path(os.environ.get("RA_SCREENSHOT_DIR", "/tmp")) / "ra_review_page.png"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(
    pipeline_env: dict[str, str], db_conn: Any, s3_client: Any, tmp_path: Path
) -> Iterator[str]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed")
    seed_items(db_conn, 3)
    clip = tone(tmp_path / "clip.opus", 7.0)
    for row in db_conn.execute("SELECT opus_s3_key FROM audio_files").fetchall():
        s3_client.upload_file(str(clip), pipeline_env["S3_BUCKET"], row["opus_s3_key"])
    env = {
        **os.environ,
        **pipeline_env,
        "SECRET_KEY": "browser-test",
        "RA_WORKERS": "2",
        "RA_DOUBLE_CODED_SHARE": "0",
        "RA_NEW_PASSWORD": PASSWORD,
    }
    flask = [str(BIN / "flask"), "--app", "ra_app"]
    subprocess.run([*flask, "db", "upgrade"], env=env, cwd=REPO, check=True, capture_output=True)
    for name, role in (("ann", "ra"), ("boss", "admin")):
        subprocess.run(
            [*flask, "create-user", name, "--role", role],
            env=env,
            cwd=REPO,
            check=True,
            capture_output=True,
        )
    port = _free_port()
    log = (tmp_path / "gunicorn.log").open("w")
    proc = subprocess.Popen(
        [
            str(BIN / "gunicorn"),
            "-c",
            "ra_app/gunicorn.conf.py",
            "-b",
            f"127.0.0.1:{port}",
            "ra_app:create_app()",
        ],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1) as r:  # noqa: S310
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp_path / "gunicorn.log").read_text())
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_review_three_items_by_keyboard_and_export(
    server: str, pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900}, accept_downloads=True)
        login_by_keyboard(page, server, "ann", PASSWORD)
        page.wait_for_function("document.activeElement.id === 'next-item'")
        page.keyboard.press("Enter")  # "Next item" has the focus
        page.wait_for_url("**/review/*")
        seen = []
        for n in range(3):
            page.wait_for_selector("#label-form")
            seen.append(page.url)
            # the audio streams through the app with its metadata readable
            page.wait_for_function("document.getElementById('player').readyState >= 1")
            page.keyboard.press(" ")  # play
            page.wait_for_function("!document.getElementById('player').paused")
            page.keyboard.press(" ")  # pause
            page.keyboard.press("k")  # forward 5 s
            assert page.evaluate("document.getElementById('player').currentTime") >= 4.5
            page.keyboard.press("y")
            page.keyboard.press("2")
            page.keyboard.press("h")
            page.keyboard.press("a")
            page.keyboard.press("a")  # toggled off again
            assert page.is_checked("input[name=violates][value=yes]")
            assert page.is_checked("input[name=categories][value=hate_speech]")
            assert not page.is_checked("input[name=categories][value=harassment]")
            if n == 0:
                page.keyboard.press("?")
                assert page.is_visible("#help")
                page.keyboard.press("Escape")
                page.screenshot(path=str(SCREENSHOT), full_page=True)
            page.keyboard.press("Enter")  # submit; the next item loads
            page.wait_for_load_state("load")
            page.wait_for_url(lambda u, last=seen[-1]: u != last)
        assert len(set(seen)) == 3
        assert "Nothing left to review" in page.content()

        # RA tables are the ra_app role's: the pipeline role cannot read them
        with psycopg.connect(pipeline_env["DATABASE_URL"], row_factory=dict_row) as conn:
            labels = conn.execute("SELECT answer, time_on_task_ms FROM ra_labels").fetchall()
        assert len(labels) == 3
        assert all(
            r["answer"]["violates"] == "yes"
            and r["answer"]["severity"] == "medium"
            and r["answer"]["categories"] == ["hate_speech"]
            for r in labels
        )
        assert all(r["time_on_task_ms"] > 0 for r in labels)

        path = download_export_as_admin(page, server, "boss", PASSWORD, tmp_path / "export.csv")
        browser.close()
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    assert len(rows) == 3
    assert {r["coder"] for r in rows} == {"ann"}
    assert all(
        r["answer_violates"] == "yes"
        and r["answer_categories"] == "hate_speech"
        and r["policy_name"] == "hate"
        and r["transcript"]
        for r in rows
    )
