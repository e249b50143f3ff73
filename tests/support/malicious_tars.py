"""Crafted bad archives for the extraction and unpack-worker tests.

Each builder writes one archive to ``path`` and returns it. Headers are built
with tarfile itself, so they are exactly what a hostile or broken producer could
send; sizes and link targets are set by hand where a real tool would refuse.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

FAKE_MP3 = b"ID3\x03\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x00" * 64
PAYLOAD = b"pwned\n"


def _file(name: str, data: bytes = FAKE_MP3) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
    return info, None


def write_tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def good_tar(path: Path, names: list[str]) -> Path:
    return write_tar(path, [_file(n) for n in names])


def traversal_tar(path: Path, depth: int = 3) -> Path:
    """A good member, then one that climbs out with ``..``."""
    escape = "../" * depth + "escaped.mp3"
    return write_tar(path, [_file("ok.mp3"), _file(escape, PAYLOAD)])


def nested_traversal_tar(path: Path) -> Path:
    """``..`` hidden in the middle of a path that starts innocently."""
    return write_tar(path, [_file("ok.mp3"), _file("a/b/../../../escaped.mp3", PAYLOAD)])


def absolute_path_tar(path: Path, target: Path) -> Path:
    """A member named with an absolute path (``target``, outside scratch)."""
    return write_tar(path, [_file("ok.mp3"), _file(str(target), PAYLOAD)])


def symlink_tar(path: Path, outside_dir: Path) -> Path:
    """The classic two-step: a link to a directory outside, then a file through it."""
    return write_tar(
        path,
        [
            _file("ok.mp3"),
            _special("sneaky", tarfile.SYMTYPE, str(outside_dir)),
            _file("sneaky/through-link.mp3", PAYLOAD),
        ],
    )


def relative_symlink_tar(path: Path) -> Path:
    """Even a link that stays inside the archive is refused."""
    return write_tar(path, [_file("ok.mp3"), _special("alias.mp3", tarfile.SYMTYPE, "ok.mp3")])


def hardlink_tar(path: Path, outside_file: Path) -> Path:
    return write_tar(
        path, [_file("ok.mp3"), _special("linked.mp3", tarfile.LNKTYPE, str(outside_file))]
    )


def device_tar(path: Path) -> Path:
    return write_tar(path, [_file("ok.mp3"), _special("dev.mp3", tarfile.CHRTYPE)])


def block_device_tar(path: Path) -> Path:
    return write_tar(path, [_file("ok.mp3"), _special("disk.mp3", tarfile.BLKTYPE)])


def fifo_tar(path: Path) -> Path:
    return write_tar(path, [_file("ok.mp3"), _special("pipe.mp3", tarfile.FIFOTYPE)])


def huge_declared_size_tar(path: Path, declared: int = 50 * 1024**3) -> Path:
    """A header claiming ``declared`` bytes followed by a few bytes of data."""
    info = tarfile.TarInfo("huge.mp3")
    info.size = declared
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    ok_info, ok_data = _file("ok.mp3")
    first = ok_info.tobuf(format=tarfile.GNU_FORMAT) + _padded(ok_data)
    path.write_bytes(first + header + _padded(b"x" * 1000))
    return path


def too_many_members_tar(path: Path, count: int) -> Path:
    return write_tar(path, [_file(f"f{i:05d}.mp3", b"x") for i in range(count)])


def truncated_tar(path: Path) -> Path:
    """A good archive cut in the middle of its second member's data."""
    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name in ("one.mp3", "two.mp3"):
            info, data = _file(name, FAKE_MP3 * 8)
            tf.addfile(info, io.BytesIO(data))
    raw = full.getvalue()
    second_header = 512 + len(_padded(FAKE_MP3 * 8))
    path.write_bytes(raw[: second_header + 512 + 100])
    return path


def garbage_after_members_tar(path: Path) -> Path:
    """Valid members, then junk where the next header should be."""
    good_tar(path, ["one.mp3"])
    raw = path.read_bytes()
    body = raw[: 512 + len(_padded(FAKE_MP3))]
    path.write_bytes(body + b"this is not a tar header " * 40)
    return path


def not_a_tar(path: Path) -> Path:
    path.write_text("Hello, I am a text file pretending to be an archive.\n" * 20)
    return path


def zero_byte_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def empty_tar(path: Path) -> Path:
    """A well-formed archive with no members."""
    return write_tar(path, [])


def no_audio_tar(path: Path) -> Path:
    return write_tar(path, [_file("README.txt", b"notes\n"), _file("cover.jpg", b"\xff\xd8")])


def duplicate_member_tar(path: Path) -> Path:
    return write_tar(path, [_file("same.mp3"), _file("same.mp3", PAYLOAD)])


def file_then_dir_tar(path: Path) -> Path:
    """``a`` as a file, then ``a/b.mp3`` expecting ``a`` to be a directory."""
    return write_tar(path, [_file("a"), _file("a/b.mp3")])


