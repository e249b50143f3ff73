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
  the batch past the total;
* headers: a pax extended header or GNU long-name/long-link header is refused
  above ``max_header_bytes`` BEFORE tarfile reads it (tarfile reads each one
  whole into memory, so its declared size is what an attacker controls), as
  are long chains of them, global pax headers above a small total, and GNU
  sparse headers (whose maps tarfile also collects without a bound); full
  member paths are capped at PATH_MAX. Members are validated one at a time
  and not kept by tarfile, so memory stays small whatever the member count.

Only an uncompressed tar is read, which is the transfer contract
(``archives/{batch_id}.tar``): a compressed one is refused with a clear error.
Decompression would let a small archive declare huge headers and data, and
nothing in the pipeline produces one.

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

import hashlib
import os
import re
import shutil
import stat
import tarfile
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TypeVar

from audio_pipeline.config import EnvReader, EnvSettings

_A = TypeVar("_A")
_R = TypeVar("_R")

# Defaults sized for a GPU VM's ~40 GB scratch volume; env-overridable.
MAX_MEMBERS = 20_000  # entries (files + directories) per archive
MAX_MEMBER_BYTES = 2 * 1024**3  # bytes declared by one member (2 GiB)
MAX_TOTAL_BYTES = 30 * 1024**3  # bytes declared by all members together (30 GiB)
MAX_NAME_COMPONENT_BYTES = 255  # NAME_MAX of ext4/xfs
MAX_NAME_BYTES = 4096  # PATH_MAX of Linux, for a member's whole path
# A pax or GNU long-name header holds a path, a few times and some xattrs;
# far below this in any archive a real tar writes.
MAX_HEADER_BYTES = 64 * 1024
# Global pax headers apply to (and are copied into) every later member, so
# they get a small budget for the whole archive (git archive writes ~50 bytes).
MAX_GLOBAL_HEADER_BYTES = 4096
# Extended headers in a row before one member (tarfile reads them recursively,
# holding each one); real archives use at most a global, a pax and L/K.
MAX_HEADER_CHAIN = 8
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


class UnsupportedArchiveError(ArchiveError):
    """A format the transfer contract does not allow (a compressed tar)."""


class EmptyArchiveError(ArchiveError):
    """The archive holds nothing to process."""


class NoAudioFilesError(EmptyArchiveError):
    """The archive has members, but none of them is an audio file."""


@dataclass(frozen=True)
class ArchiveLimits(EnvSettings):
    max_members: int = MAX_MEMBERS
    max_member_bytes: int = MAX_MEMBER_BYTES
    max_total_bytes: int = MAX_TOTAL_BYTES
    max_header_bytes: int = MAX_HEADER_BYTES

    @classmethod
    def read(cls, env: EnvReader) -> ArchiveLimits:
        """UNPACK_MAX_MEMBERS, UNPACK_MAX_MEMBER_BYTES, UNPACK_MAX_TOTAL_BYTES,
        UNPACK_MAX_HEADER_BYTES."""
        return cls(
            max_members=env.int("UNPACK_MAX_MEMBERS", MAX_MEMBERS, minimum=1),
            max_member_bytes=env.int("UNPACK_MAX_MEMBER_BYTES", MAX_MEMBER_BYTES, minimum=1),
            max_total_bytes=env.int("UNPACK_MAX_TOTAL_BYTES", MAX_TOTAL_BYTES, minimum=1),
            max_header_bytes=env.int(
                "UNPACK_MAX_HEADER_BYTES", MAX_HEADER_BYTES, minimum=tarfile.BLOCKSIZE
            ),
        )


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
        with _open(tar_path, limits) as tf:
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


# Everything tarfile raises for bytes that are not a well-formed tar.
_READ_ERRORS = (tarfile.TarError, EOFError)

_PAX_TYPES = frozenset({tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE})
_HEADER_KINDS = {
    tarfile.XHDTYPE: "pax extended",
    tarfile.XGLTYPE: "pax global",
    tarfile.SOLARIS_XHDTYPE: "Solaris extended",
    tarfile.GNUTYPE_LONGNAME: "GNU long-name",
    tarfile.GNUTYPE_LONGLINK: "GNU long-link",
}
# A GNU.sparse.* record turns the next member into a sparse file, whose map
# tarfile reads from the data blocks without a bound.
_SPARSE_RECORD = re.compile(rb"(?:\A|\n)\d+ GNU\.sparse\.")
_COMPRESSION_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x1f\x9d": "compress (.Z)",
    b"LZIP": "lzip",
}


