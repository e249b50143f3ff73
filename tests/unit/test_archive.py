"""archive.extract_archive on real tar files: what is extracted, what is refused.

No services: these write real archives under tmp_path and extract them for
real. Every refusal is checked against a snapshot of the whole tmp_path tree,
so a byte written anywhere (inside or outside the batch) fails the test.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from audio_pipeline import archive
from audio_pipeline.archive import (
    ArchiveError,
    ArchiveLimitError,
    ArchiveLimits,
    CorruptArchiveError,
    EmptyArchiveError,
    NoAudioFilesError,
    UnsafeArchiveError,
    UnsupportedArchiveError,
    extract_archive,
    is_audio_name,
)
from audio_pipeline.config import ConfigError
from tests.support import malicious_tars as bad

ODD_NAMES = [
    "Session 1/día 2/clip 01.MP3",
    "UPPER/ÜNÏCÖDÉ/日本語 の 声.mp3",
    "x.y.final.Mp3",
    "deep/a/b/c/d/e/it's #1 & (best).mp3",
    "-leading-dash.mp3",
    "back\\slash.mp3",
]


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(autouse=True, params=["stdlib-data-filter", "no-data-filter"])
def tarfile_filters(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every case runs twice: with tarfile's data filter, and without it as on
    Debian 12's python3.11 (3.11.2), which the fleet's hosts run; our own checks
    must refuse every unsafe archive on their own."""
    if request.param == "no-data-filter":
        monkeypatch.setattr(archive, "_DATA_FILTER", None)
    elif archive._DATA_FILTER is None:
        pytest.skip("this interpreter's tarfile has no data filter (Python < 3.11.4)")


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("original\n")
    batch = tmp_path / "scratch" / "batch-1"
    batch.mkdir(parents=True)
    return {"root": tmp_path, "outside": outside, "batch": batch, "dest": batch / "files"}


def assert_refused(
    sandbox: dict[str, Path],
    tar: Path,
    error: type[ArchiveError],
    match: str,
    limits: ArchiveLimits | None = None,
) -> None:
    before = snapshot(sandbox["root"])
    with pytest.raises(error, match=match):
        extract_archive(tar, sandbox["dest"], limits)
    assert snapshot(sandbox["root"]) == before, "a refused archive wrote something"
    assert (sandbox["outside"] / "victim.txt").read_text() == "original\n"


# --- accepted archives ----------------------------------------------------------


def test_extracts_nested_odd_names_as_relative_posix_paths(sandbox, tmp_path):
    tar = bad.good_tar(tmp_path / "in.tar", [*ODD_NAMES, "notes.txt", "__MACOSX/._x.mp3"])
    result = extract_archive(tar, sandbox["dest"])
    assert result.audio_files == ODD_NAMES
    assert result.skipped == ["notes.txt", "__MACOSX/._x.mp3"]
    assert result.member_count == len(ODD_NAMES) + 2
    for rel in ODD_NAMES:
        path = sandbox["dest"] / rel
        assert path.read_bytes() == bad.FAKE_MP3
        assert not os.access(path, os.X_OK)
    assert not (sandbox["dest"] / "notes.txt").exists(), "non-audio members are not written"
    assert result.bytes_written == len(ODD_NAMES) * len(bad.FAKE_MP3)
    digest = hashlib.sha256(bad.FAKE_MP3).hexdigest()
    assert {(f.size_bytes, f.sha256) for f in result.files} == {(len(bad.FAKE_MP3), digest)}
    assert not sandbox["batch"].joinpath("files.partial").exists()


def test_tar_made_by_gnu_tar_with_dot_prefix_and_directories(sandbox, tmp_path):
    src = tmp_path / "src"
    (src / "Folder A" / "sub").mkdir(parents=True)
    (src / "Folder A" / "sub" / "one.mp3").write_bytes(b"1")
    (src / "two.MP3").write_bytes(b"22")
    tar = tmp_path / "gnu.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(src, arcname=".")
    result = extract_archive(tar, sandbox["dest"])
    assert sorted(result.audio_files) == ["Folder A/sub/one.mp3", "two.MP3"]
    assert (sandbox["dest"] / "two.MP3").read_bytes() == b"22"


def test_long_names_in_pax_and_gnu_headers_are_read(sandbox, tmp_path):
    long_name = "/".join(["d" * 200] * 3) + "/clip.mp3"  # over ustar's 255, under PATH_MAX
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        tar = tmp_path / f"long-{fmt}.tar"
        with tarfile.open(tar, "w", format=fmt) as tf:
            info = tarfile.TarInfo(long_name)
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
        assert extract_archive(tar, sandbox["dest"]).audio_files == [long_name]


