"""The whole suite, as `make test` runs it: the fleet tests in one pytest session and
everything else in another, side by side.

Why two sessions: the fleet tests spend most of their time waiting on
systemd-nspawn machines (package installs, Ansible runs, a watchdog expiring, a host
powered off), the rest of the suite on the local stack and its own waits (outages,
kills). They share nothing: the fleet has its own bridge, S3 store and sshd, and
never touches the local stack. So the suite takes about as long as the longer of the
two instead of their sum.

The fleet session writes to a log file, printed whole when it ends, so the two never
interleave; the other session prints as usual. The local stack is started here before
both (and stopped at the end if it was not already running), so neither session stops
it under the other.

    python -m devtools.suite [PYTEST ARGS...]   # the args go to both sessions
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools import devstack

REPO = Path(__file__).resolve().parents[1]
FLEET_LOG = REPO / ".make" / "test-fleet.log"
FLEET = "fleet"
REST = "not fleet"


def pytest_command(marker: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-m", marker, "--durations=15", *extra]


def run(extra: list[str]) -> int:
    stack = devstack.Stack.from_env()
    started_stack = not all(devstack.status(stack).values())
    if started_stack:
        devstack.up(stack)
    FLEET_LOG.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    try:
        with FLEET_LOG.open("w") as log:
            print(f"suite: fleet tests run alongside, their output in {FLEET_LOG}", flush=True)
            fleet = subprocess.Popen(
                pytest_command(FLEET, extra),
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                rest_rc = subprocess.run(pytest_command(REST, extra), cwd=REPO).returncode
                rest_s = time.monotonic() - began
                print(f"suite: waiting for the fleet tests ({FLEET_LOG})", flush=True)
                fleet_rc = fleet.wait()
            except BaseException:
                # Ctrl-C reached both sessions (one process group); the fleet's
                # teardown must still power its machines off and remove the bridge.
                _interrupt_and_wait(fleet)
                raise
        fleet_s = time.monotonic() - began
        sys.stdout.write(f"\n{'=' * 30} fleet tests ({FLEET_LOG}) {'=' * 30}\n")
        sys.stdout.write(FLEET_LOG.read_text(errors="replace"))
        print(
            f"suite: not-fleet exit {rest_rc} after {rest_s / 60:.1f} min; "
            f"fleet exit {fleet_rc} after {fleet_s / 60:.1f} min",
            flush=True,
        )
        return _failed(rest_rc) or _failed(fleet_rc)
    finally:
        if started_stack:
            devstack.down(stack)


def _failed(returncode: int) -> int:
    """pytest's exit code, except "no tests collected" (args that select from one
    session only, such as ``-k``), which fails nothing."""
    return 0 if returncode == pytest.ExitCode.NO_TESTS_COLLECTED else returncode


def _interrupt_and_wait(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    os.chdir(REPO)
    return run(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