class _BoundedTarInfo(tarfile.TarInfo):
    # tarfile documents _proc_member as the hook subclasses override; it runs
    # after the 512-byte header is parsed and before any block it announces is read.
    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if not isinstance(archive, _BoundedTarFile):
            raise TypeError("_BoundedTarInfo is only read by _BoundedTarFile")
        archive.check_header(self)
        return super()._proc_member(archive)


class _BoundedTarFile(tarfile.TarFile):
    """A plain tar read with every header's size checked before tarfile reads it."""

    def __init__(self, path: Path, limits: ArchiveLimits) -> None:
        # Set before super().__init__, which already reads the first header.
        self.limits = limits
        self.chain = 0  # extended headers seen since the last member header
        self.global_bytes = 0
        super().__init__(name=str(path), mode="r", tarinfo=_BoundedTarInfo)

    def check_header(self, info: tarfile.TarInfo) -> None:
        if info.size < 0:
            raise CorruptArchiveError(f"header at byte {info.offset} declares a negative size")
        kind = _HEADER_KINDS.get(info.type)
        if kind is None:
            if info.type == tarfile.GNUTYPE_SPARSE:
                raise UnsafeArchiveError(f"member {info.name!r} is a sparse file")
            self.chain = 0
            return
        self.chain += 1
        if self.chain > MAX_HEADER_CHAIN:
            raise UnsafeArchiveError(
                f"more than {MAX_HEADER_CHAIN} extended headers in a row at byte {info.offset}"
            )
        if info.size > self.limits.max_header_bytes:
            raise ArchiveLimitError(
                f"{kind} header at byte {info.offset} declares {info.size} bytes, over the "
                f"limit of {self.limits.max_header_bytes} (UNPACK_MAX_HEADER_BYTES)"
            )
        if info.type == tarfile.XGLTYPE:
            self.global_bytes += info.size
            if self.global_bytes > MAX_GLOBAL_HEADER_BYTES:
                raise ArchiveLimitError(
                    f"pax global headers hold more than {MAX_GLOBAL_HEADER_BYTES} bytes "
                    f"(at byte {info.offset})"
                )
        if info.type in _PAX_TYPES:
            assert self.fileobj is not None
            start = self.fileobj.tell()
            records = self.fileobj.read(info.size)
            self.fileobj.seek(start)
            if _SPARSE_RECORD.search(records):
                raise UnsafeArchiveError(
                    f"{kind} header at byte {info.offset} makes a sparse file (GNU.sparse)"
                )


def _open(tar_path: Path, limits: ArchiveLimits) -> _BoundedTarFile:
    try:
        return _BoundedTarFile(tar_path, limits)
    except tarfile.ReadError:
        compression = _compression(tar_path)
        if compression:
            raise UnsupportedArchiveError(
                f"archive is {compression}-compressed: only an uncompressed .tar is accepted "
                "(archives/{batch_id}.tar); send the tar without compressing it"
            ) from None
        raise CorruptArchiveError("not a readable tar archive: no valid tar header") from None
    except _READ_ERRORS as exc:
        raise CorruptArchiveError(f"not a readable tar archive: {exc}") from None


def _compression(tar_path: Path) -> str | None:
    with tar_path.open("rb") as f:
        head = f.read(8)
    return next(
        (name for magic, name in _COMPRESSION_MAGIC.items() if head.startswith(magic)), None
    )


def _validate(tf: tarfile.TarFile, dest: Path, limits: ArchiveLimits, archive_bytes: int) -> _Plan:
    """Read every header and apply the policy; raises before anything is written."""
    plan = _Plan()
    seen: dict[str, bool] = {}  # normalised path -> is a directory
    total = 0
    try:
        while (member := tf.next()) is not None:
            # tarfile keeps every member it reads, each with its pax records;
            # only the audio members the plan needs are kept, in slim form.
            tf.members.clear()
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
            if member.offset_data + member.size > archive_bytes:
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
                plan.audio.append((rel, _slim(member, rel)))
            else:
                plan.skipped.append(rel)
        _check_end_marker(tf)
    except _READ_ERRORS as exc:
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


def _slim(member: tarfile.TarInfo, rel: str) -> tarfile.TarInfo:
    """What extractfile needs of a regular member, without its pax records."""
    slim = tarfile.TarInfo(rel)
    slim.size = member.size
    slim.offset_data = member.offset_data
    return slim


def _check_name(name: str) -> str | None:
    """The member's path relative to the batch root, or None for the root itself."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeArchiveError(f"member name {name[:100]!r} is not valid UTF-8") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise UnsafeArchiveError(
            f"member name {name[:100]!r}... is {len(encoded)} bytes, over {MAX_NAME_BYTES}"
        )
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
    except _READ_ERRORS as exc:
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
