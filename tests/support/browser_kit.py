"""Headless Chromium for the browser tests (Debian's chromium, driven by Playwright;
no browser is ever downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps reaching for Google's
# hosts, which this machine's closed network refuses.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def login_by_keyboard(page: Any, url: str, name: str, password: str) -> None:
    """Log in as an RA does: type into the autofocused box, Tab, type, Enter."""
    page.goto(f"{url}/login")
    # The username box has autofocus, which Chromium applies at a rendering step
    # that can come after the load event on a busy machine: typing before it lands
    # sends the keys nowhere (seen in CI as a failed login).
    page.wait_for_function("document.activeElement && document.activeElement.id === 'username'")
    page.keyboard.type(name)
    page.keyboard.press("Tab")
    page.keyboard.type(password)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{url}/")


def download_export_as_admin(page: Any, url: str, name: str, password: str, dest: Path) -> Path:
    """Log out, log in as the researcher ``name`` and save the admin page's CSV export."""
    page.click("text=Log out")
    login_by_keyboard(page, url, name, password)
    page.goto(f"{url}/admin/")
    with page.expect_download() as info:
        page.click("#export-csv")
    info.value.save_as(dest)
    return dest
