"""``audio-pipeline check-connections``: real round trips to Redis, PostgreSQL and S3."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CLI = Path(sys.executable).parent / "audio-pipeline"


def check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLI), "check-connections", *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def failures(env: dict[str, str]) -> tuple[dict[str, str], str]:
    """``check-connections --json`` under ``env``, which must exit 1: the failing
    services' details by service, and the report as printed."""
    result = check(env, "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    return {c["service"]: c["detail"] for c in report["checks"] if not c["ok"]}, result.stdout


def test_every_service_answers_with_good_credentials(pipeline_env):
    result = check(pipeline_env, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["host"] == "testhost"
    assert [c["service"] for c in report["checks"]] == ["redis", "postgres", "s3"]
    details = {c["service"]: c["detail"] for c in report["checks"]}
    assert details == {"redis": "PONG", "postgres": "SELECT 1 as pipeline", "s3": "HeadBucket"}

    table = check(pipeline_env)
    assert table.returncode == 0, table.stdout
    assert table.stdout.splitlines()[0].split() == ["service", "result", "target", "detail"]


def test_wrong_redis_password_names_redis_only(pipeline_env):
    failed, printed = failures({**pipeline_env, "REDIS_PASSWORD": "wrong-password"})
    assert list(failed) == ["redis"]
    assert failed["redis"].startswith("AuthenticationError:")
    assert "wrong-password" not in printed  # a report never carries a secret

    table = check({**pipeline_env, "REDIS_PASSWORD": "wrong-password"})
    assert table.returncode == 1
    [line] = [x for x in table.stdout.splitlines() if x.startswith("redis")]
    assert "FAILED" in line
    assert "AuthenticationError" in line


def test_wrong_postgres_password_and_missing_bucket_are_named(pipeline_env):
    env = {**pipeline_env, "POSTGRES_PASSWORD": "nope", "S3_BUCKET": "no-such-bucket-here"}
    failed, _ = failures(env)
    assert sorted(failed) == ["postgres", "s3"]
    assert "password authentication failed" in failed["postgres"]
    assert failed["s3"].startswith("ClientError:")
    assert "404" in failed["s3"]


def test_wrong_s3_secret_and_closed_redis_port(pipeline_env):
    env = {**pipeline_env, "S3_SECRET_KEY": "not-the-secret", "REDIS_PORT": "1"}
    failed, _ = failures(env)
    assert sorted(failed) == ["redis", "s3"]
    assert failed["redis"].startswith("ConnectionError:")
    assert "403" in failed["s3"] or "SignatureDoesNotMatch" in failed["s3"]
