"""A thin ffmpeg wrapper: probe audio, convert MP3 to Opus, many files in parallel.

Each conversion is its own ``ffmpeg -threads 1`` process and a thread pool runs
UNPACK_FFMPEG_JOBS of them at once (default: every core). For a batch of many
short files one process per core beats one multi-threaded ffmpeg per file: the
MP3 decoder and Opus encoder barely parallelise, and process start-up overlaps.

A conversion is that one process and nothing else: ffmpeg's own failure says an
input is unreadable, and the output's duration is read from its Ogg pages (see
``ogg_opus_duration``). An ffprobe before and after each file used to cost about
as much as the conversion of a short clip.

ffmpeg is told the input's format and may open local files only: left to guess,
it would take a playlist named ``.mp3`` (HLS, ffconcat) for what it is and read
the files or URLs it lists. The output is held to local files the same way.

Every result says what happened to its file. A failure carries ffmpeg's own
reason (the last lines of its stderr) and never stops the rest of the batch.
Outputs are written under a temporary name and renamed into place, so a file
at the output path is always a complete conversion.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from audio_pipeline.config import EnvReader, EnvSettings

OPUS_BITRATE = "24k"  # speech at 16 kHz mono; ASR accuracy is flat above ~16k
OPUS_SAMPLE_RATE = 16_000  # Hz, what Whisper models consume
OPUS_CHANNELS = 1
# Seconds per file: generous, since ffmpeg encodes much faster than realtime and a
# file of several hours must still finish (docs/PERFORMANCE.md has the unpack figures).
FFMPEG_TIMEOUT_S = 600.0
FFPROBE_TIMEOUT_S = 30.0  # seconds per probe
STDERR_TAIL_LINES = 3  # lines of ffmpeg's stderr kept as a failure reason
MAX_REASON_CHARS = 1000  # a reason is stored in Postgres and shown in tables

_CONTEXT_ADDRESS = re.compile(r"\[([\w:.-]+) @ 0x[0-9a-fA-F]+\]")

PARTIAL_SUFFIX = ".partial"  # ".{name}.{pid}.partial" while ffmpeg writes it
FFMPEG_SIGNALLED_EXIT = 255  # ffmpeg's exit status after it caught SIGTERM or SIGINT

FFMPEG = "ffmpeg"
FFPROBE = "ffprobe"
# The demuxer for each suffix extraction accepts (archive.AUDIO_SUFFIXES): named,
# it is the only one ffmpeg tries, so a playlist's demuxer never opens the file.
INPUT_FORMATS = {".mp3": "mp3"}
# Protocols ffmpeg may open, for inputs, outputs and anything they would nest.
PROTOCOL_WHITELIST = "file"

# Ogg Opus (RFC 3533, RFC 7845): the duration is the last page's granule position
# (48 kHz samples, whatever the output rate) minus the OpusHead pre-skip.
OPUS_GRANULE_RATE = 48_000  # Hz
OGG_CAPTURE = b"OggS"
OGG_HEADER = struct.Struct("<4sBBqII I B")  # capture, version, type, granule, serial, seq, crc, n
OGG_TAIL_BYTES = 64 * 1024  # the last page of a 24 kbit/s stream is a few kB
OPUS_HEAD = b"OpusHead"
OPUS_HEAD_BYTES = 4096  # the first page (the OpusHead packet) is well inside this
# ffmpeg's words when the input has no audio stream to convert. An input it cannot
# open or parse at all is reported on a line starting with the input's path.
_NO_AUDIO_STREAM = ("matches no streams", "does not contain any stream")


class AudioError(Exception):
    """ffmpeg or ffprobe could not handle a file; the message is the reason."""


class ConversionInterrupted(AudioError):
    """ffmpeg/ffprobe was stopped by a signal: the host, not the file, is the problem.

    systemd's default stop signals every process of the unit, ffmpeg included,
    so a graceful stop must not record such a file as bad.
    """


@dataclass(frozen=True)
class AudioSettings(EnvSettings):
    opus_bitrate: str = OPUS_BITRATE
    jobs: int = os.cpu_count() or 1
    timeout_s: float = FFMPEG_TIMEOUT_S

    @classmethod
    def read(cls, env: EnvReader) -> AudioSettings:
        """OPUS_BITRATE (e.g. 24k), UNPACK_FFMPEG_JOBS, UNPACK_FFMPEG_TIMEOUT_S."""
        bitrate = env.str("OPUS_BITRATE", OPUS_BITRATE)
        if not _valid_bitrate(bitrate):
            env.error(f"OPUS_BITRATE={bitrate!r} is not a bitrate like 24k or 32000")
        return cls(
            opus_bitrate=bitrate,
            jobs=env.int("UNPACK_FFMPEG_JOBS", os.cpu_count() or 1, minimum=1),
            timeout_s=env.seconds("UNPACK_FFMPEG_TIMEOUT_S", FFMPEG_TIMEOUT_S),
        )


def _valid_bitrate(value: str) -> bool:
    digits = value[:-1] if value[-1:].lower() == "k" else value
    return digits.isdigit() and int(digits) > 0


@dataclass(frozen=True)
class ProbeResult:
    duration_s: float
    codec: str
    sample_rate: int
    channels: int
    format_name: str


@dataclass(frozen=True)
class Conversion:
    """One file to convert; ``key`` is the caller's name for it (e.g. rel_path)."""

    key: str
    source: Path
    output: Path


