"""Model store manifests and names: what a sync will accept from the bucket."""

from __future__ import annotations

import json

import pytest

from audio_pipeline.model_store import (
    FileEntry,
    Manifest,
    ModelStoreError,
    manifest_key,
    validate_name,
)

SHA = "ab" * 32


def manifest(files: dict[str, object]) -> str:
    return json.dumps({"format": 1, "name": "m", "files": files})


def test_round_trip() -> None:
    m = Manifest("whisper/x", {"a/b.bin": FileEntry(SHA, 3)}, "2026-01-01T00:00:00+00:00")
    assert Manifest.from_json("whisper/x", m.to_json()) == m
    assert manifest_key("whisper/x") == "models/whisper/x/.manifest.json"


@pytest.mark.parametrize(
    "path", ["../x", "/etc/passwd", "a/../../x", "a//b", "./a", "a\\b", ".manifest.json"]
)
def test_paths_outside_the_model_are_refused(path: str) -> None:
    with pytest.raises(ModelStoreError, match="model m: unreadable manifest"):
        Manifest.from_json("m", manifest({path: {"sha256": SHA, "size": 1}}))


@pytest.mark.parametrize(
    "entry", [{"sha256": "xyz", "size": 1}, {"sha256": SHA, "size": -1}, {"size": 1}]
)
def test_bad_entries_are_refused(entry: dict[str, object]) -> None:
    with pytest.raises(ModelStoreError, match="model m: unreadable manifest"):
        Manifest.from_json("m", manifest({"f": entry}))


def test_empty_or_foreign_manifests_are_refused() -> None:
    with pytest.raises(ModelStoreError, match="lists no files"):
        Manifest.from_json("m", manifest({}))
    with pytest.raises(ModelStoreError, match="unknown manifest format"):
        Manifest.from_json("m", json.dumps({"format": 99, "files": {}}))
    with pytest.raises(ModelStoreError, match="unreadable manifest"):
        Manifest.from_json("m", "not json")


@pytest.mark.parametrize("name", ["", "/abs", "a/../b", "a//b", ".hidden", "a b", "x/"])
def test_bad_names(name: str) -> None:
    with pytest.raises(ModelStoreError, match="bad model name"):
        validate_name(name)


def test_good_names() -> None:
    for name in ["nltk", "whisper/large-v3", "classifier/cope-a-9b", "alignment/wav2vec2-en"]:
        assert validate_name(name) == name
