"""The fleet test's private network: a bridge, the host's address on it, a proxy.

Each machine gets one address on the bridge (machines.Machine). The host is at
HOST_ADDRESS and plays the parts that are remote to a real fleet: the S3 store, the
collection host, an RA's laptop and the package mirrors (through tinyproxy, the
machines' only way out; the host forwards nothing). The fleet's own range,
FLEET_CIDR, leaves the host out, so what the fleet's firewall opens "to the fleet
network" is closed to the host, as it is to any outsider.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

BRIDGE = "br-fleet"
HOST_ADDRESS = "10.231.0.1"
PREFIX_LEN = 24
# Machines live in .16-.31; the host (.1) is outside this range.
FLEET_CIDR = "10.231.0.16/28"
ADDRESSES = {
    "orch": "10.231.0.17",
    "gpu-01": "10.231.0.18",
    "gpu-02": "10.231.0.19",
    "transfer-01": "10.231.0.20",
}
PROXY_PORT = 3128
PROXY_URL = f"http://{HOST_ADDRESS}:{PROXY_PORT}"
START_TIMEOUT_S = 15


class NetworkError(RuntimeError):
    """The bridge or the proxy could not be set up."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, text=True, capture_output=True)


@dataclass
class FleetNetwork:
    work: Path
    proxy: subprocess.Popen[bytes] | None = None

    def up(self) -> None:
        if shutil.which("tinyproxy") is None:
            raise NetworkError("tinyproxy is not installed (Makefile APT_PACKAGES)")
        # A bridge or veth left by a killed run would hold the address: start clean.
        _remove_links()
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{HOST_ADDRESS}/{PREFIX_LEN}", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        self._start_proxy()

    def _start_proxy(self) -> None:
        conf = self.work / "tinyproxy.conf"
        log = self.work / "tinyproxy.log"
        conf.write_text(
            "\n".join(
                [
                    "User nobody",
                    "Group nogroup",
                    f"Port {PROXY_PORT}",
                    f"Listen {HOST_ADDRESS}",
                    "Timeout 600",
                    f'LogFile "{log}"',
                    "LogLevel Warning",
                    "MaxClients 100",
                    f"Allow {FLEET_CIDR}",
                    "ConnectPort 443",
                    "DisableViaHeader Yes",
                    "",
                ]
            )
        )
        log.touch()
        shutil.chown(log, "nobody", "nogroup")
        self.proxy = subprocess.Popen(
            ["tinyproxy", "-d", "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _listening(HOST_ADDRESS, PROXY_PORT):
            if self.proxy.poll() is not None or time.monotonic() > deadline:
                raise NetworkError(f"tinyproxy did not start, see {log}")
            time.sleep(0.1)

    def down(self) -> None:
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.send_signal(signal.SIGTERM)
            try:
                self.proxy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
        _remove_links()


def _remove_links() -> None:
    # systemd-nspawn removes its host-side veth (vb-<machine>) when it exits cleanly;
    # after a kill the link can stay behind.
    for machine in ADDRESSES:
        _ip("link", "del", f"vb-{machine}"[:15], check=False)
    _ip("link", "del", BRIDGE, check=False)


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0