@dataclass(frozen=True)
class ConversionResult:
    key: str
    source: Path
    output: Path
    ok: bool
    duration_s: float | None = None  # of the Opus output
    error: str | None = None
    elapsed_s: float = 0.0
    interrupted: bool = False  # stopped by a signal: convert again later, the file is fine


def probe(
    path: Path, timeout_s: float = FFPROBE_TIMEOUT_S, input_format: str | None = None
) -> ProbeResult:
    """Describe the first audio stream of ``path``; AudioError if there is none.

    ``input_format`` names the demuxer (e.g. "mp3"); without it ffprobe guesses,
    which is fine for files this pipeline wrote, never for received ones.
    """
    forced = ["-f", input_format] if input_format else []
    cmd = [
        FFPROBE,
        "-v",
        "error",
        "-protocol_whitelist",
        PROTOCOL_WHITELIST,
        *forced,
        "-select_streams",
        "a:0",
        "-show_entries",
        "stream=codec_name,sample_rate,channels:format=duration,format_name",
        "-of",
        "json",
        "--",
        str(path),
    ]
    proc = _run(cmd, timeout_s, what="ffprobe")
    _check_signalled(proc, "ffprobe")
    if proc.returncode != 0:
        raise AudioError(f"ffprobe failed: {_tail(proc.stderr, path)}")
    info = json.loads(proc.stdout or "{}")
    streams = info.get("streams") or []
    if not streams:
        raise AudioError("no audio stream found")
    stream, fmt = streams[0], info.get("format") or {}
    try:
        duration = float(fmt.get("duration", "nan"))
    except ValueError:
        duration = float("nan")
    if not duration >= 0:  # also catches NaN
        raise AudioError("audio duration is unknown")
    return ProbeResult(
        duration_s=duration,
        codec=str(stream.get("codec_name", "")),
        sample_rate=int(stream.get("sample_rate") or 0),
        channels=int(stream.get("channels") or 0),
        format_name=str(fmt.get("format_name", "")),
    )


def input_format(source: Path) -> str:
    """ffmpeg's demuxer for ``source``, from its suffix; AudioError if none is known."""
    fmt = INPUT_FORMATS.get(source.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(INPUT_FORMATS))
        raise AudioError(f"{source.name}: not a known audio format (accepted: {known})")
    return fmt


def opus_command(source: Path, output: Path, bitrate: str = OPUS_BITRATE) -> list[str]:
    """The ffmpeg command line: first audio stream -> Ogg Opus, 16 kHz mono."""
    return [
        FFMPEG,
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        "-y",
        "-threads",
        "1",
        "-filter_threads",
        "1",
        "-f",
        input_format(source),
        "-protocol_whitelist",
        PROTOCOL_WHITELIST,
        "-i",
        str(source),
        "-map",
        "0:a:0",
        "-vn",
        "-sn",
        "-dn",
        "-map_metadata",
        "-1",
        "-ac",
        str(OPUS_CHANNELS),
        "-ar",
        str(OPUS_SAMPLE_RATE),
        "-c:a",
        "libopus",
        "-b:a",
        bitrate,
        "-threads",
        "1",
        "-f",
        "ogg",
        "-protocol_whitelist",
        PROTOCOL_WHITELIST,
        str(output),
    ]


