"""Crafted bad archives for the extraction and unpack-worker tests.

Each builder writes one archive to ``path`` and returns it. Headers are built
with tarfile itself, so they are exactly what a hostile or broken producer could
send; sizes and link targets are set by hand where a real tool would refuse.
"""

from __future__ import annotations

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
