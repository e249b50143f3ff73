"""sd_notify(3) for the worker units (Type=notify, WatchdogSec=): READY, WATCHDOG, ...

The protocol needs no library: one datagram of ``KEY=value`` lines sent to the unix
socket that systemd names in NOTIFY_SOCKET (a leading '@' means Linux's abstract
namespace). systemd sets WATCHDOG_USEC (and WATCHDOG_PID) when the unit has
WatchdogSec=; it kills a service whose pings stop for that long, so the pings must
come from the code that can hang (the main loop), never from a side thread.

Without NOTIFY_SOCKET (a terminal, a test) every call does nothing. A failed send is
logged once and never raised: a worker must not stop for its supervisor's sake.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

from audio_pipeline.logs import log_event

# Pings per watchdog interval at most: systemd advises at least two, and more are
# only datagrams, so a late one never costs the unit its life.
PINGS_PER_INTERVAL = 8
EXTEND_EVERY_S = 1.0  # EXTEND_TIMEOUT_USEC at most this often


class SystemdNotifier:
    """Sends state changes and watchdog pings to systemd, if it is listening."""

    def __init__(
        self, environ: Mapping[str, str] | None = None, log: logging.Logger | None = None
    ) -> None:
        env = os.environ if environ is None else environ
        self.log = log or logging.getLogger(__name__)
        self.address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_s = _watchdog_s(env)
        self._socket: socket.socket | None = None
        self._failed = False  # logged once
        self._last_ping = float("-inf")
        self._last_extend = float("-inf")

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self, status: str = "") -> None:
        """Start-up is over: systemd marks the unit started and arms the watchdog."""
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str = "") -> None:
        self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def extend_start(self, seconds: float) -> None:
        """Allow ``seconds`` more past TimeoutStartSec (start-up waiting out an outage)."""
        now = time.monotonic()
        if now - self._last_extend < EXTEND_EVERY_S:
            return
        self._last_extend = now
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog(self) -> None:
        """Ping the watchdog (at most PINGS_PER_INTERVAL times per interval)."""
        if self.watchdog_s is None:
            return
        now = time.monotonic()
        if now - self._last_ping < self.watchdog_s / PINGS_PER_INTERVAL:
            return
        self._last_ping = now
        self.send("WATCHDOG=1")

    def send(self, *assignments: str) -> bool:
        """One datagram of ``assignments``; True when it was sent."""
        if self.address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
            self._socket.sendto("\n".join(assignments).encode(), self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log_event(
                    self.log,
                    "systemd.notify_failed",
                    level=logging.WARNING,
                    socket=self.address.replace("\0", "@"),
                    error=str(exc),
                )
            return False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _socket_address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # the abstract namespace
    if value.startswith("/"):
        return value
    return None  # unset, or a kind this module does not speak (vsock:)


def _watchdog_s(env: Mapping[str, str]) -> float | None:
    """The watchdog interval systemd gave this process, or None (no watchdog)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None  # not set, or meant for another process (our parent)
    return usec / 1_000_000