def convert_to_opus(
    source: Path, output: Path, bitrate: str = OPUS_BITRATE, timeout_s: float = FFMPEG_TIMEOUT_S
) -> float:
    """Convert ``source`` to Opus at ``output`` atomically; returns the output's duration.

    Raises AudioError with ffmpeg's reason; nothing is left at ``output`` then.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    command = opus_command(source, partial, bitrate)
    try:
        proc = _run(command, timeout_s, what="ffmpeg")
        _check_signalled(proc, "ffmpeg")
        if proc.returncode != 0:
            reason = _tail(proc.stderr, source, partial) or f"exit {proc.returncode}"
            if _input_fault(proc.stderr, source):
                # Say plainly that the input is the problem (a text file named .mp3),
                # not the converter, then give ffmpeg's own words.
                raise AudioError(f"not a readable audio file: {reason}")
            raise AudioError(f"ffmpeg failed: {reason}")
        try:
            duration = ogg_opus_duration(partial)
        except AudioError as exc:
            raise AudioError(f"ffmpeg produced no usable audio ({exc})") from None
        if duration <= 0:
            raise AudioError("no audio decoded (output is 0 seconds long)")
        partial.replace(output)
        return duration
    finally:
        partial.unlink(missing_ok=True)


def convert_one(job: Conversion, settings: AudioSettings) -> ConversionResult:
    """Convert one file; never raises for a bad file."""
    start = time.monotonic()
    try:
        duration = convert_to_opus(
            job.source, job.output, settings.opus_bitrate, settings.timeout_s
        )
    except AudioError as exc:
        return ConversionResult(
            job.key,
            job.source,
            job.output,
            ok=False,
            error=_clip(str(exc)),
            elapsed_s=time.monotonic() - start,
            interrupted=isinstance(exc, ConversionInterrupted),
        )
    return ConversionResult(
        job.key,
        job.source,
        job.output,
        ok=True,
        duration_s=duration,
        elapsed_s=time.monotonic() - start,
    )


def convert_many(
    jobs: Iterable[Conversion], settings: AudioSettings | None = None
) -> Iterator[ConversionResult]:
    """Convert in parallel, yielding each result as soon as it is ready.

    The caller can upload and record each file while the rest still convert.
    Closing the iterator early cancels conversions that have not started.
    """
    settings = settings or AudioSettings()
    jobs = list(jobs)
    if not jobs:
        return
    with ThreadPoolExecutor(
        max_workers=min(settings.jobs, len(jobs)), thread_name_prefix="ffmpeg"
    ) as pool:
        futures: list[Future[ConversionResult]] = [
            pool.submit(convert_one, job, settings) for job in jobs
        ]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _run(cmd: list[str], timeout_s: float, what: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, errors="replace", timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise AudioError(f"{what} timed out after {timeout_s:g} s") from None
    except FileNotFoundError:
        raise AudioError(f"{what} is not installed (not found on PATH)") from None


def remove_stale_partials(directory: Path) -> int:
    """Delete outputs half-written by a process that was killed (kill -9, power loss).

    Call before converting into ``directory`` again; returns how many were removed.
    """
    if not directory.is_dir():
        return 0
    stale = [p for p in directory.rglob(f".*{PARTIAL_SUFFIX}") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def ogg_opus_duration(path: Path) -> float:
    """Seconds of audio in an Ogg Opus file, from its first and last pages alone.

    The last page's granule position counts 48 kHz samples from the stream's start,
    pre-skip included (RFC 7845 section 4), so no decoder and no process is needed.
    """
    with path.open("rb") as f:
        head = f.read(OPUS_HEAD_BYTES)
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - OGG_TAIL_BYTES))
        tail = f.read()
    if not head.startswith(OGG_CAPTURE) or len(head) < OGG_HEADER.size:
        raise AudioError("output is not an Ogg stream")
    serial = OGG_HEADER.unpack_from(head)[4]
    at = head.find(OPUS_HEAD, OGG_HEADER.size)
    if at < 0 or len(head) < at + 12:
        raise AudioError("output has no OpusHead")
    pre_skip = int.from_bytes(head[at + 10 : at + 12], "little")
    # The last page is the last capture pattern whose page ends exactly at the end of
    # the file (a stray "OggS" inside packet data would not).
    at = tail.rfind(OGG_CAPTURE)
    while at >= 0:
        if _is_last_page(tail, at, serial):
            granule = OGG_HEADER.unpack_from(tail, at)[3]
            return max(0, granule - pre_skip) / OPUS_GRANULE_RATE
        at = tail.rfind(OGG_CAPTURE, 0, at)
    raise AudioError("output has no complete last Ogg page")


def _is_last_page(data: bytes, at: int, serial: int) -> bool:
    if len(data) - at < OGG_HEADER.size:
        return False
    _, version, _, granule, page_serial, _, _, n_segments = OGG_HEADER.unpack_from(data, at)
    table = data[at + OGG_HEADER.size : at + OGG_HEADER.size + n_segments]
    if version != 0 or page_serial != serial or granule < 0 or len(table) < n_segments:
        return False
    return at + OGG_HEADER.size + n_segments + sum(table) == len(data)


def _input_fault(stderr: str, source: Path) -> bool:
    """Whether ffmpeg failed because of its input (as opposed to the output or host)."""
    opened = f"{source}: "
    return any(
        line.startswith(opened) or any(phrase in line for phrase in _NO_AUDIO_STREAM)
        for line in stderr.splitlines()
    )


def _check_signalled(proc: subprocess.CompletedProcess[str], what: str) -> None:
    # A negative code: killed by a signal. 255: ffmpeg caught SIGTERM/SIGINT and quit.
    if proc.returncode < 0 or proc.returncode == FFMPEG_SIGNALLED_EXIT:
        raise ConversionInterrupted(f"{what} was stopped by a signal (exit {proc.returncode})")


def _tail(stderr: str, *paths: Path) -> str:
    """ffmpeg's last few stderr lines, with our scratch paths shortened to file names."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    # "[mp3 @ 0x55d0c...]" -> "[mp3]": the address differs on every run
    text = _CONTEXT_ADDRESS.sub(r"[\1]", " | ".join(lines[-STDERR_TAIL_LINES:]))
    for path in paths:
        text = text.replace(str(path), path.name)
    return _clip(text)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."
