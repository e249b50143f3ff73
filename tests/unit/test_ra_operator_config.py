"""The operator page's settings (ra_app/config.py): optional, checked when set."""

from __future__ import annotations

import pytest

from audio_pipeline.config import ConfigError
from ra_app.config import load_ra_settings

PRODUCTION = {
    "APP_ENV": "production",
    "DATABASE_URL": "postgresql://ra_app:pw@db/audio",
    "SECRET_KEY": "x" * 40,
    "S3_ENDPOINT": "https://s3",
    "S3_ACCESS_KEY": "a",
    "S3_SECRET_KEY": "b",
    "REDIS_HOST": "127.0.0.1",
    "REDIS_PASSWORD": "limiter",
}


def test_unset_means_off() -> None:
    cfg = load_ra_settings(PRODUCTION).flask_config()
    assert cfg["OPERATOR_REDIS_URL"] == ""
    assert cfg["OPERATOR_DATABASE_URL"] == ""
    assert cfg["PROMETHEUS_URL"] == ""


def test_set_values_pass_through() -> None:
    env = {
        **PRODUCTION,
        "OPERATOR_REDIS_URL": "redis://ra-operator:s%2Fecret@127.0.0.1:6379/0",
        "OPERATOR_DATABASE_URL": "postgresql://pipeline:pw@127.0.0.1:5432/audio_pipeline",
        "PROMETHEUS_URL": "http://127.0.0.1:9090",
    }
    cfg = load_ra_settings(env).flask_config()
    assert cfg["OPERATOR_REDIS_URL"] == env["OPERATOR_REDIS_URL"]
    assert cfg["OPERATOR_DATABASE_URL"] == env["OPERATOR_DATABASE_URL"]
    assert cfg["PROMETHEUS_URL"] == "http://127.0.0.1:9090"


def test_bad_values_are_named_and_secrets_not_repeated() -> None:
    with pytest.raises(ConfigError) as err:
        load_ra_settings(
            {
                **PRODUCTION,
                "OPERATOR_REDIS_URL": "redis://ra-operator@127.0.0.1:6379/0",  # no password
                "OPERATOR_DATABASE_URL": "mysql://pipeline:hunter2@db/x",
                "PROMETHEUS_URL": "ftp://prometheus",
            }
        )
    message = str(err.value)
    assert "OPERATOR_REDIS_URL has no password" in message
    assert "OPERATOR_DATABASE_URL must be a postgresql or postgres URL" in message
    assert "PROMETHEUS_URL='ftp://prometheus' must be a http or https URL" in message
    assert "hunter2" not in message
