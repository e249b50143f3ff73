"""Safe extraction of an untrusted tar archive into a batch directory.

Archives come from a collection host we do not control, so every member is
checked before a single byte is written:

* names: no absolute paths, no ``..`` component, valid UTF-8, no control
  characters, no component longer than the filesystem allows, no duplicates;
* types: regular files and directories only; every symlink, hardlink, device,
  fifo and sparse member is refused (an audio batch never needs one);
* limits: at most ``max_members`` members, none declaring more than
  ``max_member_bytes``, all together declaring at most ``max_total_bytes``;
  bytes are counted again while writing, so a header that lies cannot push
  the batch past the total.

Python's own ``tarfile`` ``data`` filter is consulted for every member as well
(defence in depth) where the interpreter has it; our policy is stricter than it
(it allows links) and stands alone where it is missing: PEP 706 filters arrived
in CPython 3.11.4, and Debian 12's python3.11 (3.11.2, what the fleet's hosts
run) does not carry them.

Policy choice: one unsafe member rejects the WHOLE archive. Skipping the bad
member and extracting the rest would hide an attack or a broken producer
behind a batch that looks almost complete; rejecting it makes the failure
visible (the batch is marked failed with the reason, the job is dead-lettered)
and an operator decides what to do.

Extraction is atomic: members are written under ``<dest>.partial`` and the
directory is renamed to ``dest`` only when everything succeeded, so a crash or
an error never leaves a half-extracted batch that looks whole. Only audio
members are written (other regular files are validated, counted and listed as
skipped): nothing else in an archive is used, and it need not fill scratch.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import shutil
import stat
import tarfile
import unicodedata
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TypeVar

from audio_pipeline.config import ConfigError, EnvReader

_A = TypeVar("_A")
_R = TypeVar("_R")

# Defaults sized for a GPU VM's ~40 GB scratch volume; env-overridable.
MAX_MEMBERS = 20_000  # entries (files + directories) per archive
MAX_MEMBER_BYTES = 2 * 1024**3  # bytes declared by one member (2 GiB)
MAX_TOTAL_BYTES = 30 * 1024**3  # bytes declared by all members together (30 GiB)
MAX_NAME_COMPONENT_BYTES = 255  # NAME_MAX of ext4/xfs
COPY_CHUNK = 1024 * 1024  # bytes per read while writing a member
# None on Python < 3.11.4 (Debian 12's system python3): see the module docstring.
_DATA_FILTER: Callable[[tarfile.TarInfo, str], tarfile.TarInfo | None] | None = getattr(
    tarfile, "data_filter", None
)

AUDIO_SUFFIXES = frozenset({".mp3"})  # compared case-insensitively
PARTIAL_SUFFIX = ".partial"
FILE_MODE = 0o644  # archive modes are ignored: nothing extracted is executable
DIR_MODE = 0o755


class ArchiveError(Exception):
    """The archive cannot be extracted; the message says why (safe to show)."""


class UnsafeArchiveError(ArchiveError):
    """A member would escape the batch directory or is a kind we never extract."""


class ArchiveLimitError(UnsafeArchiveError):
    """Too many members, or more bytes than the limits allow."""


class CorruptArchiveError(ArchiveError):
    """Not a tar archive, or a truncated or damaged one."""


class EmptyArchiveError(ArchiveError):
    """The archive holds nothing to process."""


class NoAudioFilesError(EmptyArchiveError):
    """The archive has members, but none of them is an audio file."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = MAX_MEMBERS
    max_member_bytes: int = MAX_MEMBER_BYTES
    max_total_bytes: int = MAX_TOTAL_BYTES

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ArchiveLimits:
        """UNPACK_MAX_MEMBERS, UNPACK_MAX_MEMBER_BYTES, UNPACK_MAX_TOTAL_BYTES."""
        env = EnvReader(os.environ if environ is None else environ, production=False)
        limits = cls(
            max_members=env.int("UNPACK_MAX_MEMBERS", MAX_MEMBERS, minimum=1),
            max_member_bytes=env.int("UNPACK_MAX_MEMBER_BYTES", MAX_MEMBER_BYTES, minimum=1),
            max_total_bytes=env.int("UNPACK_MAX_TOTAL_BYTES", MAX_TOTAL_BYTES, minimum=1),
        )
        if env.errors:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(env.errors))
        return limits


@dataclass(frozen=True)
class ExtractedFile:
    rel_path: str  # POSIX, relative to the extraction root
    size_bytes: int
    sha256: str  # of the bytes written, computed while writing them


@dataclass(frozen=True)
class ExtractedArchive:
    """What came out: the audio files under ``root``, in archive order."""

    root: Path
    files: list[ExtractedFile]
    skipped: list[str] = field(default_factory=list)  # regular non-audio files, not written
    member_count: int = 0

    @property
    def audio_files(self) -> list[str]:
        return [f.rel_path for f in self.files]

    @property
    def bytes_written(self) -> int:
        return sum(f.size_bytes for f in self.files)


