"""``audio-pipeline s3 ls|get``: the guide's awscli checks, with a host's own env file,
against the local stack's real S3 store (SeaweedFS)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from audio_pipeline import s3_utils
from audio_pipeline.s3_cli import S3CommandError, split_location

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "audio_pipeline.cli", "s3"]


def write_env_file(env: dict[str, str], path: Path) -> Path:
    """The worker's env file, escaped the way pipeline.env.j2 writes it."""
    path.write_text(
        "".join(
            f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"\n'
            for k, v in env.items()
        )
    )
    return path


def run(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # No S3_* in the process environment: everything comes from the file, as when
    # an operator runs it through ansible on a host.
    bare = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "APP_ENV"))}
    return subprocess.run(
        [*CLI, *args, "--env-file", str(env_file)],
        env=bare,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def stored(pipeline_env: dict[str, str], tmp_path: Path) -> dict[str, bytes]:
    """Two archives and an Opus file in the test's bucket, uploaded as the workers do."""
    client = s3_utils.client_from_env(pipeline_env)
    bucket = pipeline_env["S3_BUCKET"]
    objects = {
        "archives/b-001.tar": os.urandom(300_000),
        "archives/b-002.tar": b"x" * 1234,
        "audio/b-001/a.opus": b"opus",
    }
    for key, data in objects.items():
        local = tmp_path / "upload" / key
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        s3_utils.upload_file(client, bucket, local, key)
    return objects


def test_split_location() -> None:
    assert split_location("archives/", "pipe") == ("pipe", "archives/")
    assert split_location("s3://other/archives/x.tar", "pipe") == ("other", "archives/x.tar")
    assert split_location("s3://other", "pipe") == ("other", "")
    with pytest.raises(S3CommandError, match="no bucket"):
        split_location("s3:///archives/", "pipe")


def test_ls_lists_keys_under_a_prefix_and_counts_them(
    pipeline_env: dict[str, str], stored: dict[str, bytes], tmp_path: Path
) -> None:
    env_file = write_env_file(pipeline_env, tmp_path / "transfer.env")
    listed = run(env_file, "ls", "archives/")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[-1] for line in lines] == ["archives/b-001.tar", "archives/b-002.tar"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d +300000 archives/b-001\.tar", lines[0])

    counted = run(env_file, "ls", "archives/", "--count")
    assert counted.returncode == 0, counted.stderr
    bucket = pipeline_env["S3_BUCKET"]
    assert counted.stdout == f"2 object(s), 301234 bytes under s3://{bucket}/archives/\n"

    # the guide's spelling, s3://BUCKET/PREFIX, and the whole bucket
    assert run(env_file, "ls", f"s3://{bucket}/audio/").stdout.split()[-1] == "audio/b-001/a.opus"
    assert run(env_file, "ls", "--count").stdout.startswith("3 object(s), ")

    empty = run(env_file, "ls", "nothing-here/")
    assert (empty.returncode, empty.stdout) == (0, "")
    assert "no objects under" in empty.stderr


def test_get_downloads_verified_and_reports_its_speed(
    pipeline_env: dict[str, str], stored: dict[str, bytes], tmp_path: Path
) -> None:
    env_file = write_env_file(pipeline_env, tmp_path / "pipeline.env")
    dest = tmp_path / "test.tar"
    got = run(env_file, "get", "archives/b-001.tar", str(dest))
    assert got.returncode == 0, got.stderr
    assert dest.read_bytes() == stored["archives/b-001.tar"]
    assert re.search(
        r" -> .*test\.tar: 300000 bytes in [\d.]+ s \([\d.]+ MB/s\), sha256 verified$",
        got.stdout.strip(),
    ), got.stdout

    # a directory as DEST keeps the key's file name
    into = tmp_path / "dir"
    into.mkdir()
    assert run(env_file, "get", "archives/b-002.tar", str(into)).returncode == 0
    assert (into / "b-002.tar").read_bytes() == b"x" * 1234


def test_get_names_a_missing_object_and_refuses_a_damaged_one(
    pipeline_env: dict[str, str], stored: dict[str, bytes], tmp_path: Path
) -> None:
    env_file = write_env_file(pipeline_env, tmp_path / "pipeline.env")
    bucket = pipeline_env["S3_BUCKET"]
    missing = run(env_file, "get", "archives/absent.tar", str(tmp_path / "a.tar"))
    assert missing.returncode == 1
    assert f"s3://{bucket}/archives/absent.tar: no such object" in missing.stderr
    assert not (tmp_path / "a.tar").exists()

    # bytes that do not match the digest recorded at upload: refused, nothing left behind
    client = s3_utils.client_from_env(pipeline_env)
    client.put_object(
        Bucket=bucket,
        Key="archives/bad.tar",
        Body=b"tampered",
        Metadata={s3_utils.SHA256_METADATA_KEY: "0" * 64},
    )
    bad = run(env_file, "get", "archives/bad.tar", str(tmp_path / "bad.tar"))
    assert bad.returncode == 1
    assert "does not match" in bad.stderr or "!= recorded" in bad.stderr, bad.stderr
    assert list(tmp_path.glob("bad.tar*")) == []

    no_key = run(env_file, "get", "archives/", str(tmp_path))
    assert no_key.returncode == 1
    assert "names no object" in no_key.stderr


def test_a_wrong_secret_is_reported_not_retried(
    pipeline_env: dict[str, str], stored: dict[str, bytes], tmp_path: Path
) -> None:
    env_file = write_env_file(
        {**pipeline_env, "S3_SECRET_KEY": "not-the-secret"}, tmp_path / "pipeline.env"
    )
    refused = run(env_file, "ls", "archives/")
    assert refused.returncode == 1
    assert "audio-pipeline s3 ls: S3:" in refused.stderr
    assert "not-the-secret" not in refused.stderr + refused.stdout

    unreadable = run(tmp_path / "no-such.env", "ls")
    assert unreadable.returncode == 2
    assert "cannot read environment file" in unreadable.stderr
