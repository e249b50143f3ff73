"""PostgreSQL access for the pipeline: a connection pool and schema management.

Stage-specific writes (upserts on natural keys) live beside this in the modules
that own them; they all take a connection from ``pool()`` so one transaction can
span a transcript and its classifications.
"""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from audio_pipeline.config import Settings, load_settings

# Package data, so `audio-pipeline init-db` works from an installed wheel; the
# repository's top-level schema.sql (what operators and the orchestrator role read)
# is a symlink to this file.
SCHEMA_PATH = Path(__file__).resolve().parent / "schema.sql"
POOL_MIN = 1
POOL_MAX = 4  # a worker runs one job at a time; a few spare for heartbeats/tools
POOL_TIMEOUT = 30.0  # seconds to wait for a free connection

# The pool warns at every failed reconnect, several lines a second while the database is
# away; the worker logs the outage itself, once (runtime.outage).
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)


def pool(settings: Settings | None = None, *, max_size: int = POOL_MAX) -> ConnectionPool:
    """An opened pool; connections return rows as dicts."""
    s = settings or load_settings()
    p = ConnectionPool(
        s.database_url,
        min_size=POOL_MIN,
        max_size=max_size,
        timeout=POOL_TIMEOUT,
        kwargs={"row_factory": dict_row, "application_name": f"audio-pipeline@{s.worker_host}"},
        # After a database restart every pooled connection is dead; checking one
        # before handing it out replaces it instead of failing the job that got it.
        check=ConnectionPool.check_connection,
        open=False,
    )
    p.open(wait=True, timeout=POOL_TIMEOUT)
    return p


def connect(settings: Settings | None = None) -> psycopg.Connection:
    """A single connection, for CLIs and one-off scripts."""
    s = settings or load_settings()
    return psycopg.connect(s.database_url, row_factory=dict_row)


def apply_schema(database_url: str, schema_path: Path = SCHEMA_PATH) -> None:
    """Apply schema.sql as the connecting role.

    Idempotent; the file runs its own transaction under an advisory lock, so the
    connection is in autocommit mode to let its BEGIN/COMMIT stand.
    """
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(schema_path.read_text())
