"""Known speech for tests, demos and benchmarks: espeak-ng sentences as an MP3 batch.

``make_speech_batch`` writes ``{batch_id}.tar`` (MP3s in nested folders with
awkward names: spaces, unicode, upper-case .MP3, extra dots) and
``{batch_id}.manifest.json`` ({rel_path: spoken text}) into ``out_dir``. The
same seed always gives the same names, texts, voices and bytes.

Speed matters (CI has 2 cores): each sentence is spoken once per voice and
speed and the WAVs are reused for every file that needs them, then files are
assembled and encoded in parallel. A file's length is planned from a words-per-
minute estimate and measured exactly from the assembled audio.

    python -m devtools.sample --out /tmp/collection --batch-id demo-001 --files 8
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import wave
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

# Everyday sentences, plus a few short phrases so that two-second files are
# possible. Phonetically balanced test sets (the Harvard sentences) were tried
# first: tiny.en mishears their odd vocabulary ("birch canoe" -> "merch can"),
# which measured the model's vocabulary rather than the pipeline.
SENTENCES = (
    "Good morning.",
    "Thank you very much.",
    "Please sit down.",
    "See you tomorrow.",
    "We will meet at the office tomorrow morning to review the quarterly report.",
    "Please send me the new schedule before the end of the week.",
    "The weather was cold and windy, so we stayed inside and played cards.",
    "My brother works at the hospital and comes home late every night.",
    "I think we should take the train because the traffic is terrible today.",
    "She bought fresh bread and milk at the market on her way home.",
    "The meeting has been moved to Thursday afternoon at three o'clock.",
    "Can you call me back when you have a few minutes to talk?",
    "We need to finish the project before the holidays start next month.",
    "The children were playing in the park until it started to rain.",
    "He told me that the new restaurant downtown is really good.",
    "Let me know if you need any help with your homework tonight.",
    "The bus was late again, so I walked to work this morning.",
    "Our neighbors are having a party on Saturday evening.",
    "The doctor said I should drink more water and get more sleep.",
    "They are planning a trip to the mountains this summer.",
    "Please turn off the lights when you leave the room.",
    "This coffee is too hot to drink right now.",
)
# Sentences carrying the demo policies' lexicon terms; about FLAGGED_FILE_SHARE of
# the files get one, so a realistic share of a batch is flagged.
FLAGGED_SENTENCES = (
    "Your idea is garbage and everyone knows it.",
    "Take your trash and get out of my house.",
    "You are completely useless at this job.",
    "Keep your dirty hands off my things.",
    "If you come closer I will kick you.",
    "She fell off the ladder and broke her arm.",
)
FLAGGED_FILE_SHARE = 0.3
VOICES = ("en-us", "en-gb", "en-gb-x-rp")  # espeak-ng voices tiny.en hears reliably
SPEEDS_WPM = (150, 165, 180)  # espeak-ng -s, words per minute
SECONDS_PER_WORD_PAD = 0.08  # espeak pauses at punctuation; planning estimate only
LEAD_SILENCE_S = 0.3
GAP_SILENCE_S = 0.4  # between sentences
MP3_BITRATE = "64k"
SPEECH_RATE_HZ = 22_050  # espeak-ng's native rate
TAR_MTIME = 1_700_000_000  # fixed, so the same seed gives the same bytes
ESPEAK_TIMEOUT_S = 60.0
FFMPEG_TIMEOUT_S = 120.0

# Awkward but legal names: what real collections contain.
FOLDERS = (
    "",
    "Session 1",
    "Session 1/día 2",
    "UPPER CASE",
    "ünïcödé/日本語",
    "a.b.c",
    "deep/er/and deeper",
)
STEMS = (
    "clip {i:03d}",
    "naïve speech {i}",
    "take.{i}.final",
    "#{i} it's & (odd)",
    "声 {i}",
    "UPPER {i}",
)
SUFFIXES = (".mp3", ".MP3", ".Mp3")


class SampleError(RuntimeError):
    """espeak-ng or ffmpeg failed while making sample speech."""


@dataclass(frozen=True)
class SampleBatch:
    batch_id: str
    tar_path: Path
    manifest_path: Path
    manifest: dict[str, str]  # rel_path -> spoken text
    durations: dict[str, float] = field(default_factory=dict)  # rel_path -> seconds

    @property
    def total_seconds(self) -> float:
        return sum(self.durations.values())


@dataclass(frozen=True)
class _Utterance:
    sentence: str
    voice: str
    speed: int

    @property
    def cache_name(self) -> str:
        digest = hashlib.sha256(f"{self.voice}|{self.speed}|{self.sentence}".encode()).hexdigest()
        return f"{digest[:24]}.wav"


@dataclass(frozen=True)
class _FilePlan:
    rel_path: str
    utterances: tuple[_Utterance, ...]

    @property
    def text(self) -> str:
        return " ".join(u.sentence for u in self.utterances)


def make_speech_batch(
    out_dir: Path,
    batch_id: str,
    n_files: int = 8,
    seed: int = 0,
    min_seconds: float = 2.0,
    max_seconds: float = 30.0,
    *,
    extra_members: Mapping[str, bytes] | None = None,
    cache_dir: Path | None = None,
    jobs: int | None = None,
) -> SampleBatch:
    """Write ``{batch_id}.tar`` and its manifest into ``out_dir``.

    ``extra_members`` adds raw members (e.g. a text file named ``.mp3``) that
    are not speech and so are left out of the manifest. ``cache_dir`` keeps
    espeak-ng's WAVs between calls. The tar appears atomically (written under a
    hidden name, then renamed), so a directory watcher never sees half of it.
    """
    if n_files < 1:
        raise ValueError("n_files must be at least 1")
    if not 0 < min_seconds <= max_seconds:
        raise ValueError("need 0 < min_seconds <= max_seconds")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plans = _plan(n_files, seed, min_seconds, max_seconds)
    jobs = jobs or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="speech-") as tmp:
        work = Path(tmp)
        cache = Path(cache_dir) if cache_dir else work / "wav"
        cache.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            unique = {u for plan in plans for u in plan.utterances}
            list(pool.map(lambda u: _speak(u, cache), sorted(unique, key=lambda u: u.cache_name)))
            encoded = list(pool.map(lambda p: _assemble(p, cache, work, min_seconds), plans))
        tar_path = out_dir / f"{batch_id}.tar"
        files = [(p.rel_path, mp3) for p, (mp3, _) in zip(plans, encoded, strict=True)]
        _write_tar(tar_path, files, extra_members or {})
    manifest = {p.rel_path: p.text for p in plans}
    durations = {p.rel_path: seconds for p, (_, seconds) in zip(plans, encoded, strict=True)}
    manifest_path = out_dir / f"{batch_id}.manifest.json"
    _atomic_write(manifest_path, json.dumps(manifest, ensure_ascii=False, indent=2).encode())
    return SampleBatch(batch_id, tar_path, manifest_path, manifest, durations)


def _plan(n_files: int, seed: int, min_s: float, max_s: float) -> list[_FilePlan]:
    rng = random.Random(seed)
    # Names cycle through every folder, stem and suffix (from a seeded start), so
    # even a small batch holds each kind of awkward name.
    f0, s0, x0 = (rng.randrange(len(options)) for options in (FOLDERS, STEMS, SUFFIXES))
    plans = []
    for i in range(n_files):
        target = rng.uniform(min_s, max_s)
        voice, speed = rng.choice(VOICES), rng.choice(SPEEDS_WPM)
        order = list(SENTENCES)
        rng.shuffle(order)
        if rng.random() < FLAGGED_FILE_SHARE:
            order.insert(0, rng.choice(FLAGGED_SENTENCES))
        chosen: list[str] = []
        total = LEAD_SILENCE_S * 2
        for sentence in order:
            needed = _estimate_s(sentence, speed) + (GAP_SILENCE_S if chosen else 0.0)
            if total + needed <= target:
                chosen.append(sentence)
                total += needed
        if not chosen:  # target shorter than any sentence: the shortest one
            chosen.append(min(SENTENCES, key=lambda s: _estimate_s(s, speed)))
        folder = FOLDERS[(f0 + i) % len(FOLDERS)]
        name = STEMS[(s0 + i) % len(STEMS)].format(i=i) + SUFFIXES[(x0 + i) % len(SUFFIXES)]
        rel = f"{folder}/{name}" if folder else name
        plans.append(_FilePlan(rel, tuple(_Utterance(s, voice, speed) for s in chosen)))
    return plans


def _estimate_s(sentence: str, speed_wpm: int) -> float:
    words = len(sentence.split())
    return words * (60.0 / speed_wpm + SECONDS_PER_WORD_PAD)


def _speak(utterance: _Utterance, cache: Path) -> None:
    target = cache / utterance.cache_name
    if target.exists():
        return
    partial = target.with_name(f".{target.name}.{os.getpid()}.{id(utterance)}.partial")
    cmd = [
        "espeak-ng",
        "-v",
        utterance.voice,
        "-s",
        str(utterance.speed),
        "-w",
        str(partial),
        "--",
        utterance.sentence,
    ]
    _run(cmd, ESPEAK_TIMEOUT_S)
    partial.replace(target)


def _assemble(plan: _FilePlan, cache: Path, work: Path, min_seconds: float) -> tuple[bytes, float]:
    """Sentences with pauses between them, as MP3 bytes; returns (mp3, seconds).

    Trailing silence brings a file that came out short up to ``min_seconds``.
    """
    frames: list[bytes] = []
    rate = SPEECH_RATE_HZ
    for index, utterance in enumerate(plan.utterances):
        with wave.open(str(cache / utterance.cache_name), "rb") as w:
            rate, width = w.getframerate(), w.getsampwidth()
            if index == 0:
                frames.append(_silence(LEAD_SILENCE_S, rate, width))
            else:
                frames.append(_silence(GAP_SILENCE_S, rate, width))
            frames.append(w.readframes(w.getnframes()))
    speech_s = sum(len(f) for f in frames) / 2 / rate
    frames.append(_silence(max(LEAD_SILENCE_S, min_seconds - speech_s), rate, 2))
    pcm = b"".join(frames)
    seconds = len(pcm) / 2 / rate
    wav = work / (hashlib.sha256(plan.rel_path.encode()).hexdigest()[:16] + ".wav")
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    mp3 = wav.with_suffix(".mp3")
    cmd = [
        "ffmpeg",
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        "-y",
        "-i",
        str(wav),
        "-map_metadata",
        "-1",
        "-fflags",
        "+bitexact",
        "-flags:a",
        "+bitexact",
        "-c:a",
        "libmp3lame",
        "-b:a",
        MP3_BITRATE,
        "-f",
        "mp3",
        str(mp3),
    ]
    _run(cmd, FFMPEG_TIMEOUT_S)
    data = mp3.read_bytes()
    wav.unlink()
    mp3.unlink()
    return data, seconds


def _silence(seconds: float, rate: int, width: int) -> bytes:
    # round up: padding to a minimum length must never fall a frame short of it
    return b"\0" * (math.ceil(seconds * rate) * width)


def _run(cmd: Sequence[str], timeout_s: float) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except FileNotFoundError:
        raise SampleError(f"{cmd[0]} is not installed (apt-get install {cmd[0]})") from None
    except subprocess.TimeoutExpired:
        raise SampleError(f"{cmd[0]} timed out after {timeout_s:g} s") from None
    if proc.returncode != 0:
        raise SampleError(f"{cmd[0]} failed: {proc.stderr.strip()[-500:]}")


def _write_tar(path: Path, files: list[tuple[str, bytes]], extra: Mapping[str, bytes]) -> None:
    members = [*files, *extra.items()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        made: set[str] = set()
        for rel, data in members:
            parts = rel.split("/")[:-1]
            for depth in range(1, len(parts) + 1):  # directory entries, as tar(1) writes
                folder = "/".join(parts[:depth])
                if folder not in made:
                    made.add(folder)
                    tf.addfile(_info(folder, 0, tarfile.DIRTYPE))
            tf.addfile(_info(rel, len(data), tarfile.REGTYPE), io.BytesIO(data))
    _atomic_write(path, buf.getvalue())


def _info(name: str, size: int, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


def _atomic_write(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    partial.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.sample",
        description="Write a .tar of espeak-ng speech MP3s and its manifest (rel_path -> text).",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the tar")
    parser.add_argument("--batch-id", default="sample-001", help="tar name without .tar")
    parser.add_argument("--files", type=int, default=8, help="number of MP3s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--cache-dir", type=Path, help="keep espeak-ng WAVs here between runs")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    args = parser.parse_args(argv)
    try:
        batch = make_speech_batch(
            args.out,
            args.batch_id,
            args.files,
            args.seed,
            args.min_seconds,
            args.max_seconds,
            cache_dir=args.cache_dir,
        )
    except (SampleError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        summary = {
            "batch_id": batch.batch_id,
            "tar_path": str(batch.tar_path),
            "manifest_path": str(batch.manifest_path),
            "files": len(batch.manifest),
            "total_seconds": round(batch.total_seconds, 2),
        }
        print(json.dumps(summary, ensure_ascii=False))
    else:
        print(f"{batch.tar_path}: {len(batch.manifest)} files, {batch.total_seconds:.1f} s")
        for rel, text in batch.manifest.items():
            print(f"  {batch.durations[rel]:5.1f} s  {rel}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
