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
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet import lab, machines

# Last in the session, in file order: they break what they test (a GPU host is
# powered off for good), so every other fleet test meets the whole fleet first.
LAST_MODULES = (Path(__file__).with_name("test_faults.py"),)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path in LAST_MODULES)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def fleet_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab.Fleet]:
    """The machines and both site.yml runs, whether or not they succeeded."""
    reason = machines.nspawn_available()
    if reason:
        pytest.skip(f"fleet test: {reason}")
    if os.environ.get("FLEET_REUSE"):
        # Iterating on tests: a fleet kept by FLEET_KEEP=1 (or make fleet-up), as it is.
        yield lab.attach(Path(os.environ["FLEET_REUSE"]))
        return
    built = lab.start(tmp_path_factory.mktemp("fleet"))
    try:
        built.converge()
        yield built
    finally:
        if os.environ.get("FLEET_KEEP"):
            # Debugging: leave the machines running; `lab.py down --dir WORK` removes them.
            print(f"fleet kept: python -m tests.fleet.lab down --dir {built.work}")
        else:
            lab.stop(built)


@pytest.fixture(scope="session")
def fleet(fleet_build: lab.Fleet) -> lab.Fleet:
    """The converged fleet. When site.yml failed, every test that needs a working
    fleet fails at once (test_site_converges shows why) instead of timing out."""
    run = fleet_build.first_run
    if os.environ.get("FLEET_REUSE"):
        return fleet_build
    if run is None or run.returncode != 0:
        pytest.fail("site.yml did not converge (see test_site_converges)")
    return fleet_build
