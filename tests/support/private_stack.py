"""A Redis and a PostgreSQL of a test module's own, which it may stop and restart.

Stopping the shared stack's services would break every other test running, so a test
of outages starts these on free ports under its own directory (S3 and sshd stay the
shared stack's). The PostgreSQL has the stack's roles and database with the pipeline
schema applied; the Redis keeps its data over a stop (``SHUTDOWN SAVE``), as the
fleet's appendonly Redis does.

    @pytest.fixture(scope="module")
    def private_stack() -> Iterator[devstack.Stack]:
        with running_private_stack("outage-stack-") as stack:
            yield stack
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from audio_pipeline.config import DEV_DB, DEV_PIPELINE_PASSWORD, DEV_REDIS_PASSWORD
from audio_pipeline.db import apply_schema
from devtools import devstack
from tests.support.workerkit.procs import wait_for


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _private_ports() -> devstack.Ports:
    for base in range(21000, 40000, 137):
        ports = devstack.Ports(base)
        if _free(ports.redis) and _free(ports.postgres):
            return ports
    raise RuntimeError("no free port pair for the private Redis and PostgreSQL")


@contextlib.contextmanager
def running_private_stack(prefix: str) -> Iterator[devstack.Stack]:
    """A private Redis and PostgreSQL (schema applied), removed with their data after."""
    # Under /tmp itself: the postgres user must traverse every parent directory.
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    root.chmod(0o755)
    stack = devstack.Stack(root=root, ports=_private_ports())
    try:
        devstack.start_redis(stack)
        devstack.start_postgres(stack)
        apply_schema(pipeline_url(stack))
        yield stack
    finally:
        devstack.down(stack, purge=True)
        shutil.rmtree(root, ignore_errors=True)


def pipeline_url(stack: devstack.Stack) -> str:
    return (
        f"postgresql://pipeline:{DEV_PIPELINE_PASSWORD}@127.0.0.1:{stack.ports.postgres}/{DEV_DB}"
    )


def backend_env(stack: devstack.Stack) -> dict[str, str]:
    """The Redis and PostgreSQL variables of a worker process using this stack."""
    return {
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(stack.ports.redis),
        "REDIS_PASSWORD": DEV_REDIS_PASSWORD,
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": str(stack.ports.postgres),
        "POSTGRES_DB": DEV_DB,
        "POSTGRES_USER": "pipeline",
        "POSTGRES_PASSWORD": DEV_PIPELINE_PASSWORD,
    }


def redis_client(stack: devstack.Stack) -> redis.Redis:
    return redis.Redis(port=stack.ports.redis, password=DEV_REDIS_PASSWORD, decode_responses=True)


def stop_redis(stack: devstack.Stack) -> None:
    client = redis.Redis(port=stack.ports.redis, password=DEV_REDIS_PASSWORD)
    # SAVE: the queues survive, as with the fleet's appendonly Redis.
    with contextlib.suppress(redis.exceptions.ConnectionError):
        client.shutdown(save=True)
    wait_for(lambda: not listening(stack.ports.redis), timeout=15, what="redis to stop")


def stop_postgres(stack: devstack.Stack) -> None:
    subprocess.run(
        [str(devstack.PG_BIN / "pg_ctl"), "-D", str(stack.pg_data), "-m", "fast", "-w", "stop"],
        user="postgres",
        group="postgres",
        extra_groups=[],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def restart_redis(stack: devstack.Stack, down_s: float = 0.0) -> None:
    """Stop with its data saved, stay away ``down_s``, start again (it loads the data)."""
    stop_redis(stack)
    time.sleep(down_s)
    devstack.start_redis(stack)


def restart_postgres(stack: devstack.Stack, down_s: float = 0.0) -> None:
    """``pg_ctl stop -m fast`` (every connection cut), stay away ``down_s``, then start
    with the stack's options."""
    stop_postgres(stack)
    time.sleep(down_s)
    devstack.start_postgres(stack)
