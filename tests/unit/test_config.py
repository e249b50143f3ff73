from pathlib import Path

import pytest

from audio_pipeline.config import ConfigError, host_transcribe_queue, load_settings


def test_development_defaults_point_at_the_local_stack():
    s = load_settings({})
    assert s.redis_host == "127.0.0.1"
    assert s.redis_port == 16379
    assert s.postgres_port == 15432
    assert s.s3_endpoint == "http://127.0.0.1:18333"
    assert s.scratch_root == Path("/tmp/scratch")
    assert not s.production


def test_production_names_every_missing_required_variable():
    with pytest.raises(ConfigError) as err:
        load_settings({"APP_ENV": "production", "REDIS_HOST": "10.0.0.5"})
    message = str(err.value)
    for name in (
        "POSTGRES_HOST",
        "S3_ENDPOINT",
        "S3_ACCESS_KEY",
        "S3_SECRET_KEY",
        "SCRATCH_ROOT",
        "MODELS_ROOT",
    ):
        assert name in message
    assert "REDIS_HOST" not in message


def test_malformed_numbers_are_reported_with_their_variable():
    with pytest.raises(ConfigError, match=r"REDIS_PORT='six' is not an integer"):
        load_settings({"REDIS_PORT": "six"})
    with pytest.raises(ConfigError, match="POSTGRES_PORT=0 is below the minimum 1"):
        load_settings({"POSTGRES_PORT": "0"})


def test_database_url_quotes_credentials():
    s = load_settings(
        {
            "POSTGRES_USER": "pipe line",
            "POSTGRES_PASSWORD": "p@ss:w/rd",
            "POSTGRES_HOST": "db",
            "POSTGRES_PORT": "5432",
            "POSTGRES_DB": "audio_pipeline",
        }
    )
    assert s.database_url == "postgresql://pipe%20line:p%40ss%3Aw%2Frd@db:5432/audio_pipeline"


def test_host_queue_is_derived_from_worker_host():
    s = load_settings({"WORKER_HOST": "gpu-01"})
    assert s.host_queue == host_transcribe_queue("gpu-01") == "queue:transcribe:gpu-01"
    assert s.batch_scratch("b1") == Path("/tmp/scratch/b1")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        ("", None),
        ("auto", None),
        (" AUTO ", None),
        ("1", True),
        ("true", True),
        ("0", False),
        ("off", False),
    ],
)
def test_prefetch_is_on_off_or_auto(raw, expected) -> None:
    from audio_pipeline.workers.gpu_worker import GpuSettings

    assert GpuSettings.from_env({} if raw is None else {"PREFETCH": raw}).prefetch is expected


def test_a_bad_prefetch_value_names_the_variable() -> None:
    from audio_pipeline.workers.gpu_worker import GpuSettings

    with pytest.raises(ConfigError, match="PREFETCH='sometimes' is not a boolean"):
        GpuSettings.from_env({"PREFETCH": "sometimes"})


def test_a_gpu_worker_reports_every_bad_setting_in_one_message() -> None:
    """Connections, heartbeat, queue, ASR and classifier settings are read together."""
    from audio_pipeline.runtime.service import read_service_config
    from audio_pipeline.workers.gpu_worker import GpuWorker

    with pytest.raises(ConfigError) as caught:
        read_service_config(
            GpuWorker,
            {
                "APP_ENV": "production",
                "REDIS_PORT": "many",
                "WORKER_HEARTBEAT_TTL_S": "0",
                "QUEUE_MAX_ATTEMPTS": "0",
                "BATCH_SIZE": "x",
                "ASR_DEVICE": "abacus",
                "FLAG_THRESHOLD": "2",
            },
        )
    message = str(caught.value)
    for name in (
        "REDIS_HOST must be set",
        "REDIS_PORT='many'",
        "WORKER_HEARTBEAT_TTL_S=0",
        "QUEUE_MAX_ATTEMPTS=0",
        "BATCH_SIZE='x'",
        "ASR_DEVICE='abacus'",
        "FLAG_THRESHOLD=2.0",
    ):
        assert name in message, message
    assert message.count("invalid configuration") == 1


def test_a_renamed_variable_is_read_under_its_old_name_with_a_warning(caplog) -> None:
    from audio_pipeline.workers.transfer_worker import TransferSettings

    env = {
        "COLLECTION_SSH_HOST": "h",
        "COLLECTION_SSH_USER": "u",
        "COLLECTION_SSH_KEY": "/k",
        "COLLECTION_DIR": "/d",
        "TRANSFER_STABLE_SECONDS": "7",
    }
    assert TransferSettings.from_env(env).stable_s == 7.0
    assert "old=TRANSFER_STABLE_SECONDS new=TRANSFER_STABLE_S" in caplog.text
    assert TransferSettings.from_env({**env, "TRANSFER_STABLE_S": "3"}).stable_s == 3.0
