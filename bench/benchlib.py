"""Shared parts of the benchmarks: an isolated slice of the local stack, the report.

Every benchmark runs against the shared local stack (``devstack up``) but in its
own PostgreSQL database, S3 bucket, Redis database number and scratch directory,
exactly as tests/support/stack.py isolates a test, and removes them afterwards.

A report is one JSON file (``.bench/{name}.json`` unless ``--out`` says where)
plus a small table on stdout. Figures that matter are ratios against a baseline
measured in the same run on the same data; absolute times are context.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from psycopg import sql

from audio_pipeline import s3_utils
from audio_pipeline.db import apply_schema
from devtools import devstack

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / ".bench"
REDIS_DBS = 63  # db 0 holds the allocation counter; shared with tests/support/stack.py
REDIS_DB_COUNTER = "devstack:next-test-db"


def parse_args(
    description: str,
    argv: Sequence[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny size that proves the benchmark works (CI)"
    )
    parser.add_argument("--out", type=Path, help="JSON report path (default .bench/NAME.json)")
    return parser.parse_args(argv)


def machine() -> dict[str, Any]:
    """What the figures were measured on, including how busy the machine was."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "gpu": None,
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }


@dataclass
class Report:
    """Rows for the table and the JSON document of one benchmark run."""

    name: str
    smoke: bool
    started: float = field(default_factory=time.monotonic)
    info: dict[str, Any] = field(default_factory=machine)
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (what, value, note)
    data: dict[str, Any] = field(default_factory=dict)

    def row(self, what: str, value: str, note: str = "") -> None:
        self.rows.append((what, value, note))

    def write(self, out: Path | None) -> Path:
        self.info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        doc = {
            "benchmark": self.name,
            "size": "smoke" if self.smoke else "full",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_s": round(time.monotonic() - self.started, 2),
            "machine": self.info,
            **self.data,
        }
        path = out or DEFAULT_OUT_DIR / f"{self.name}{'-smoke' if self.smoke else ''}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(self.table())
        print(f"\nreport: {path}")
        return path

    def table(self) -> str:
        header = f"== {self.name} ({'smoke' if self.smoke else 'full'}) =="
        w1 = max([len(r[0]) for r in self.rows] + [4])
        w2 = max([len(r[1]) for r in self.rows] + [5])
        lines = [header]
        for what, value, note in self.rows:
            lines.append(f"  {what:<{w1}}  {value:>{w2}}  {note}".rstrip())
        load = self.info.get("load_avg_start")
        lines.append(f"  (machine: {self.info['cpus']} cpus, load avg at start {load})")
        return "\n".join(lines)


def ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator > 0 else float("inf")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Isolated:
    """A private slice of the local stack: env for subprocesses plus handles."""

    env: dict[str, str]
    stack: devstack.Stack
    database: str
    bucket: str
    redis_db: int
    root: Path

    @property
    def pipeline_url(self) -> str:
        return (
            f"postgresql://pipeline:{devstack.DEV_PIPELINE_PASSWORD}@127.0.0.1:"
            f"{self.stack.ports.postgres}/{self.database}"
        )

    def redis(self, decode: bool = True) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=int(self.env["REDIS_PORT"]),
            password=self.env["REDIS_PASSWORD"],
            db=self.redis_db,
            decode_responses=decode,
        )


@contextmanager
def isolated_stack(name: str, *, database: bool = True, bucket: bool = True) -> Iterator[Isolated]:
    """Own database (schema applied), bucket, Redis db and scratch; all removed after."""
    st = devstack.Stack.from_env()
    if not all(devstack.status(st).values()):
        raise SystemExit("the local stack is not running: run `.venv/bin/devstack up` first")
    base = st.env()
    tag = f"{name}_{uuid.uuid4().hex[:8]}"
    dbname = f"bench_{tag}"
    bucket_name = f"bench-{tag.replace('_', '-')}"
    root = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    admin = redis.Redis(
        host="127.0.0.1", port=int(base["REDIS_PORT"]), password=base["REDIS_PASSWORD"], db=0
    )
    redis_db = int(admin.incr(REDIS_DB_COUNTER)) % REDIS_DBS + 1
    s3 = s3_utils.client_from_env(base)
    made_db = made_bucket = False
    try:
        if database:
            with devstack.admin_connect(st) as conn:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER pipeline").format(sql.Identifier(dbname))
                )
            made_db = True
            with devstack.admin_connect(st, dbname) as conn:
                devstack.grant_ownership_model(conn)
        if bucket:
            s3.create_bucket(Bucket=bucket_name)
            made_bucket = True
        (root / "scratch").mkdir()
        (root / "models").mkdir()
        env = {
            **base,
            "POSTGRES_DB": dbname,
            "DATABASE_URL": (
                f"postgresql://ra_app:{devstack.DEV_RA_APP_PASSWORD}@127.0.0.1:"
                f"{st.ports.postgres}/{dbname}"
            ),
            "S3_BUCKET": bucket_name,
            "REDIS_DB": str(redis_db),
            "SCRATCH_ROOT": str(root / "scratch"),
            "MODELS_ROOT": str(root / "models"),
            "WORKER_HOST": "benchhost",
        }
        iso = Isolated(env, st, dbname, bucket_name, redis_db, root)
        if database:
            apply_schema(iso.pipeline_url)
        iso.redis().flushdb()
        yield iso
    finally:
        try:
            redis.Redis(
                host="127.0.0.1",
                port=int(base["REDIS_PORT"]),
                password=base["REDIS_PASSWORD"],
                db=redis_db,
            ).flushdb()
        finally:
            if made_bucket:
                _drop_bucket(s3, bucket_name)
            if made_db:
                with devstack.admin_connect(st) as conn:
                    conn.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(dbname)
                        )
                    )
            shutil.rmtree(root, ignore_errors=True)


def _drop_bucket(client: Any, name: str) -> None:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=name):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


def speech_corpus(out_dir: Path, n_files: int, seed: int, min_s: float, max_s: float) -> Any:
    """espeak-ng speech as MP3s on disk plus {rel_path: text}: (batch, {rel_path: mp3})."""
    import tarfile

    from devtools.sample import make_speech_batch

    batch = make_speech_batch(
        out_dir,
        f"corpus-{seed}",
        n_files,
        seed,
        min_s,
        max_s,
        cache_dir=DEFAULT_OUT_DIR / "espeak-cache",
    )
    files_dir = out_dir / "mp3"
    with tarfile.open(batch.tar_path) as tf:
        tf.extractall(files_dir, filter="data")
    return batch, {rel: files_dir / rel for rel in batch.manifest}


def empty_job() -> str:
    """The RQ side of the queue benchmark: a job that only returns a result.

    It lives here, not in bench_queue.py, so RQ can import it by name while that
    script runs as ``__main__``.
    """
    return "ok"
