"""Migrations own only ra_* tables; settings fail loudly in production."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from audio_pipeline.config import ConfigError
from ra_app.config import load_ra_settings, sqlalchemy_url

REPO = Path(__file__).resolve().parents[2]
FLASK = [str(Path(sys.executable).parent / "flask"), "--app", "ra_app"]
RA_TABLES = {
    "ra_users",
    "ra_items",
    "ra_assignments",
    "ra_labels",
    "ra_api_tokens",
    "ra_adjudications",
    "ra_audit_log",
    "ra_alembic_version",
}
PIPELINE_TABLES = {"batches", "audio_files", "transcripts", "policies", "classifications"}


def _tables(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return dict(rows)


def _upgrade(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FLASK, "db", "upgrade"],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
def test_upgrade_on_the_pipeline_schema_creates_only_ra_tables(
    pipeline_env: dict[str, str],
) -> None:
    url = pipeline_env["DATABASE_URL"]
    before = _tables(url)
    first = _upgrade(pipeline_env)
    assert first.returncode == 0, first.stderr
    after = _tables(url)
    assert set(after) - set(before) == RA_TABLES
    assert {t: after[t] for t in before} == before  # pipeline tables untouched, same owners
    assert {after[t] for t in RA_TABLES} == {"ra_app"}
    assert set(before) >= PIPELINE_TABLES
    again = _upgrade(pipeline_env)  # idempotent
    assert again.returncode == 0, again.stderr
    assert _tables(url) == after


@pytest.fixture
def empty_env(stack_env: dict[str, str], empty_database: str) -> dict[str, str]:
    url = stack_env["DATABASE_URL"].rsplit("/", 1)[0] + f"/{empty_database}"
    return {**stack_env, "DATABASE_URL": url}


@pytest.mark.integration
def test_upgrade_on_an_empty_database(empty_env: dict[str, str]) -> None:
    result = _upgrade(empty_env)
    assert result.returncode == 0, result.stderr
    assert set(_tables(empty_env["DATABASE_URL"])) == RA_TABLES


def test_production_requires_database_url_and_secret_key() -> None:
    with pytest.raises(ConfigError) as err:
        load_ra_settings({"APP_ENV": "production"})
    message = str(err.value)
    for name in ("DATABASE_URL", "SECRET_KEY", "S3_ENDPOINT", "S3_ACCESS_KEY"):
        assert name in message


def test_production_settings_are_hardened() -> None:
    env: dict[str, Any] = {
        "APP_ENV": "production",
        "DATABASE_URL": "postgresql://ra_app:pw@db/audio",
        "SECRET_KEY": "x" * 40,
        "S3_ENDPOINT": "https://s3",
        "S3_ACCESS_KEY": "a",
        "S3_SECRET_KEY": "b",
        "REDIS_HOST": "redis",
        "REDIS_PORT": "6379",
        "REDIS_PASSWORD": "p w",
    }
    cfg = load_ra_settings(env).flask_config()
    assert cfg["SESSION_COOKIE_SECURE"]
    assert cfg["REMEMBER_COOKIE_SECURE"]
    assert cfg["SESSION_COOKIE_HTTPONLY"]
    assert cfg["SESSION_COOKIE_SAMESITE"] == "Lax"
    assert cfg["RATELIMIT_STORAGE_URI"] == "redis://:p%20w@redis:6379/0"
    assert cfg["SQLALCHEMY_DATABASE_URI"].startswith("postgresql+psycopg://")


def test_bad_queue_settings_are_named() -> None:
    with pytest.raises(ConfigError) as err:
        load_ra_settings(
            {
                "RA_QUEUE_ORDER": "alphabetical",
                "RA_DOUBLE_CODED_SHARE": "2",
                "CODEBOOK_PATH": "/nonexistent.yml",
                "RA_ASSIGNMENT_TTL_S": "5",
            }
        )
    message = str(err.value)
    for name in ("RA_QUEUE_ORDER", "RA_DOUBLE_CODED_SHARE", "CODEBOOK_PATH", "RA_ASSIGNMENT_TTL_S"):
        assert name in message
    assert load_ra_settings({}).queue_order == "score"
    assert load_ra_settings({"RA_QUEUE_ORDER": "uncertainty"}).queue_order == "uncertainty"
    assert load_ra_settings({}).blind == "audit"
    with pytest.raises(ConfigError, match="RA_BLIND"):
        load_ra_settings({"RA_BLIND": "partly"})
    assert sqlalchemy_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"
