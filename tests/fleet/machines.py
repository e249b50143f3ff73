"""systemd-nspawn machines that stand in for fleet VMs (real systemd, no Docker).

A Debian bookworm rootfs is built once with debootstrap and cached as a tar; each
machine boots from its own copy. Machines share the host's network namespace, so
their services listen on the host's ports and Ansible reaches them with the
community.docker.nsenter connection (the machine's PID 1 as ansible_nsenter_pid).
See ../shared/notes/testing-recipes.md ("Ansible, converged for real ...").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUITE = "bookworm"
# The packages a bare cloud image has and Ansible needs; everything else is the
# roles' job.
ROOTFS_PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-apt,sudo,iproute2,ca-certificates"
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
ROOTFS_TAR_NAME = f"rootfs-{SUITE}.tar"
BOOT_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
DATA_VOLUME_BYTES = 512 * 1024 * 1024


class MachineError(RuntimeError):
    """A machine could not be built, booted or stopped."""


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def debian_mirror() -> str:
    """The Debian mirror this machine's apt already uses (reachable from here)."""
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if line.startswith("URIs:") and "debian" in line and "security" not in line:
                return words[1]
            if words[:1] == ["deb"] and "debian" in line and "security" not in line:
                return next(w for w in words[1:] if w.startswith("http"))
    return "http://deb.debian.org/debian"


def build_rootfs_tar(cache_dir: Path) -> Path:
    """The cached rootfs tar, built with debootstrap on first use (~1-2 min)."""
    tar = cache_dir / ROOTFS_TAR_NAME
    if tar.exists():
        return tar
    cache_dir.mkdir(parents=True, exist_ok=True)
    build = cache_dir / "rootfs-build"
    shutil.rmtree(build, ignore_errors=True)
    _run(["debootstrap", "--variant=minbase", f"--include={ROOTFS_PACKAGES}",
          SUITE, str(build), debian_mirror()])  # fmt: skip
    # A 0700 root breaks dbus, redis and postgres inside the machine.
    build.chmod(0o755)
    # pip and apt traffic go through a re-signing proxy: trust its CA inside too.
    target_ca = build / "usr/local/share/ca-certificates"
    target_ca.mkdir(parents=True, exist_ok=True)
    for crt in HOST_CA_DIR.glob("*.crt"):
        shutil.copy2(crt, target_ca / crt.name)
    _run(["chroot", str(build), "update-ca-certificates"])
    # The machines share the host's network: an sshd inside would fight the host's.
    _run(["chroot", str(build), "systemctl", "mask", "ssh.service", "systemd-networkd.service",
          "systemd-resolved.service", "systemd-timesyncd.service"])  # fmt: skip
    # systemd generates a fresh machine-id per machine at first boot.
    (build / "etc/machine-id").write_text("")
    partial = tar.with_suffix(".partial")
    _run(["tar", "-C", str(build), "--numeric-owner", "-cf", str(partial), "."])
    partial.rename(tar)
    shutil.rmtree(build, ignore_errors=True)
    return tar


@dataclass
class Machine:
    name: str
    root: Path
    binds: list[str] = field(default_factory=list)
    nspawn: subprocess.Popen[bytes] | None = None
    pid1: int | None = None

    def boot(self, log_dir: Path) -> None:
        args = [
            "systemd-nspawn", "--boot", f"--directory={self.root}", f"--machine={self.name}",
            "--register=no", "--keep-unit", "--console=read-only",
            *(f"--bind={b}" for b in self.binds),
        ]  # fmt: skip
        log = (log_dir / f"{self.name}.console.log").open("wb")
        self.nspawn = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise MachineError(f"{self.name}: systemd-nspawn exited, see {log.name}")
            children = subprocess.run(
                ["pgrep", "-P", str(self.nspawn.pid)], capture_output=True, text=True
            ).stdout.split()
            if children:
                self.pid1 = int(children[0])
                state = self.exec(["systemctl", "is-system-running"], check=False).stdout.strip()
                if state in {"running", "degraded"}:
                    return
            time.sleep(0.5)
        raise MachineError(f"{self.name}: not booted within {BOOT_TIMEOUT_S} s")

    def exec(
        self, args: list[str], *, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the machine (all its namespaces, as root)."""
        if self.pid1 is None:
            raise MachineError(f"{self.name} is not running")
        return subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", "--", *args],
            check=check, text=True, capture_output=True,
            env=env or {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
        )  # fmt: skip

    def stop(self) -> None:
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        # SIGTERM to systemd-nspawn powers the machine off cleanly (~3 s).
        self.nspawn.send_signal(signal.SIGTERM)
        try:
            self.nspawn.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.nspawn.kill()
            self.nspawn.wait(timeout=STOP_TIMEOUT_S)


@contextlib.contextmanager
def loop_device(image: Path, size_bytes: int = DATA_VOLUME_BYTES) -> Iterator[str]:
    """A sparse file attached as a loop device: an empty data volume."""
    with image.open("wb") as f:
        f.truncate(size_bytes)
    device = _run(["losetup", "--find", "--show", str(image)]).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
        image.unlink(missing_ok=True)


def unpack_machine(tar: Path, root: Path, hostname: str) -> None:
    root.mkdir(parents=True)
    _run(["tar", "-C", str(root), "--numeric-owner", "-xf", str(tar)])
    root.chmod(0o755)
    (root / "etc/hostname").write_text(hostname + "\n")


def nspawn_available() -> str | None:
    """None when machines can be booted here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, losetup, nsenter)"
    for tool in ("systemd-nspawn", "debootstrap", "losetup", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Makefile APT_PACKAGES)"
    return None