def test_small_global_pax_header_as_git_archive_writes_is_read(sandbox, tmp_path):
    tar = tmp_path / "git.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "a" * 40}) as tf:
        info = tarfile.TarInfo("a.mp3")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    assert extract_archive(tar, sandbox["dest"]).audio_files == ["a.mp3"]


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_compressed_tar_is_refused_with_the_reason(sandbox, tmp_path, mode):
    """The transfer contract is an uncompressed .tar; decompressing would let a
    small archive declare huge headers (see test_archive_memory.py)."""
    tar = tmp_path / "in.tar.x"
    with tarfile.open(tar, mode) as tf:
        info = tarfile.TarInfo("a/b.mp3")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    kind = {"w:gz": "gzip", "w:bz2": "bzip2", "w:xz": "xz"}[mode]
    assert_refused(sandbox, tar, UnsupportedArchiveError, rf"{kind}-compressed.*uncompressed")


def test_extracting_again_replaces_the_previous_result(sandbox, tmp_path):
    """A redelivered job extracts into the same place: no stale files, no error."""
    extract_archive(bad.good_tar(tmp_path / "one.tar", ["old.mp3"]), sandbox["dest"])
    sandbox["batch"].joinpath("files.partial").mkdir()  # left by a crash mid-extraction
    result = extract_archive(bad.good_tar(tmp_path / "two.tar", ["new.mp3"]), sandbox["dest"])
    assert result.audio_files == ["new.mp3"]
    assert snapshot(sandbox["dest"]) == {"new.mp3"}
    assert not sandbox["batch"].joinpath("files.partial").exists()


def test_audio_names():
    assert is_audio_name("a/B.MP3")
    assert is_audio_name("x.y.final.Mp3")
    assert not is_audio_name("a/._B.mp3")
    assert not is_audio_name("song.mp3.txt")
    assert not is_audio_name("mp3")


# --- refused archives: nothing written anywhere -------------------------------------

UNSAFE_CASES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "dotdot": (lambda p, o: bad.traversal_tar(p), r"climbs out"),
    "nested-dotdot": (lambda p, o: bad.nested_traversal_tar(p), r"climbs out"),
    "absolute": (lambda p, o: bad.absolute_path_tar(p, o / "abs.mp3"), r"absolute path"),
    "symlink-out": (lambda p, o: bad.symlink_tar(p, o), r"symlink"),
    "symlink-in": (lambda p, o: bad.relative_symlink_tar(p), r"symlink"),
    "hardlink": (lambda p, o: bad.hardlink_tar(p, o / "victim.txt"), r"hardlink"),
    "char-device": (lambda p, o: bad.device_tar(p), r"device"),
    "block-device": (lambda p, o: bad.block_device_tar(p), r"device"),
    "fifo": (lambda p, o: bad.fifo_tar(p), r"fifo"),
    "duplicate": (lambda p, o: bad.duplicate_member_tar(p), r"more than once"),
    "file-as-dir": (lambda p, o: bad.file_then_dir_tar(p), r"which is a file"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE_CASES))
def test_unsafe_member_rejects_the_whole_archive(sandbox, tmp_path, case):
    build, match = UNSAFE_CASES[case]
    tar = build(tmp_path / f"{case}.tar", sandbox["outside"])
    assert_refused(sandbox, tar, UnsafeArchiveError, match)


@pytest.mark.parametrize(
    "name",
    ["bad\nname.mp3", "tab\there.mp3", "x" * 256 + ".mp3", "a/" + "é" * 128 + ".mp3"],
)
def test_hostile_names_are_refused(sandbox, tmp_path, name):
    tar = bad.good_tar(tmp_path / "names.tar", ["ok.mp3", name])
    assert_refused(sandbox, tar, UnsafeArchiveError, r"control characters|name component")


def test_name_that_is_not_utf8_is_refused(sandbox, tmp_path):
    tar = tmp_path / "latin1.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        info = tarfile.TarInfo("caf\xe9.mp3")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    assert_refused(sandbox, tar, UnsafeArchiveError, r"not valid UTF-8")


def test_huge_declared_size_is_refused_before_writing(sandbox, tmp_path):
    tar = bad.huge_declared_size_tar(tmp_path / "huge.tar")
    assert_refused(sandbox, tar, ArchiveLimitError, r"declares 53687091200 bytes")


def test_total_declared_size_limit(sandbox, tmp_path):
    tar = bad.good_tar(tmp_path / "sum.tar", ["a.mp3", "b.mp3", "c.mp3"])
    limits = ArchiveLimits(max_total_bytes=2 * len(bad.FAKE_MP3) + 1)
    assert_refused(sandbox, tar, ArchiveLimitError, r"UNPACK_MAX_TOTAL_BYTES", limits)


def test_too_many_members(sandbox, tmp_path):
    tar = bad.too_many_members_tar(tmp_path / "many.tar", 51)
    assert_refused(
        sandbox, tar, ArchiveLimitError, r"more than 50 members", ArchiveLimits(max_members=50)
    )
    assert len(extract_archive(tar, sandbox["dest"]).audio_files) == 51  # default limit


def test_member_limit_is_checked_on_declared_size(sandbox, tmp_path):
    tar = bad.good_tar(tmp_path / "one.tar", ["a.mp3"])
    limits = ArchiveLimits(max_member_bytes=len(bad.FAKE_MP3) - 1)
    assert_refused(sandbox, tar, ArchiveLimitError, r"UNPACK_MAX_MEMBER_BYTES", limits)


