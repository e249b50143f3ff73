"""Headless Chromium against a real gunicorn: log in, review three flagged items and
one blind audit item by keyboard only, export. Uses Debian's chromium; never
downloads a browser."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.support import ra_server
from tests.support.browser_kit import (
    CHROMIUM,
    CHROMIUM_ARGS,
    download_export_as_admin,
    login_by_keyboard,
)
from tests.support.media import tone
from tests.support.web import PASSWORD, seed_items, seed_scored

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.slow]

SCREENSHOTS = Path(os.environ.get("RA_SCREENSHOT_DIR", "/tmp"))
SCREENSHOT = SCREENSHOTS / "ra_review_page.png"
BLIND_SCREENSHOT = SCREENSHOTS / "ra_review_page_blind.png"
FLAGGED_ITEMS = 3
AUDIT_SCORE = 0.12  # one unflagged item, drawn into the audit sample (RA_AUDIT_SHARE=1)


@pytest.fixture
def server(
    pipeline_env: dict[str, str], db_conn: Any, s3_client: Any, tmp_path: Path
) -> Iterator[str]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed")
    seed_items(db_conn, FLAGGED_ITEMS)
    seed_scored(db_conn, [AUDIT_SCORE])
    clip = tone(tmp_path / "clip.opus", 7.0)
    for row in db_conn.execute("SELECT opus_s3_key FROM audio_files").fetchall():
        s3_client.upload_file(str(clip), pipeline_env["S3_BUCKET"], row["opus_s3_key"])
    env = {
        **os.environ,
        **pipeline_env,
        "SECRET_KEY": "browser-test",
        "RA_WORKERS": "2",
        "RA_DOUBLE_CODED_SHARE": "0",
        "RA_AUDIT_SHARE": "1",
        "RA_BLIND": "audit",
        "RA_NEW_PASSWORD": PASSWORD,
    }
    ra_server.prepare(env, [("ann", "ra"), ("boss", "admin")])
    with ra_server.gunicorn(env, tmp_path / "gunicorn.log") as url:
        yield url


def _shows_verdict(page: Any) -> bool:
    """Whether the page shows any of the classifier's verdict: a score, a threshold,
    a highlighted segment or the evidence note beside one."""
    meta = page.inner_text("dl.meta")
    highlighted = page.locator(".segment.evidence").count() + page.locator(".why").count()
    return "Score" in meta or "threshold" in meta or highlighted > 0


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
        # score order: the flagged items, then the audit item, which is shown blind
        for n in range(FLAGGED_ITEMS + 1):
            page.wait_for_selector("#label-form")
            seen.append(page.url)
            if n < FLAGGED_ITEMS:
                assert _shows_verdict(page)
            else:
                assert not _shows_verdict(page)
                assert f"{AUDIT_SCORE:.2f}" not in page.inner_text("body")
                assert page.is_visible("text=You people are vermin.")
                page.screenshot(path=str(BLIND_SCREENSHOT), full_page=True)
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
        assert len(set(seen)) == FLAGGED_ITEMS + 1
        assert "Nothing left to review" in page.content()

        # RA tables are the ra_app role's: the pipeline role cannot read them
        with psycopg.connect(pipeline_env["DATABASE_URL"], row_factory=dict_row) as conn:
            labels = conn.execute("SELECT answer, time_on_task_ms FROM ra_labels").fetchall()
        assert len(labels) == FLAGGED_ITEMS + 1
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
    assert len(rows) == FLAGGED_ITEMS + 1
    assert {r["coder"] for r in rows} == {"ann"}
    # the export keeps what the page hid
    assert sorted((r["entered_as"], r["reviewed_blind"]) for r in rows) == [
        ("audit", "True"),
        *[("flagged", "False")] * FLAGGED_ITEMS,
    ]
    [audit] = [r for r in rows if r["entered_as"] == "audit"]
    assert float(audit["score"]) == pytest.approx(AUDIT_SCORE)
    assert all(
        r["answer_violates"] == "yes"
        and r["answer_categories"] == "hate_speech"
        and r["policy_name"] == "hate"
        and r["transcript"]
        for r in rows
    )