def _padded(data: bytes) -> bytes:
    remainder = len(data) % tarfile.BLOCKSIZE
    return data + b"\0" * (tarfile.BLOCKSIZE - remainder if remainder else 0)


# --- headers that make tarfile read (or collect) unbounded data -------------------

MB = 1024 * 1024


def _block(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _pax_record_start(keyword: str, length: int) -> bytes:
    """The start of one pax record ``"<length> <keyword>=<value>\\n"`` that is
    ``length`` bytes long in all; the value and newline follow."""
    return f"{length} {keyword}=".encode()


def _extended_header(kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(
        "././@PaxHeader" if kind in (tarfile.XHDTYPE, tarfile.XGLTYPE) else "././@LongLink"
    )
    info.type = kind
    info.size = size
    return info.tobuf(format=tarfile.GNU_FORMAT)


def oversized_header_tar(
    path: Path, kind: bytes = tarfile.XHDTYPE, declared: int = 400 * MB
) -> Path:
    """An extended header (pax ``x``/``g`` or GNU ``L``/``K``) announcing ``declared``
    bytes, then a good member: what tarfile reads whole into memory before any
    member check runs. The file is sparse, so it costs no disk."""
    ok_info, ok_data = _file("ok.mp3")
    with path.open("wb") as f:
        f.write(_extended_header(kind, declared))
        if kind in (tarfile.XHDTYPE, tarfile.XGLTYPE):
            f.write(_pax_record_start("comment", declared))
            f.seek(512 + declared - 1)
            f.write(b"\n")
        else:
            f.seek(512 + declared - 1)
            f.write(b"\0")
        f.seek(512 + _block(declared))
        f.write(ok_info.tobuf(format=tarfile.GNU_FORMAT) + _padded(ok_data) + b"\0" * 1024)
    return path


def gzip_pax_bomb_tar(path: Path, declared: int = 400 * MB) -> Path:
    """The review's reproduction: a gzip tar of a few hundred KB whose pax header
    holds ``declared`` bytes of one repeated byte, then a good member."""
    ok_info, ok_data = _file("ok.mp3")
    start = _pax_record_start("comment", declared)
    value = declared - len(start) - 1
    with gzip.open(path, "wb", compresslevel=6) as gz:
        gz.write(_extended_header(tarfile.XHDTYPE, declared) + start)
        chunk = b"a" * MB
        for _ in range(value // MB):
            gz.write(chunk)
        gz.write(b"a" * (value % MB) + b"\n" + b"\0" * (_block(declared) - declared))
        gz.write(ok_info.tobuf(format=tarfile.GNU_FORMAT) + _padded(ok_data) + b"\0" * 1024)
    return path


def header_chain_tar(path: Path, count: int) -> Path:
    """``count`` small pax extended headers in a row before one member."""
    ok_info, ok_data = _file("ok.mp3")
    record = b"13 comment=x\n"
    with path.open("wb") as f:
        for _ in range(count):
            f.write(_extended_header(tarfile.XHDTYPE, len(record)) + _padded(record))
        f.write(ok_info.tobuf(format=tarfile.GNU_FORMAT) + _padded(ok_data) + b"\0" * 1024)
    return path


def pax_sparse_tar(path: Path) -> Path:
    """A GNU sparse 1.0 member announced by pax records: tarfile then reads the
    sparse map from the data blocks for as many entries as the map claims."""
    entries = 10**9
    records = b"".join(
        f"{len(line) + len(str(len(line))) + 1} {line}".encode()
        for line in ("GNU.sparse.major=1\n", "GNU.sparse.minor=0\n", "GNU.sparse.realsize=1\n")
    )
    info = tarfile.TarInfo("sparse.mp3")
    info.size = 512
    with path.open("wb") as f:
        f.write(_extended_header(tarfile.XHDTYPE, len(records)) + _padded(records))
        f.write(info.tobuf(format=tarfile.GNU_FORMAT) + _padded(f"{entries}\n".encode()))
        f.write(b"\0" * 1024)
    return path


def gnu_sparse_tar(path: Path) -> Path:
    """An old-style GNU sparse member (type ``S``)."""
    return write_tar(path, [_file("ok.mp3"), _special("holes.mp3", tarfile.GNUTYPE_SPARSE)])


def negative_size_tar(path: Path) -> Path:
    """A member whose base-256 size field is -1 (tarfile accepts it)."""
    info, _ = _file("neg.mp3", b"")
    raw = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    raw[124:136] = b"\xff" * 12
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw)
    ok_info, ok_data = _file("ok.mp3")
    first = ok_info.tobuf(format=tarfile.GNU_FORMAT) + _padded(ok_data)
    path.write_bytes(first + bytes(raw) + b"\0" * 1024)
    return path
