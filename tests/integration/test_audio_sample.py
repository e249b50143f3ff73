"""sample.py: espeak-ng speech batches (real espeak-ng, ffmpeg and tar)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import unicodedata

import pytest

from audio_pipeline import audio
from audio_pipeline.archive import extract_archive, is_audio_name
from devtools import sample

pytestmark = pytest.mark.integration

# The batch the module's tests share; made again from the same arguments, it is the
# same bytes.
ODD_BATCH = {
    "batch_id": "b-odd",
    "n_files": 8,
    "seed": 7,
    "min_seconds": 2,
    "max_seconds": 6,
    "extra_members": {"broken/really text.mp3": b"not audio at all\n" * 20},
}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    out = tmp_path_factory.mktemp("collection")
    return sample.make_speech_batch(out, **ODD_BATCH)


def test_batch_has_odd_names_in_nested_folders(batch):
    names = list(batch.manifest)
    assert len(names) == 8
    assert all(is_audio_name(n) for n in names)
    assert any("/" in n and n.count("/") >= 2 for n in names), "nested folders"
    assert any(" " in n for n in names), "spaces"
    assert any(any(ord(c) > 127 for c in n) for n in names), "unicode"
    assert any(n.endswith(".MP3") for n in names), "upper-case suffix"
    assert any(n.rsplit("/", 1)[-1].count(".") >= 2 for n in names), "extra dots"
    assert all(unicodedata.category(c) != "Cc" for n in names for c in n)


def test_tar_holds_the_manifest_files_and_extracts_safely(batch, tmp_path):
    assert not list(batch.tar_path.parent.glob(".*")), "no partial files left beside the tar"
    with tarfile.open(batch.tar_path) as tf:
        files = [m.name for m in tf if m.isfile()]
    assert sorted(files) == sorted([*batch.manifest, "broken/really text.mp3"])
    result = extract_archive(batch.tar_path, tmp_path / "files")
    assert sorted(result.audio_files) == sorted(files)
    assert json.loads(batch.manifest_path.read_text()) == batch.manifest


def test_files_are_real_mp3_speech_of_the_stated_length(batch, tmp_path):
    root = extract_archive(batch.tar_path, tmp_path / "files").root
    for rel, seconds in batch.durations.items():
        assert 2.0 <= seconds <= 6.0 + 3.0, rel  # a sentence may overrun a short target
        info = audio.probe(root / rel)
        assert info.codec == "mp3"
        assert info.duration_s == pytest.approx(seconds, abs=0.15), rel
        assert batch.manifest[rel].strip(), rel
    assert batch.total_seconds == pytest.approx(sum(batch.durations.values()))


def test_same_seed_same_bytes_other_seed_other_speech(batch, tmp_path):
    again = sample.make_speech_batch(tmp_path / "a", **ODD_BATCH, cache_dir=tmp_path / "cache")
    assert again.manifest == batch.manifest
    assert again.tar_path.read_bytes() == batch.tar_path.read_bytes()
    other = sample.make_speech_batch(tmp_path / "b", "b-other", n_files=8, seed=8)
    assert other.manifest != batch.manifest


def test_lengths_span_the_requested_range(tmp_path):
    long = sample.make_speech_batch(
        tmp_path, "long", n_files=3, seed=1, min_seconds=20, max_seconds=30
    )
    assert all(15 <= s <= 33 for s in long.durations.values()), long.durations


def test_cli_prints_a_json_summary(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "devtools.sample",
            "--out",
            str(tmp_path),
            "--batch-id",
            "cli-1",
            "--files",
            "2",
            "--max-seconds",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads(proc.stdout)
    assert summary["files"] == 2
    assert summary["tar_path"] == str(tmp_path / "cli-1.tar")
    assert (tmp_path / "cli-1.tar").is_file()


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="n_files"):
        sample.make_speech_batch(tmp_path, "x", n_files=0)
    with pytest.raises(ValueError, match="min_seconds"):
        sample.make_speech_batch(tmp_path, "x", n_files=1, min_seconds=5, max_seconds=2)
