"""The local-stack fixtures every test shares: the real services, isolated per test.

The stack (Redis, PostgreSQL, SeaweedFS, sshd) starts once per session, or is
reused if ``devstack up`` already started it (then it is left running). Each test
that asks for ``pipeline_env`` gets its own PostgreSQL database cloned from a
schema template, its own S3 bucket, its own Redis database number and its own
scratch directory, so tests never see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg import sql

from audio_pipeline import s3_utils
from audio_pipeline.config import Settings, load_settings
from audio_pipeline.db import apply_schema
from devtools import devstack

REDIS_TEST_DBS = 63  # db 0 holds the allocation counter; 1..63 go to sessions


@pytest.fixture(scope="session")
def stack() -> Iterator[devstack.Stack]:
    st = devstack.Stack.from_env()
    already_up = all(devstack.status(st).values())
    if not already_up:
        devstack.up(st)
    yield st
    if not already_up:
        devstack.down(st)


@pytest.fixture(scope="session")
def stack_env(stack: devstack.Stack) -> dict[str, str]:
    return stack.env()


@pytest.fixture(scope="session")
def redis_db(stack_env: dict[str, str]) -> int:
    """A Redis database number of this session's own (concurrent sessions differ)."""
    admin = redis.Redis(
        host="127.0.0.1",
        port=int(stack_env["REDIS_PORT"]),
        password=stack_env["REDIS_PASSWORD"],
        db=0,
    )
    return int(admin.incr("devstack:next-test-db")) % REDIS_TEST_DBS + 1


@contextmanager
def scratch_database(
    stack: devstack.Stack, prefix: str, template: str | None = None
) -> Iterator[str]:
    """A database owned by the pipeline role, dropped afterwards: a copy of ``template``, or
    empty with the stack's ownership model (what a fresh fleet's database is)."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    create = sql.SQL("CREATE DATABASE {} OWNER pipeline").format(sql.Identifier(name))
    if template is not None:
        create += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with devstack.admin_connect(stack) as conn:
        conn.execute(create)
    try:
        if template is None:
            with devstack.admin_connect(stack, name) as conn:
                devstack.grant_ownership_model(conn)
        yield name
    finally:
        with devstack.admin_connect(stack) as conn:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(drop.format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def schema_template(stack: devstack.Stack) -> Iterator[str]:
    """A database holding the pipeline schema, cloned for each test."""
    with scratch_database(stack, "tmpl") as name:
        apply_schema(_pipeline_url(stack, name))
        yield name


@pytest.fixture
def empty_database(stack: devstack.Stack) -> Iterator[str]:
    """Name of a database with nothing in it yet, as a new fleet starts."""
    with scratch_database(stack, "empty") as name:
        yield name


def _pipeline_url(stack: devstack.Stack, dbname: str) -> str:
    return (
        f"postgresql://pipeline:{devstack.DEV_PIPELINE_PASSWORD}@127.0.0.1:"
        f"{stack.ports.postgres}/{dbname}"
    )


def _ra_url(stack: devstack.Stack, dbname: str) -> str:
    return (
        f"postgresql://ra_app:{devstack.DEV_RA_APP_PASSWORD}@127.0.0.1:"
        f"{stack.ports.postgres}/{dbname}"
    )


@pytest.fixture
def database(stack: devstack.Stack, schema_template: str) -> Iterator[str]:
    """Name of a fresh database with the pipeline schema applied."""
    with scratch_database(stack, "test", schema_template) as name:
        yield name


@pytest.fixture
def bucket(stack_env: dict[str, str]) -> Iterator[str]:
    """A fresh, empty S3 bucket, emptied and removed after the test."""
    client = s3_utils.client_from_env(stack_env)
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield name
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=name):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


@pytest.fixture
def pipeline_env(
    stack: devstack.Stack,
    stack_env: dict[str, str],
    database: str,
    bucket: str,
    redis_db: int,
    tmp_path: Path,
) -> dict[str, str]:
    """Environment for a pipeline process under test (pass it to subprocesses)."""
    scratch = tmp_path / "scratch"
    models = tmp_path / "models"
    scratch.mkdir()
    models.mkdir()
    env = {
        **stack_env,
        "POSTGRES_DB": database,
        "DATABASE_URL": _ra_url(stack, database),
        "S3_BUCKET": bucket,
        "REDIS_DB": str(redis_db),
        "SCRATCH_ROOT": str(scratch),
        "MODELS_ROOT": str(models),
        "WORKER_HOST": "testhost",
    }
    redis.Redis(
        host="127.0.0.1", port=int(env["REDIS_PORT"]), password=env["REDIS_PASSWORD"], db=redis_db
    ).flushdb()
    return env


@pytest.fixture
def settings(pipeline_env: dict[str, str]) -> Settings:
    return load_settings(pipeline_env)


@pytest.fixture
def db_conn(settings: Settings) -> Iterator[psycopg.Connection]:
    """A pipeline-role connection to this test's database (dict rows)."""
    from psycopg.rows import dict_row

    with psycopg.connect(settings.database_url, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture
def redis_client(settings: Settings) -> redis.Redis:
    from audio_pipeline.redis_conn import get_redis

    return get_redis(settings)


@pytest.fixture
def s3_client(settings: Settings):
    return s3_utils.get_s3_client(settings)
