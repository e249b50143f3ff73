"""s3_utils against the real SeaweedFS store."""

import os
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig

from audio_pipeline import s3_utils

pytestmark = pytest.mark.integration


def test_archive_round_trip_with_guide_functions(settings, tmp_path):
    src = tmp_path / "batch.tar"
    src.write_bytes(os.urandom(300_000))
    key = s3_utils.upload_archive(src, "b-42", settings)
    assert key == "archives/b-42.tar"
    local = s3_utils.download_archive(key, "b-42", settings)
    assert local == settings.scratch_root / "b-42" / "archive.tar"
    assert local.read_bytes() == src.read_bytes()
    s3_utils.cleanup_scratch("b-42", settings)
    assert not (settings.scratch_root / "b-42").exists()


def test_multipart_upload_is_verified(settings, s3_client, tmp_path, monkeypatch):
    small_parts = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    monkeypatch.setattr(s3_utils, "TRANSFER_CONFIG", small_parts)
    src = tmp_path / "big.tar"
    src.write_bytes(os.urandom(12 * 2**20))
    digest = s3_utils.upload_file(s3_client, settings.s3_bucket, src, "archives/big.tar")
    head = s3_client.head_object(Bucket=settings.s3_bucket, Key="archives/big.tar")
    assert "-" in head["ETag"], "expected a multipart ETag"
    out = tmp_path / "out" / "big.tar"
    assert s3_utils.download_file(s3_client, settings.s3_bucket, "archives/big.tar", out) == digest
    assert out.read_bytes() == src.read_bytes()


def test_download_detects_corruption_and_leaves_no_partial_file(settings, s3_client, tmp_path):
    # an object whose bytes do not match the digest recorded with it
    s3_client.put_object(
        Bucket=settings.s3_bucket,
        Key="archives/bad.tar",
        Body=b"tampered",
        Metadata={s3_utils.SHA256_METADATA_KEY: "0" * 64},
    )
    target = tmp_path / "dl" / "bad.tar"
    with pytest.raises(s3_utils.IntegrityError, match="downloaded sha256"):
        s3_utils.download_file(s3_client, settings.s3_bucket, "archives/bad.tar", target)
    assert list(target.parent.iterdir()) == []


def test_object_exists(settings, s3_client):
    assert not s3_utils.object_exists(s3_client, settings.s3_bucket, "nope")
    s3_client.put_object(Bucket=settings.s3_bucket, Key="yes", Body=b"1")
    assert s3_utils.object_exists(s3_client, settings.s3_bucket, "yes")


def test_cleanup_scratch_refuses_paths_outside_scratch(settings):
    with pytest.raises(ValueError, match="not directly under scratch root"):
        s3_utils.cleanup_scratch("../../etc", settings)


def test_keys():
    assert s3_utils.opus_key("b1", "dir/Song One.MP3") == "audio/b1/dir/Song One.opus"
    assert s3_utils.archive_key("b1") == "archives/b1.tar"
    assert Path(s3_utils.opus_key("b", "x.mp3")).suffix == ".opus"
