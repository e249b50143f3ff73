"""systemd-nspawn machines that stand in for fleet VMs (real systemd, no Docker).

A Debian bookworm rootfs is built once with debootstrap and cached as a tar; each
machine boots from its own copy. Each machine has its own network namespace with
one address on a private bridge (network.py), so bind addresses, pg_hba and the
firewall are real; Ansible reaches it with the community.docker.nsenter connection
(the machine's PID 1 as ansible_nsenter_pid). The machines have no route out:
apt and pip go through the host's proxy on the bridge, like a proxied data centre.
See ../shared/notes/testing-recipes.md ("Ansible, converged for real ...").
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SUITE = "bookworm"
# The packages a bare cloud image has and Ansible needs; everything else is the
# roles' job.
ROOTFS_PACKAGES = (
    "systemd,systemd-sysv,dbus,python3,python3-apt,sudo,iproute2,ca-certificates,openssh-server"
)
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
# Named by its content: a cache built with other packages is never reused.
ROOTFS_TAR_NAME = f"rootfs-{SUITE}-{hashlib.sha256(ROOTFS_PACKAGES.encode()).hexdigest()[:8]}.tar"
BOOT_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
DATA_VOLUME_BYTES = 512 * 1024 * 1024


class MachineError(RuntimeError):
    """A machine could not be built, booted or stopped."""


def container_init(nspawn_pid: int) -> int | None:
    """The container's PID 1 among systemd-nspawn's children, once it exists.

    nspawn first forks an outer child, still in the host's PID and network
    namespaces, which clones the container's init and exits; only a child in a PID
    namespace of its own is the init (entering the outer child's namespaces would
    find the host's interfaces, and no host0)."""
    children = subprocess.run(
        ["pgrep", "-P", str(nspawn_pid)], capture_output=True, text=True
    ).stdout.split()
    ours = os.readlink("/proc/self/ns/pid")
    for child in children:
        try:
            if os.readlink(f"/proc/{child}/ns/pid") != ours:
                return int(child)
        except OSError:  # it exited in between (the outer child does)
            continue
    return None


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
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={ROOTFS_PACKAGES}",
            SUITE,
            str(build),
            debian_mirror(),
        ]
    )
    # A 0700 root breaks dbus, redis and postgres inside the machine.
    build.chmod(0o755)
    # pip and apt traffic go through a re-signing proxy: trust its CA inside too.
    target_ca = build / "usr/local/share/ca-certificates"
    target_ca.mkdir(parents=True, exist_ok=True)
    for crt in HOST_CA_DIR.glob("*.crt"):
        shutil.copy2(crt, target_ca / crt.name)
    _run(["chroot", str(build), "update-ca-certificates"])
    # Addresses are set from the host (Machine.boot); the host owns the clock.
    _run(
        [
            "chroot",
            str(build),
            "systemctl",
            "mask",
            "systemd-networkd.service",
            "systemd-resolved.service",
            "systemd-timesyncd.service",
        ]
    )
    # Host keys are made per machine (unpack_machine), never shared through the tar.
    for key in (build / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
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
    address: str
    bridge: str
    prefix_len: int
    binds: list[str] = field(default_factory=list)
    nspawn: subprocess.Popen[bytes] | None = None
    pid1: int | None = None

    def boot(self, log_dir: Path) -> None:
        args = [
            "systemd-nspawn",
            "--boot",
            f"--directory={self.root}",
            f"--machine={self.name}",
            "--register=no",
            "--keep-unit",
            "--console=read-only",
            f"--network-bridge={self.bridge}",
            *(f"--bind={b}" for b in self.binds),
        ]
        log = (log_dir / f"{self.name}.console.log").open("wb")
        self.nspawn = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise MachineError(f"{self.name}: systemd-nspawn exited, see {log.name}")
            if self.pid1 is None and (init := container_init(self.nspawn.pid)) is not None:
                self.pid1 = init
                self._set_address()
            if self.pid1 is not None:
                state = self.exec(["systemctl", "is-system-running"], check=False).stdout.strip()
                if state in {"running", "degraded"}:
                    return
            time.sleep(0.5)
        raise MachineError(f"{self.name}: not booted within {BOOT_TIMEOUT_S} s")

    def _set_address(self) -> None:
        # From the host, at once: networkd inside would take seconds to apply it.
        net = ["nsenter", "-t", str(self.pid1), "-n", "--"]
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while subprocess.run([*net, "ip", "link", "show", "host0"], capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise MachineError(f"{self.name}: no host0 interface")
            time.sleep(0.2)
        _run([*net, "ip", "link", "set", "lo", "up"])
        _run([*net, "ip", "link", "set", "host0", "up"])
        _run([*net, "ip", "addr", "add", f"{self.address}/{self.prefix_len}", "dev", "host0"])

    def net_exec(self, args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run a host program inside this machine's network namespace only: the
        host's files and tools, the machine's addresses and firewall."""
        if self.pid1 is None:
            raise MachineError(f"{self.name} is not running")
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            ["nsenter", "-t", str(self.pid1), "-n", "--", *args],
            text=True,
            capture_output=True,
            **kwargs,
        )

    def exec(
        self, args: list[str], *, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the machine (all its namespaces, as root)."""
        if self.pid1 is None:
            raise MachineError(f"{self.name} is not running")
        return subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", "--", *args],
            check=check,
            text=True,
            capture_output=True,
            env=env or {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
        )

    def stop(self) -> None:
        self.request_stop()
        self.wait_stopped()

    def request_stop(self) -> None:
        """Start a clean power-off (SIGTERM to systemd-nspawn); wait_stopped ends it."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)

    def wait_stopped(self) -> None:
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        try:
            self.nspawn.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.nspawn.kill()
            self.nspawn.wait(timeout=STOP_TIMEOUT_S)


def attach_loop_device(image: Path, size_bytes: int = DATA_VOLUME_BYTES) -> str:
    """A sparse file attached as a loop device: an empty data volume."""
    with image.open("wb") as f:
        f.truncate(size_bytes)
    return _run(["losetup", "--find", "--show", str(image)]).stdout.strip()


def detach_loop_device(device: str) -> None:
    image = subprocess.run(
        ["losetup", "--noheadings", "--output", "BACK-FILE", device], capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(["losetup", "-d", device], check=False)
    if image:
        Path(image).unlink(missing_ok=True)


def unpack_machine(
    tar: Path, root: Path, hostname: str, proxy_url: str, hosts: dict[str, str]
) -> None:
    """A machine's root from the cached tar, set up as its cloud image would be on a
    proxied network: host name, /etc/hosts, apt's and pip's proxy, own SSH host keys."""
    root.mkdir(parents=True)
    _run(["tar", "-C", str(root), "--numeric-owner", "-xf", str(tar)])
    root.chmod(0o755)
    (root / "etc/hostname").write_text(hostname + "\n")
    lines = ["127.0.0.1 localhost", *(f"{addr} {name}" for name, addr in hosts.items())]
    (root / "etc/hosts").write_text("\n".join(lines) + "\n")
    (root / "etc/apt/apt.conf.d/80fleet-proxy").write_text(
        f'Acquire::http::Proxy "{proxy_url}";\nAcquire::https::Proxy "{proxy_url}";\n'
    )
    (root / "etc/pip.conf").write_text(f"[global]\nproxy = {proxy_url}\n")
    _run(["ssh-keygen", "-A", "-f", str(root)])


def nspawn_available() -> str | None:
    """None when machines can be booted here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, losetup, nsenter)"
    for tool in ("systemd-nspawn", "debootstrap", "losetup", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Makefile APT_PACKAGES)"
    return None
