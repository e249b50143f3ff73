"""The S3 model store (publish / sync) against the real SeaweedFS of the local stack."""

from __future__ import annotations

import grp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from audio_pipeline import model_store, s3_utils
from audio_pipeline.config import Settings

pytestmark = pytest.mark.integration

NAME = "whisper/tiny-test"


def make_model(root: Path, weights: bytes = b"\x00\x01" * 40_000) -> Path:
    """A small model directory: nested files, one binary."""
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"kind": "test"}')
    (root / "model.bin").write_bytes(weights)
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("a\nb\nc\n")
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != model_store.MANIFEST_FILE
    }


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.rglob(".*") if p.name != model_store.LOCK_FILE)


def published_and_synced(settings: Settings, tmp_path: Path) -> tuple[Path, Path]:
    """A model made in ``tmp_path/src``, published as NAME and synced once into
    ``tmp_path/models``: (src, dest)."""
    src = make_model(tmp_path / "src")
    model_store.publish(src, NAME, settings)
    dest = tmp_path / "models"
    model_store.sync([NAME], dest, settings)
    return src, dest


def test_publish_then_sync_is_idempotent(settings: Settings, s3_client, tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    manifest = model_store.publish(src, NAME, settings)
    assert set(manifest.files) == {"config.json", "model.bin", "tokenizer/vocab.txt"}
    assert manifest.files["model.bin"].sha256 == s3_utils.sha256_file(src / "model.bin")
    stored = json.loads(
        s3_client.get_object(Bucket=settings.s3_bucket, Key=f"models/{NAME}/.manifest.json")[
            "Body"
        ].read()
    )
    assert stored["files"]["model.bin"]["size"] == 80_000

    dest = tmp_path / "models"
    first = model_store.sync([NAME], dest, settings)
    assert first.as_json() == {"changed": [NAME], "unchanged": [], "failed": {}}
    assert tree(dest / NAME) == tree(src)
    assert (dest / NAME / model_store.MANIFEST_FILE).is_file()
    assert oct((dest / NAME / "model.bin").stat().st_mode & 0o777) == oct(0o644)
    assert leftovers(dest / "whisper") == [".manifest.json"]

    second = model_store.sync([NAME], dest, settings)
    assert second.as_json() == {"changed": [], "unchanged": [NAME], "failed": {}}


def test_a_new_version_replaces_the_copy_and_reuses_unchanged_files(
    settings: Settings, tmp_path: Path
) -> None:
    src, dest = published_and_synced(settings, tmp_path)
    weights_inode = (dest / NAME / "model.bin").stat().st_ino

    (src / "config.json").write_text('{"kind": "test", "version": 2}')
    (src / "tokenizer" / "vocab.txt").unlink()
    model_store.publish(src, NAME, settings)
    result = model_store.sync([NAME], dest, settings)
    assert result.changed == [NAME]
    assert tree(dest / NAME) == tree(src)
    # the unchanged weights were linked from the old copy, not downloaded again
    assert (dest / NAME / "model.bin").stat().st_ino == weights_inode


def test_a_corrupt_remote_file_fails_by_name_and_keeps_the_old_copy(
    settings: Settings, s3_client, tmp_path: Path
) -> None:
    src, dest = published_and_synced(settings, tmp_path)
    before = tree(dest / NAME)

    # a new version is published, then one of its files is damaged in the store
    (src / "model.bin").write_bytes(b"\x02" * 1000)
    model_store.publish(src, NAME, settings)
    s3_client.put_object(Bucket=settings.s3_bucket, Key=f"models/{NAME}/model.bin", Body=b"bad")

    result = model_store.sync([NAME], dest, settings)
    assert result.changed == []
    reason = result.failed[NAME]
    assert f"model {NAME}: file model.bin does not match the manifest" in reason
    assert tree(dest / NAME) == before
    assert leftovers(dest / "whisper") == [".manifest.json"]


def test_a_missing_manifest_fails_by_name_and_others_still_sync(
    settings: Settings, s3_client, tmp_path: Path
) -> None:
    model_store.publish(make_model(tmp_path / "src"), NAME, settings)
    # a publish cut short: files but no manifest
    s3_client.put_object(Bucket=settings.s3_bucket, Key="models/nltk/x.txt", Body=b"x")
    dest = tmp_path / "models"
    result = model_store.sync(["nltk", "alignment/missing", NAME], dest, settings)
    assert result.changed == [NAME]
    assert set(result.failed) == {"nltk", "alignment/missing"}
    assert "model nltk: no manifest at s3://" in result.failed["nltk"]
    assert "models publish DIR --name alignment/missing" in result.failed["alignment/missing"]
    assert not (dest / "nltk").exists()


def test_a_local_copy_changed_since_its_sync_is_fetched_again(
    settings: Settings, tmp_path: Path
) -> None:
    src, dest = published_and_synced(settings, tmp_path)
    (dest / NAME / "model.bin").write_bytes(b"truncated")
    assert model_store.sync([NAME], dest, settings).changed == [NAME]
    assert tree(dest / NAME) == tree(src)


def test_group_readable_files(settings: Settings, tmp_path: Path) -> None:
    try:
        group = grp.getgrnam("nogroup")
    except KeyError:
        pytest.skip("no group 'nogroup' on this machine")
    if os.geteuid() != 0:
        pytest.skip("changing a file's group to one we are not in needs root")
    model_store.publish(make_model(tmp_path / "src"), NAME, settings)
    dest = tmp_path / "models"
    model_store.sync([NAME], dest, settings, group="nogroup")
    for path in [dest / "whisper", dest / NAME, dest / NAME / "tokenizer"]:
        assert (path.stat().st_gid, path.stat().st_mode & 0o777) == (group.gr_gid, 0o750)
    for path in [dest / NAME / "model.bin", dest / NAME / "tokenizer" / "vocab.txt"]:
        assert (path.stat().st_gid, path.stat().st_mode & 0o777) == (group.gr_gid, 0o640)


def test_publish_refuses_nested_models_and_bad_names(settings: Settings, tmp_path: Path) -> None:
    model_store.publish(make_model(tmp_path / "a"), NAME, settings)
    with pytest.raises(model_store.ModelStoreError, match="inside or around another model"):
        model_store.publish(make_model(tmp_path / "b"), "whisper", settings)
    with pytest.raises(model_store.ModelStoreError, match="inside or around another model"):
        model_store.publish(make_model(tmp_path / "c"), NAME + "/inner", settings)
    with pytest.raises(model_store.ModelStoreError, match="bad model name"):
        model_store.publish(tmp_path / "a", "../escape", settings)


def test_cli_reads_the_worker_env_file_and_prints_json(
    pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    from audio_pipeline.config import load_settings

    model_store.publish(make_model(tmp_path / "src"), NAME, load_settings(pipeline_env))
    # the worker's env file, escaped the way pipeline.env.j2 writes it
    env_file = tmp_path / "pipeline.env"
    env_file.write_text(
        "".join(
            f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"\n'
            for k, v in pipeline_env.items()
        )
    )
    bare = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "APP_ENV"))}
    cli = [sys.executable, "-m", "audio_pipeline.cli", "models", "sync"]
    dest = tmp_path / "models"
    args = [*cli, "--env-file", str(env_file), "--dest", str(dest), NAME]
    first = subprocess.run(args, env=bare, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"changed": [NAME], "unchanged": [], "failed": {}}
    second = subprocess.run(args, env=bare, capture_output=True, text=True, timeout=120)
    assert json.loads(second.stdout)["unchanged"] == [NAME]

    missing = subprocess.run(
        [*cli, "--env-file", str(env_file), "--dest", str(dest), "classifier/absent"],
        env=bare,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1
    assert "model classifier/absent: no manifest" in missing.stderr
