"""The RA app as the fleet serves it, on loopback: migrated, with its users, under the
release's own gunicorn.conf.py, for the tests that drive it from a browser."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.support.metrics_scrape import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 30.0


def prepare(env: dict[str, str], users: Sequence[tuple[str, str]]) -> None:
    """``flask db upgrade``, then ``create-user NAME --role ROLE`` for each of ``users``
    (the password from RA_NEW_PASSWORD in ``env``), as an operator does."""
    flask = [str(BIN / "flask"), "--app", "ra_app"]
    commands = [["db", "upgrade"], *(["create-user", n, "--role", r] for n, r in users)]
    for argv in commands:
        subprocess.run([*flask, *argv], env=env, cwd=REPO, check=True, capture_output=True)


@contextmanager
def gunicorn(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """gunicorn serving create_app() on a free loopback port; yields its URL once
    /healthz answers, and stops it afterwards. Its output goes to ``log_path``, which
    a failed start raises with."""
    port = free_port()
    with log_path.open("w") as log:
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
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/healthz", timeout=1) as r:  # noqa: S310
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError):
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log_path.read_text())
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)
