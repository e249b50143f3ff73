"""Unpack: MP3 -> Opus throughput, one ffmpeg process at a time against all cores.

    .venv/bin/python -m bench.bench_unpack [--smoke] [--out PATH]

Runs ``audio_pipeline.audio.convert_many`` (what the unpack worker calls: probe,
``ffmpeg -threads 1`` to Opus 16 kHz mono, probe of the output, atomic rename) on
the same espeak-ng MP3 corpus with UNPACK_FFMPEG_JOBS=1 (baseline) and with one
job per core (the default). The two are interleaved over ROUNDS rounds and the
fastest round of each counts, which keeps a neighbour's burst from deciding it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from audio_pipeline.audio import AudioSettings, Conversion, convert_many
from bench import benchlib

FULL_FILES, SMOKE_FILES = 48, 6
FULL_ROUNDS, SMOKE_ROUNDS = 2, 1
MIN_S, MAX_S, SMOKE_MAX_S = 3.0, 30.0, 8.0
CORPUS_SEED = 11
TARGET_SPEEDUP_2_CORES = 1.8


def run_once(mp3s: dict[str, Path], out: Path, jobs: int) -> tuple[float, float]:
    """(wall seconds, audio seconds) of converting every file with ``jobs`` processes."""
    shutil.rmtree(out, ignore_errors=True)
    conversions = [
        Conversion(rel, src, out / f"{i:04d}.opus")
        for i, (rel, src) in enumerate(sorted(mp3s.items()))
    ]
    started = time.perf_counter()
    results = list(convert_many(conversions, AudioSettings(jobs=jobs)))
    wall = time.perf_counter() - started
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit(f"conversion failed: {bad[0].key}: {bad[0].error}")
    return wall, sum(r.duration_s or 0.0 for r in results)


def main(argv: Sequence[str] | None = None) -> int:
    args = benchlib.parse_args(__doc__.split("\n\n")[0], argv)
    report = benchlib.Report("unpack", args.smoke)
    cores = os.cpu_count() or 1
    n_files = SMOKE_FILES if args.smoke else FULL_FILES
    rounds = SMOKE_ROUNDS if args.smoke else FULL_ROUNDS
    with tempfile.TemporaryDirectory(prefix="bench-unpack-") as tmp:
        work = Path(tmp)
        _, mp3s = benchlib.speech_corpus(
            work, n_files, CORPUS_SEED, MIN_S, SMOKE_MAX_S if args.smoke else MAX_S
        )
        run_once(dict(list(mp3s.items())[:2]), work / "warm", cores)  # page cache, binaries
        walls: dict[int, list[float]] = {1: [], cores: []}
        audio_s = 0.0
        for _ in range(rounds):
            for jobs in walls:
                wall, audio_s = run_once(mp3s, work / "opus", jobs)
                walls[jobs].append(wall)
    one, many = min(walls[1]), min(walls[cores])
    speedup = benchlib.ratio(one, many)
    report.data.update(
        {
            "corpus": {"files": n_files, "audio_s": round(audio_s, 1)},
            "rounds": rounds,
            "baseline": {
                "jobs": 1,
                "wall_s": round(one, 3),
                "walls_s": walls[1],
                "audio_s_per_s": round(audio_s / one, 1),
                "files_per_s": round(n_files / one, 2),
            },
            "candidate": {
                "jobs": cores,
                "wall_s": round(many, 3),
                "walls_s": walls[cores],
                "audio_s_per_s": round(audio_s / many, 1),
                "files_per_s": round(n_files / many, 2),
            },
            "speedup": speedup,
            "targets": {"speedup_min_on_2_cores": TARGET_SPEEDUP_2_CORES},
            "meets_targets": speedup >= TARGET_SPEEDUP_2_CORES if cores == 2 else None,
        }
    )
    report.row("files / audio", f"{n_files} / {audio_s:.0f} s")
    report.row("1 ffmpeg process", f"{audio_s / one:.0f} x rt", f"{n_files / one:.1f} files/s")
    report.row(f"{cores} processes", f"{audio_s / many:.0f} x rt", f"{n_files / many:.1f} files/s")
    report.row("speedup", f"{speedup:.2f}x", f"target >= {TARGET_SPEEDUP_2_CORES}x on 2 cores")
    report.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
