"""Peak memory of extract_archive on archives whose headers announce hundreds of MB.

Each case runs extract_archive in a fresh interpreter and reads how far the peak
of its Python allocations (tracemalloc) rose during the call, so nothing this test
process allocated counts. tracemalloc sees every bytes object tarfile and gzip
build, deterministically; peak RSS (ru_maxrss) was tried first and read 0 for a
64 MB read under the CI machine's sandbox. The archives are real files: the gzip
one is the review's reproduction (a few hundred KB), the plain ones are sparse files
that cost no disk.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.support import malicious_tars as bad

ROOT = Path(__file__).resolve().parents[2]
# What the call may add to the interpreter's peak; reading a 400 MB header adds
# at least 400 MB, and the control case below shows the probe sees such a read.
PEAK_GROWTH_LIMIT = 32 * bad.MB

PROBE = """
import json, sys, tracemalloc
from pathlib import Path
from audio_pipeline.archive import ArchiveError, ArchiveLimits, extract_archive

limits = ArchiveLimits(max_header_bytes=int(sys.argv[3])) if len(sys.argv) > 3 else None
tracemalloc.start()
before, _ = tracemalloc.get_traced_memory()
try:
    extract_archive(Path(sys.argv[1]), Path(sys.argv[2]), limits)
    outcome = "extracted"
except ArchiveError as exc:
    outcome = f"{type(exc).__name__}: {exc}"
_, peak = tracemalloc.get_traced_memory()
print(json.dumps({"growth": peak - before, "outcome": outcome}))
"""


def peak_growth(tar: Path, dest: Path, max_header_bytes: int | None = None) -> tuple[int, str]:
    args = [sys.executable, "-c", PROBE, str(tar), str(dest)]
    if max_header_bytes is not None:
        args.append(str(max_header_bytes))
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    return result["growth"], result["outcome"]


def test_gzip_tar_with_400_mb_pax_header_is_refused_in_little_memory(tmp_path):
    tar = bad.gzip_pax_bomb_tar(tmp_path / "bomb.tar", declared=400 * bad.MB)
    assert tar.stat().st_size < 1 * bad.MB
    growth, outcome = peak_growth(tar, tmp_path / "out")
    assert outcome.startswith("UnsupportedArchiveError: archive is gzip-compressed"), outcome
    assert growth < PEAK_GROWTH_LIMIT, f"peak allocations rose {growth} bytes"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kind", [tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK]
)
def test_plain_tar_with_400_mb_extended_header_is_refused_in_little_memory(tmp_path, kind):
    tar = bad.oversized_header_tar(tmp_path / "big-header.tar", kind, declared=400 * bad.MB)
    growth, outcome = peak_growth(tar, tmp_path / "out")
    assert outcome.startswith("ArchiveLimitError:")
    assert "UNPACK_MAX_HEADER_BYTES" in outcome
    assert growth < PEAK_GROWTH_LIMIT, f"peak allocations rose {growth} bytes"
    assert not (tmp_path / "out").exists()


def test_control_the_probe_sees_a_header_that_is_allowed_to_be_read(tmp_path):
    """With the limit raised over the header, tarfile reads it whole and the peak
    shows it: the limit, not the probe, keeps the cases above small."""
    declared = 64 * bad.MB
    tar = bad.oversized_header_tar(tmp_path / "allowed.tar", tarfile.XHDTYPE, declared)
    growth, outcome = peak_growth(tar, tmp_path / "out", max_header_bytes=declared)
    assert outcome == "extracted"
    assert growth >= declared
