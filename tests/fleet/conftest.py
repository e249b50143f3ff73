"""The converged fleet: systemd-nspawn machines on a private bridge, site.yml run on them.

Built once per test session (the `fleet` fixture) by lab.py, the same code behind
`make fleet-up`: boot an orchestrator, a GPU worker (a loop device as its /data
volume) and a transfer host, each with its own address and firewall, run site.yml,
then run it again and keep both results for the tests to judge.

The host stands outside the fleet: it serves S3 and the collection host on the
bridge, and it is where an RA's browser and an operator's terminal sit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import lab
import machines


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab.Fleet]:
    reason = machines.nspawn_available()
    if reason:
        pytest.skip(f"fleet test: {reason}")
    built = lab.start(tmp_path_factory.mktemp("fleet"))
    try:
        built.converge()
        yield built
    finally:
        if os.environ.get("FLEET_KEEP"):
            # Debugging: leave the machines running; `lab.py down --dir WORK` removes them.
            lab.save_state(built)
            print(f"fleet kept: python tests/fleet/lab.py down --dir {built.work}")
        else:
            lab.stop(built)
