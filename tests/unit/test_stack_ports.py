"""The ports the local stack and the fleet lab's host services bind."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools.devstack import Ports
from tests.fleet.lab import HOST_SERVICES_PORT_BASE

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOCAL_STACK_BASES = (10000, 5000)  # the default STACK_PORT_BASE and CI's


def every_port(ports: Ports) -> set[int]:
    return {ports.redis, ports.postgres, ports.s3, ports.ssh, *ports.seaweed_internal().values()}


@pytest.mark.parametrize("base", [HOST_SERVICES_PORT_BASE, *LOCAL_STACK_BASES])
def test_no_port_is_one_the_kernel_hands_out_as_a_source_port(base: int) -> None:
    """A port in the ephemeral range can be taken by any outgoing connection, weed's own
    between its servers included, just before the service binds it (a CI failure)."""
    low = int(EPHEMERAL_RANGE.read_text().split()[0])
    assert max(every_port(Ports(base))) < low


def test_the_fleet_lab_and_the_local_stacks_share_no_port() -> None:
    fleet = every_port(Ports(HOST_SERVICES_PORT_BASE))
    for base in LOCAL_STACK_BASES:
        assert not fleet & every_port(Ports(base)), base
