"""S3-compatible object storage: archives/{batch_id}.tar and audio/{batch_id}/....

Keeps the reference guide's functions (get_s3_client, upload_archive,
download_archive, cleanup_scratch) and adds what production needs: path-style
s3v4 addressing (Swift, SeaweedFS and MinIO all accept it), multipart transfers
for large archives, and an end-to-end SHA-256 check. The digest travels as object
metadata, so a download is verified against what the uploader actually read,
whatever checksums the store itself supports.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from audio_pipeline.config import Settings, load_settings

log = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 64 * 1024 * 1024  # bytes; above this, upload in parts
MULTIPART_CHUNK = 16 * 1024 * 1024  # bytes per part
SHA256_METADATA_KEY = "sha256"  # stored as x-amz-meta-sha256
HASH_BLOCK = 1024 * 1024  # bytes read per hashing step

TRANSFER_CONFIG = TransferConfig(
    multipart_threshold=MULTIPART_THRESHOLD,
    multipart_chunksize=MULTIPART_CHUNK,
    max_concurrency=4,
)


class IntegrityError(RuntimeError):
    """An object's bytes do not match the digest recorded when it was uploaded."""


def archive_key(batch_id: str) -> str:
    return f"archives/{batch_id}.tar"


def opus_key(batch_id: str, rel_path: str) -> str:
    """S3 key of a converted file: audio/{batch_id}/{rel_path with .opus}."""
    return f"audio/{batch_id}/{Path(rel_path).with_suffix('.opus').as_posix()}"


def make_client(
    endpoint: str, access_key: str, secret_key: str, region: str, *, max_attempts: int = 5
) -> Any:
    """An S3 client for one endpoint and key pair: the one client both apps use.

    The RA app calls it with its own settings (it has no pipeline ``Settings``).
    """
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
            # Only send/verify checksums the operation requires: S3-compatible
            # stores differ in which flexible checksums they understand.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def get_s3_client(settings: Settings | None = None, *, max_attempts: int = 5) -> Any:
    """S3 client for the configured endpoint (OpenStack Swift, SeaweedFS, MinIO).

    ``max_attempts`` 1 suits a health check, which should report an outage, not
    ride it out.
    """
    s = settings or load_settings()
    return make_client(
        s.s3_endpoint, s.s3_access_key, s.s3_secret_key, s.s3_region, max_attempts=max_attempts
    )


def client_from_env(env: Mapping[str, str]) -> Any:
    """A client from an environment mapping (the devstack's, a test's)."""
    return make_client(
        env["S3_ENDPOINT"],
        env["S3_ACCESS_KEY"],
        env["S3_SECRET_KEY"],
        env.get("S3_REGION", "us-east-1"),
    )


def ensure_bucket(client: Any, bucket: str) -> None:
    """Create ``bucket`` unless it exists (idempotent)."""
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in {"404", "NoSuchBucket", "NotFound"}:
            raise
        client.create_bucket(Bucket=bucket)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def upload_file(
    client: Any,
    bucket: str,
    local_path: Path,
    key: str,
    sha256: str | None = None,
    content_type: str | None = None,
) -> str:
    """Upload ``local_path`` to ``key`` and verify the stored size and digest.

    Returns the SHA-256 of the uploaded bytes. Multipart is used above
    MULTIPART_THRESHOLD; the upload is only complete (visible) once every part
    arrived, so readers never see a partial object.
    """
    sha256 = sha256 or sha256_file(local_path)
    extra: dict[str, Any] = {"Metadata": {SHA256_METADATA_KEY: sha256}}
    if content_type:
        extra["ContentType"] = content_type
    client.upload_file(str(local_path), bucket, key, ExtraArgs=extra, Config=TRANSFER_CONFIG)
    head = client.head_object(Bucket=bucket, Key=key)
    size = local_path.stat().st_size
    if head["ContentLength"] != size or head["Metadata"].get(SHA256_METADATA_KEY) != sha256:
        raise IntegrityError(
            f"s3://{bucket}/{key}: stored object does not match {local_path} "
            f"({head['ContentLength']} bytes vs {size})"
        )
    return sha256


def download_file(client: Any, bucket: str, key: str, local_path: Path) -> str:
    """Download ``key`` to ``local_path`` atomically and verify its SHA-256.

    Writes to a sibling temporary name and renames on success, so a crash or a
    failed check never leaves a plausible-looking partial file behind.
    """
    head = client.head_object(Bucket=bucket, Key=key)
    expected = head["Metadata"].get(SHA256_METADATA_KEY)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    partial = local_path.with_name(local_path.name + ".part")
    try:
        client.download_file(bucket, key, str(partial), Config=TRANSFER_CONFIG)
        actual = sha256_file(partial)
        if expected and actual != expected:
            raise IntegrityError(
                f"s3://{bucket}/{key}: downloaded sha256 {actual} != recorded {expected}"
            )
        partial.replace(local_path)
    finally:
        partial.unlink(missing_ok=True)
    return actual


# What S3 (and SeaweedFS, Swift) answer for a key that is not there: HEAD gives a
# bare 404 or NotFound, GET gives NoSuchKey.
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def is_not_found(exc: ClientError) -> bool:
    """Whether ``exc`` says the object does not exist (not: access denied, ...)."""
    return exc.response.get("Error", {}).get("Code") in NOT_FOUND_CODES


def object_exists(client: Any, bucket: str, key: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if is_not_found(exc):
            return False
        raise
    return True


# --- The reference guide's functions, kept with their signatures -----------


def upload_archive(local_path: Path, batch_id: str, settings: Settings | None = None) -> str:
    """Upload an archive to S3, return its key (archives/{batch_id}.tar)."""
    s = settings or load_settings()
    key = archive_key(batch_id)
    upload_file(
        get_s3_client(s), s.s3_bucket, Path(local_path), key, content_type="application/x-tar"
    )
    return key


def download_archive(s3_key: str, batch_id: str, settings: Settings | None = None) -> Path:
    """Download an archive to SCRATCH_ROOT/{batch_id}/archive.tar, verified."""
    s = settings or load_settings()
    local_path = s.batch_scratch(batch_id) / "archive.tar"
    download_file(get_s3_client(s), s.s3_bucket, s3_key, local_path)
    return local_path


def cleanup_scratch(batch_id: str, settings: Settings | None = None) -> None:
    """Remove a batch's scratch directory after processing."""
    s = settings or load_settings()
    scratch_dir = s.batch_scratch(batch_id)
    # batch ids are validated upstream; this guards against a path escaping scratch
    if scratch_dir.resolve().parent != s.scratch_root.resolve():
        raise ValueError(f"refusing to delete {scratch_dir}: not directly under scratch root")
    shutil.rmtree(scratch_dir, ignore_errors=True)
