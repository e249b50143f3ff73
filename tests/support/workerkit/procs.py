"""Start and watch real worker subprocesses in tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]

# Small timings so reliability tests finish in seconds.
FAST_ENV = {
    "WORKER_HEARTBEAT_INTERVAL_S": "0.3",
    "WORKER_HEARTBEAT_TTL_S": "1.5",
    "WORKER_REAPER_INTERVAL_S": "1",
    "QUEUE_RETRY_BASE_S": "0.1",
    "QUEUE_RETRY_CAP_S": "0.4",
    "QUEUE_MAX_ATTEMPTS": "3",
}


def start_module(
    module: str,
    env: Mapping[str, str],
    args: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
) -> subprocess.Popen[str]:
    """Run ``python -m module`` from the repo root with only ``env`` (plus PATH)."""
    full_env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(REPO_ROOT),  # tests.* and the checkout's packages
        **FAST_ENV,
        **env,
        **(extra_env or {}),
    }
    out = open(log_path, "w") if log_path else subprocess.PIPE  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=full_env,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(
    predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def finish(proc: subprocess.Popen[str], timeout: float = 30.0) -> tuple[int, str]:
    """Wait for exit; returns (exit code, combined output)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"process did not exit within {timeout}s:\n{out}") from None
    return proc.returncode, out or ""