def is_audio_name(rel_path: str) -> bool:
    name = PurePosixPath(rel_path).name
    # "._x.mp3" is macOS AppleDouble metadata that tar on a Mac adds beside x.mp3
    return PurePosixPath(name).suffix.lower() in AUDIO_SUFFIXES and not name.startswith("._")


def extract_archive(
    tar_path: Path, dest: Path, limits: ArchiveLimits | None = None
) -> ExtractedArchive:
    """Validate ``tar_path`` completely, then extract its audio members into ``dest``.

    ``dest`` is replaced if it exists (a redelivered job extracts again). Raises
    an ArchiveError subclass, with nothing left at ``dest``, if the archive is
    unsafe, corrupt, empty or holds no audio.
    """
    limits = limits or ArchiveLimits()
    tar_path, dest = Path(tar_path), Path(dest)
    try:
        size = tar_path.stat().st_size
    except FileNotFoundError:
        raise CorruptArchiveError(f"archive {tar_path.name} does not exist") from None
    if size == 0:
        raise EmptyArchiveError("archive is empty (0 bytes)")

    partial = dest.with_name(dest.name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with _open(tar_path) as tf:
            plan = _validate(tf, partial, limits, archive_bytes=size)
            partial.mkdir(mode=DIR_MODE, parents=True)
            files = _write(tf, plan, partial, limits)
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return ExtractedArchive(
        root=dest,
        files=files,
        skipped=plan.skipped,
        member_count=plan.member_count,
    )


@dataclass
class _Plan:
    audio: list[tuple[str, tarfile.TarInfo]] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    member_count: int = 0


def _open(tar_path: Path) -> tarfile.TarFile:
    try:
        # "r:*" also reads gzip/bzip2/xz tars; decompressed bytes are counted
        # against the limits like any others, so a compression bomb stops there.
        return tarfile.open(tar_path, mode="r:*")
    except tarfile.ReadError:
        raise CorruptArchiveError(
            "not a readable tar archive: no valid tar header (nor gzip, bzip2 or xz data)"
        ) from None
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as exc:
        raise CorruptArchiveError(f"not a readable tar archive: {exc}") from None


def _validate(tf: tarfile.TarFile, dest: Path, limits: ArchiveLimits, archive_bytes: int) -> _Plan:
    """Read every header and apply the policy; raises before anything is written."""
    plan = _Plan()
    seen: dict[str, bool] = {}  # normalised path -> is a directory
    total = 0
    # Only a plain tar is read straight from the file, where offsets are file offsets.
    plain = isinstance(tf.fileobj, io.BufferedReader)
    try:
        for member in tf:
            plan.member_count += 1
            if plan.member_count > limits.max_members:
                raise ArchiveLimitError(
                    f"archive has more than {limits.max_members} members (UNPACK_MAX_MEMBERS)"
                )
            rel = _check_name(member.name)
            _check_type(member)
            if member.size > limits.max_member_bytes:
                raise ArchiveLimitError(
                    f"member {rel!r} declares {member.size} bytes, over the limit of "
                    f"{limits.max_member_bytes} (UNPACK_MAX_MEMBER_BYTES)"
                )
            total += member.size
            if total > limits.max_total_bytes:
                raise ArchiveLimitError(
                    f"members declare more than {limits.max_total_bytes} bytes in total "
                    f"(UNPACK_MAX_TOTAL_BYTES)"
                )
            if plain and member.offset_data + member.size > archive_bytes:
                missing = member.offset_data + member.size - archive_bytes
                raise CorruptArchiveError(
                    f"archive is truncated: member {member.name!r} declares {member.size} "
                    f"bytes but the file ends {missing} bytes short"
                )
            _check_data_filter(member, dest)
            if rel is None:  # "." or "./": the archive's own root
                continue
            _check_conflicts(rel, member.isdir(), seen)
            if member.isdir():
                plan.directories.append(rel)
            elif is_audio_name(rel):
                plan.audio.append((rel, member))
            else:
                plan.skipped.append(rel)
        _check_end_marker(tf)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as exc:
        raise CorruptArchiveError(
            f"archive is damaged after member {plan.member_count}: {exc}"
        ) from None
    if plan.member_count == 0:
        raise EmptyArchiveError("archive has no members")
    if not plan.audio:
        raise NoAudioFilesError(
            f"archive has {plan.member_count} members but no audio files "
            f"({', '.join(sorted(AUDIO_SUFFIXES))}, any case)"
        )
    return plan


def _check_name(name: str) -> str | None:
    """The member's path relative to the batch root, or None for the root itself."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeArchiveError(f"member name {name!r} is not valid UTF-8") from None
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise UnsafeArchiveError(f"member name {name!r} contains control characters")
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        raise UnsafeArchiveError(f"member {name!r} has an absolute path")
    # A backslash is an ordinary character on Linux, but "..\\" would climb out
    # for Windows tools that later fetch these paths from S3: refuse it as well.
    if ".." in name.replace("\\", "/").split("/"):
        raise UnsafeArchiveError(f"member {name!r} climbs out of the archive with '..'")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    for part in parts:
        if len(part.encode("utf-8")) > MAX_NAME_COMPONENT_BYTES:
            raise UnsafeArchiveError(
                f"member {name!r} has a name component over {MAX_NAME_COMPONENT_BYTES} bytes"
            )
    return "/".join(parts) if parts else None


def _check_type(member: tarfile.TarInfo) -> None:
    if member.issym():
        raise UnsafeArchiveError(f"member {member.name!r} is a symlink (to {member.linkname!r})")
    if member.islnk():
        raise UnsafeArchiveError(f"member {member.name!r} is a hardlink (to {member.linkname!r})")
    if member.ischr() or member.isblk():
        raise UnsafeArchiveError(f"member {member.name!r} is a device file")
    if member.isfifo():
        raise UnsafeArchiveError(f"member {member.name!r} is a fifo")
    if member.issparse():
        raise UnsafeArchiveError(f"member {member.name!r} is a sparse file")
    if not (member.isreg() or member.isdir()):
        raise UnsafeArchiveError(f"member {member.name!r} has unsupported type {member.type!r}")


def _check_data_filter(member: tarfile.TarInfo, dest: Path) -> None:
    if _DATA_FILTER is None:
        return
    try:
        _DATA_FILTER(member, str(dest))
    except tarfile.FilterError as exc:
        raise UnsafeArchiveError(
            f"member {member.name!r} refused by tarfile's filter: {exc}"
        ) from None


def _check_conflicts(rel: str, is_dir: bool, seen: dict[str, bool]) -> None:
    """Refuse duplicates and a file used as a directory (one would overwrite the other)."""
    previous = seen.get(rel)
    if previous is not None and not (previous and is_dir):
        raise UnsafeArchiveError(f"member {rel!r} appears more than once")
    parts = rel.split("/")
    for depth in range(1, len(parts)):
        parent = "/".join(parts[:depth])
        if seen.get(parent) is False:
            raise UnsafeArchiveError(f"member {rel!r} is inside {parent!r}, which is a file")
        seen.setdefault(parent, True)
    if previous is None:
        seen[rel] = is_dir
    elif not is_dir:
        raise UnsafeArchiveError(f"member {rel!r} is both a file and a directory")


def _write(
    tf: tarfile.TarFile, plan: _Plan, root: Path, limits: ArchiveLimits
) -> list[ExtractedFile]:
    """Write the planned audio members under ``root``, hashing them on the way.

    Read errors mean a damaged archive (CorruptArchiveError); write errors such
    as a full disk are this host's problem and propagate as OSError.
    """
    real_root = os.path.realpath(root)
    written = 0
    files: list[ExtractedFile] = []
    for rel, member in plan.audio:
        target = root / rel
        _make_parents(target.parent, root)
        # Belt and braces: nothing we create can be a link, but never write
        # through one or outside the root even so.
        if os.path.commonpath([real_root, os.path.realpath(target.parent)]) != real_root:
            raise UnsafeArchiveError(f"member {rel!r} would be written outside the batch")
        source = _read_side(rel, tf.extractfile, member)
        if source is None:
            raise CorruptArchiveError(f"member {rel!r} has no data")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
        member_bytes = 0
        digest = hashlib.sha256()
        with source, os.fdopen(fd, "wb") as out:
            while chunk := _read_side(rel, source.read, COPY_CHUNK):
                member_bytes += len(chunk)
                written += len(chunk)
                if member_bytes > limits.max_member_bytes or written > limits.max_total_bytes:
                    raise ArchiveLimitError(
                        f"member {rel!r} holds more bytes than the limits allow"
                    )
                digest.update(chunk)
                out.write(chunk)
        if member_bytes != member.size:
            raise CorruptArchiveError(
                f"member {rel!r} declares {member.size} bytes but holds {member_bytes}"
            )
        files.append(ExtractedFile(rel, member_bytes, digest.hexdigest()))
    return files


def _read_side(rel: str, func: Callable[[_A], _R], arg: _A) -> _R:
    """Call a tarfile read, turning every decoding failure into CorruptArchiveError."""
    try:
        return func(arg)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as exc:
        raise CorruptArchiveError(f"archive is damaged in member {rel!r}: {exc}") from None


def _check_end_marker(tf: tarfile.TarFile) -> None:
    """A complete tar ends with a zero block; tarfile silently stops at garbage or a
    cut header, which would quietly drop the members after it."""
    assert tf.fileobj is not None
    tf.fileobj.seek(tf.offset)
    block = tf.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise CorruptArchiveError(
            f"archive is truncated or damaged at byte {tf.offset}: no end-of-archive marker"
        )


def _make_parents(directory: Path, root: Path) -> None:
    """mkdir -p below ``root`` without ever following a link."""
    rel_parts = directory.relative_to(root).parts
    current = root
    for part in rel_parts:
        current = current / part
        try:
            current.mkdir(mode=DIR_MODE)
        except FileExistsError:
            mode = os.lstat(current).st_mode
            if not stat.S_ISDIR(mode):
                raise UnsafeArchiveError(
                    f"{current.relative_to(root)} exists and is not a directory"
                ) from None