CORRUPT_CASES: dict[str, tuple[Callable[[Path], Path], type[ArchiveError], str]] = {
    "truncated": (bad.truncated_tar, CorruptArchiveError, r"truncated"),
    "garbage": (bad.garbage_after_members_tar, CorruptArchiveError, r"truncated or damaged"),
    "not-a-tar": (bad.not_a_tar, CorruptArchiveError, r"not a readable tar"),
    "zero-bytes": (bad.zero_byte_file, EmptyArchiveError, r"empty \(0 bytes\)"),
    "no-members": (bad.empty_tar, EmptyArchiveError, r"no members"),
    "no-audio": (bad.no_audio_tar, NoAudioFilesError, r"no audio files"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_CASES))
def test_corrupt_and_empty_archives_give_typed_errors(sandbox, tmp_path, case):
    build, error, match = CORRUPT_CASES[case]
    assert_refused(sandbox, build(tmp_path / f"{case}.tar"), error, match)


# --- headers: bounded before tarfile reads what they announce -----------------------

HEADER_KINDS = {
    "pax": (tarfile.XHDTYPE, "pax extended"),
    "pax-global": (tarfile.XGLTYPE, "pax global"),
    "gnu-longname": (tarfile.GNUTYPE_LONGNAME, "GNU long-name"),
    "gnu-longlink": (tarfile.GNUTYPE_LONGLINK, "GNU long-link"),
}


@pytest.mark.parametrize("case", sorted(HEADER_KINDS))
def test_oversized_extended_header_is_refused(sandbox, tmp_path, case):
    kind, label = HEADER_KINDS[case]
    tar = bad.oversized_header_tar(tmp_path / f"{case}.tar", kind, declared=400 * bad.MB)
    assert_refused(
        sandbox,
        tar,
        ArchiveLimitError,
        rf"{label} header at byte 0 declares 419430400 bytes.*UNPACK_MAX_HEADER_BYTES",
    )


def test_header_limit_is_configurable(sandbox, tmp_path):
    tar = bad.oversized_header_tar(tmp_path / "pax.tar", declared=100_000)
    assert_refused(sandbox, tar, ArchiveLimitError, r"declares 100000 bytes")
    assert extract_archive(tar, sandbox["dest"], ArchiveLimits(max_header_bytes=100_000))


def test_global_pax_headers_have_a_small_budget(sandbox, tmp_path):
    tar = tmp_path / "globals.tar"
    with tarfile.open(
        tar, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "g" * 5000}
    ) as tf:
        info = tarfile.TarInfo("a.mp3")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    assert_refused(sandbox, tar, ArchiveLimitError, r"pax global headers hold more than 4096")


def test_long_chain_of_extended_headers_is_refused(sandbox, tmp_path):
    assert extract_archive(bad.header_chain_tar(tmp_path / "ok.tar", 3), sandbox["dest"])
    tar = bad.header_chain_tar(tmp_path / "chain.tar", archive.MAX_HEADER_CHAIN + 1)
    assert_refused(sandbox, tar, UnsafeArchiveError, r"extended headers in a row")


def test_sparse_members_are_refused_before_their_map_is_read(sandbox, tmp_path):
    assert_refused(sandbox, bad.gnu_sparse_tar(tmp_path / "s.tar"), UnsafeArchiveError, r"sparse")
    tar = bad.pax_sparse_tar(tmp_path / "pax-sparse.tar")
    assert_refused(sandbox, tar, UnsafeArchiveError, r"sparse file \(GNU.sparse\)")


def test_negative_size_is_corrupt(sandbox, tmp_path):
    tar = bad.negative_size_tar(tmp_path / "neg.tar")
    assert_refused(sandbox, tar, CorruptArchiveError, r"negative size")


def test_name_over_path_max_is_refused(sandbox, tmp_path):
    name = "/".join(["d" * 250] * 20) + ".mp3"  # every component is fine, the path is not
    tar = tmp_path / "deep.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo(name)
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    assert_refused(sandbox, tar, UnsafeArchiveError, r"over 4096")


def test_missing_archive_is_an_archive_error(sandbox, tmp_path):
    assert_refused(sandbox, tmp_path / "nope.tar", CorruptArchiveError, r"does not exist")


def test_limits_from_env():
    limits = ArchiveLimits.from_env(
        {
            "UNPACK_MAX_MEMBERS": "7",
            "UNPACK_MAX_TOTAL_BYTES": "99",
            "UNPACK_MAX_HEADER_BYTES": "4096",
        }
    )
    assert limits == ArchiveLimits(max_members=7, max_total_bytes=99, max_header_bytes=4096)
    with pytest.raises(ConfigError, match="UNPACK_MAX_MEMBER_BYTES"):
        ArchiveLimits.from_env({"UNPACK_MAX_MEMBER_BYTES": "lots"})
