"""Speech recognition backends: many files in, one transcript per file out.

The gpu worker hands a whole claimed batch to one Transcriber call so the model
sees several files per call. That matters most for short clips: Whisper always
decodes a 30 s window, so a 3 s clip sent alone pays for 27 s of padding. A call
is two steps, ``prepare`` (decode, VAD, packing: CPU only) and
``transcribe_prepared`` (the model), so the worker can prepare its next claim
while the model works on this one; ``transcribe_many`` does both in turn.

Backends (``ASR_BACKEND``):

* ``faster-whisper`` (default, CPU and GPU): CTranslate2 Whisper from
  ``MODELS_ROOT/ASR_MODEL``. Every file is decoded and cut by the bundled Silero
  VAD into speech windows of at most 30 s, each window belonging to exactly one
  file; the windows of all files are laid end to end in one array and sent through
  ``BatchedInferencePipeline`` in a single call with ``clip_timestamps``, so
  ``ASR_BATCH_SIZE`` windows share each encoder/decoder step. Segments come back
  with times in the joined array and are split back per file by time.
* ``whisperx`` (GPU hosts, requirements-gpu.txt): WhisperX's batched pipeline with
  its wav2vec2 word alignment, both loaded from MODELS_ROOT only. Imported lazily,
  so hosts without it (and without torch) never pay for it.

Neither backend downloads anything: a missing model directory is an error that
names the path.
"""

from __future__ import annotations

import bisect
import gc
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from audio_pipeline.config import ConfigError, Device, EnvReader, EnvSettings

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # Hz; Whisper's input rate
WINDOW_S = 30.0  # seconds; Whisper's fixed input window
DECODE_THREADS = 4  # files decoded at once (PyAV releases the GIL while decoding)
DECODE_CHUNK_SAMPLES = 500_000  # samples gathered before each resampler call
DECODE_FORMAT = "ogg"  # the unpack worker's Opus files; named so libav never guesses
# Silence between packed speech pieces: enough for Whisper to end a segment and for
# word timestamps to fall clearly on one side of a file boundary.
GAP_S = 0.6
# VAD settings of faster-whisper's own batched mode, so windows match what it would cut.
VAD_MIN_SILENCE_MS = 160
DEFAULT_ASR_MODEL = "whisper/tiny.en"
# Windows per model step; the trade-off between speed and WER is measured by
# bench/bench_asr.py (docs/PERFORMANCE.md).
DEFAULT_BATCH_SIZE = 8
DEFAULT_BEAM_SIZE = 5
DEFAULT_LANGUAGE = "en"  # the fleet's content is US English (as CoPE-A expects)
LANGUAGE_AUTO = "auto"


class AsrBackend(StrEnum):
    FASTER_WHISPER = "faster-whisper"
    WHISPERX = "whisperx"


class AudioDecodeError(RuntimeError):
    """Some files could not be decoded as audio; nothing was transcribed.

    ``failures`` maps each bad path to the decoder's reason, so the caller can fail
    exactly those files and send the rest again.
    """

    def __init__(self, failures: Mapping[Path, str]) -> None:
        self.failures = dict(failures)
        listed = "; ".join(f"{p}: {why}" for p, why in self.failures.items())
        super().__init__(f"cannot decode {len(self.failures)} file(s): {listed}")


@dataclass(frozen=True)
class AsrSettings(EnvSettings):
    """ASR_* variables; read with ``AsrSettings.from_env``."""

    backend: AsrBackend = AsrBackend.FASTER_WHISPER
    model: str = DEFAULT_ASR_MODEL  # relative to MODELS_ROOT
    device: Device = Device.AUTO
    compute_type: str | None = None  # None: int8 on CPU, float16 on CUDA
    batch_size: int = DEFAULT_BATCH_SIZE
    beam_size: int = DEFAULT_BEAM_SIZE
    language: str = DEFAULT_LANGUAGE  # LANGUAGE_AUTO: detect per file
    cpu_threads: int = 0  # 0: CTranslate2's default (OMP_NUM_THREADS or 4)
    align_model: str = "alignment/wav2vec2-en"  # whisperx only, relative to MODELS_ROOT

    @classmethod
    def read(cls, env: EnvReader) -> AsrSettings:
        return cls(
            backend=env.choice("ASR_BACKEND", AsrBackend, AsrBackend.FASTER_WHISPER),
            model=env.str("ASR_MODEL", DEFAULT_ASR_MODEL),
            device=env.choice("ASR_DEVICE", Device, Device.AUTO),
            compute_type=env.str("ASR_COMPUTE_TYPE") or None,
            batch_size=env.int("ASR_BATCH_SIZE", DEFAULT_BATCH_SIZE, minimum=1),
            beam_size=env.int("ASR_BEAM_SIZE", DEFAULT_BEAM_SIZE, minimum=1),
            language=env.str("ASR_LANGUAGE", DEFAULT_LANGUAGE),
            cpu_threads=env.int("ASR_CPU_THREADS", 0, minimum=0),
            align_model=env.str("ASR_ALIGN_MODEL", cls.align_model),
        )


@dataclass(frozen=True)
class Word:
    start: float
    end: float
    word: str
    probability: float


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    words: list[Word] = field(default_factory=list)


@dataclass(frozen=True)
class Transcript:
    """One file's transcript; times are seconds from the start of that file.

    processing_seconds is the file's share of its batch's wall time, in proportion
    to its audio length (a batch is one model call, so per-file times do not exist).
    """

    text: str
    language: str | None
    language_probability: float | None
    segments: list[Segment]
    audio_seconds: float
    processing_seconds: float
    model: str
    backend: str

    def segments_json(self) -> list[dict[str, Any]]:
        """The transcripts.segments column: plain dicts, as schema.sql documents."""
        return [
            {
                "start": s.start,
                "end": s.end,
                "text": s.text,
                "words": [
                    {"start": w.start, "end": w.end, "word": w.word, "probability": w.probability}
                    for w in s.words
                ],
            }
            for s in self.segments
        ]


@dataclass(frozen=True)
class PreparedAudio:
    """A batch decoded and cut for the model: everything before the model call.

    ``Transcriber.prepare`` builds it with CPU work only (decode, VAD, packing), so
    the gpu worker can prepare its next claim in a side thread while the model runs
    on this one. ``inputs`` is backend-specific.
    """

    paths: tuple[Path, ...]
    durations: tuple[float, ...]  # seconds of audio per file
    inputs: tuple[Any, ...]
    prepare_seconds: float


class Transcriber(ABC):
    """A loaded ASR model. One instance per process; load once, call many times.

    Transcription is two steps so they can overlap across batches: ``prepare``
    (decode, no model; safe to run in another thread while ``transcribe_prepared``
    runs) and ``transcribe_prepared`` (the model). ``transcribe_many`` does both.
    """

    model_name: str
    backend: str
    device: str  # "cuda" or "cpu", as resolved from ASR_DEVICE

    @abstractmethod
    def prepare(self, paths: Sequence[Path]) -> PreparedAudio:
        """Decode ``paths``; raises AudioDecodeError naming every file that failed."""

    @abstractmethod
    def transcribe_prepared(self, prepared: PreparedAudio) -> list[Transcript]:
        """Transcripts in the order of ``prepared.paths``."""

    def transcribe_many(self, paths: Sequence[Path]) -> list[Transcript]:
        """Transcripts in the order of ``paths``.

        Raises AudioDecodeError (before any model work) when files cannot be decoded.
        """
        return self.transcribe_prepared(self.prepare(paths))

    def _transcripts(
        self,
        prepared: PreparedAudio,
        model_seconds: float,
        results: Sequence[tuple[list[Segment], str | None, float | None]],
    ) -> list[Transcript]:
        """One Transcript per file; processing time is shared out by audio length."""
        elapsed = prepared.prepare_seconds + model_seconds
        total_audio = sum(prepared.durations) or 1.0
        return [
            Transcript(
                text=" ".join(s.text for s in segs).strip(),
                language=language,
                language_probability=probability,
                segments=segs,
                audio_seconds=round(dur, 3),
                processing_seconds=round(elapsed * dur / total_audio, 4),
                model=self.model_name,
                backend=self.backend,
            )
            for (segs, language, probability), dur in zip(results, prepared.durations, strict=True)
        ]


def resolve_device(device: Device | str) -> str:
    device = Device(device)
    if device is not Device.AUTO:
        return device.value
    import ctranslate2

    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


def default_compute_type(device: str) -> str:
    return "float16" if device == "cuda" else "int8"


def model_dir(models_root: Path, relative: str) -> Path:
    path = models_root / relative
    if not path.is_dir():
        raise ConfigError(
            f"ASR model directory {path} does not exist (MODELS_ROOT={models_root}, "
            f"model={relative!r}); models are synced by Ansible, or for development "
            f"installed by `python -m devtools.dev_models {models_root}`"
        )
    return path


def decode_file(path: Path) -> Any:
    """One file as 16 kHz mono float32, decoded in-process by PyAV (libav).

    faster-whisper's ``decode_audio`` does the same but runs ``gc.collect()`` after
    every file (against a resampler leak, its issue 390): 30-40 ms per call in a
    process holding the models, most of a short clip's decode time. Here the
    collection is done once per ``decode_many`` call instead. Damaged frames are
    skipped, as faster-whisper does, so a truncated file still yields its audio.

    The file is opened as Ogg (what the unpack worker writes) with local files only:
    left to guess, libav would follow a playlist (ffconcat, HLS) to other files.
    """
    import av
    import numpy as np

    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    fifo = av.AudioFifo()
    chunks: list[Any] = []

    def resample(frame: Any) -> None:
        chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))

    with av.open(
        str(path),
        mode="r",
        format=DECODE_FORMAT,
        options={"protocol_whitelist": "file"},
        metadata_errors="ignore",
    ) as container:
        frames = container.decode(audio=0)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except av.error.InvalidDataError:
                continue
            frame.pts = None  # the fifo checks timestamps; damaged files break them
            fifo.write(frame)
            if fifo.samples >= DECODE_CHUNK_SAMPLES:
                resample(fifo.read())
    if fifo.samples:
        resample(fifo.read())
    resample(None)  # flush
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


def decode_many(paths: Sequence[Path]) -> list[Any]:
    """Decode every file to 16 kHz mono float32, in parallel.

    Raises AudioDecodeError naming every file that failed, so one bad file never
    hides another.
    """

    def decode(path: Path) -> Any:
        try:
            return decode_file(path)
        except Exception as exc:  # PyAV raises many types; the reason is what matters
            return exc

    with ThreadPoolExecutor(max_workers=min(DECODE_THREADS, max(1, len(paths)))) as pool:
        results = list(pool.map(decode, paths))
    gc.collect()  # what decode_audio does per file (see decode_file), once per call
    failures = {
        path: f"{type(r).__name__}: {r}"
        for path, r in zip(paths, results, strict=True)
        if isinstance(r, BaseException)
    }
    if failures:
        raise AudioDecodeError(failures)
    return results


@dataclass(frozen=True)
class _Piece:
    """A speech span of one file, placed in the packed array at ``packed_start``."""

    file_index: int
    file_start: int  # samples, in the file
    length: int  # samples
    packed_start: int  # samples, in the packed array

    @property
    def packed_end(self) -> int:
        return self.packed_start + self.length


def speech_spans(audio: Any) -> list[tuple[int, int]]:
    """(start, end) samples of the speech in one file, by the bundled Silero VAD.

    Spans are at most one window long (faster-whisper's own batched-mode settings).
    """
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    vad = VadOptions(max_speech_duration_s=WINDOW_S, min_silence_duration_ms=VAD_MIN_SILENCE_MS)
    return [
        (int(s["start"]), int(s["end"]))
        for s in get_speech_timestamps(audio, vad, sampling_rate=SAMPLE_RATE)
    ]


def pack_speech(audios: Sequence[Any]) -> tuple[Any, list[_Piece], list[tuple[int, int]]]:
    """Lay the speech of all files end to end, GAP_S of silence apart.

    Returns the packed array, its pieces in order, and the windows to decode as
    (start, end) samples: consecutive pieces packed greedily into <= 30 s, so a
    window holds several short files (Whisper pads every window to 30 s, so a 4 s
    clip alone wastes 26 s of compute). Silence trimmed by the VAD costs nothing.
    """
    import numpy as np

    gap = int(GAP_S * SAMPLE_RATE)
    limit = int(WINDOW_S * SAMPLE_RATE)
    pieces: list[_Piece] = []
    position = 0
    for index, audio in enumerate(audios):
        for start, end in speech_spans(audio):
            length = min(end - start, limit)
            pieces.append(_Piece(index, start, length, position))
            position += length + gap
    packed = np.zeros(position, dtype=np.float32)
    for p in pieces:
        packed[p.packed_start : p.packed_end] = audios[p.file_index][
            p.file_start : p.file_start + p.length
        ]
    windows: list[tuple[int, int]] = []
    for p in pieces:
        if windows and p.packed_end - windows[-1][0] <= limit:
            windows[-1] = (windows[-1][0], p.packed_end)
        else:
            windows.append((p.packed_start, p.packed_end))
    return packed, pieces, windows


@dataclass(frozen=True)
class _Packed:
    """The packed speech of some files, as ``pack_speech`` lays it out."""

    audio: Any
    pieces: list[_Piece]
    windows: list[tuple[int, int]]
    files: int

    @classmethod
    def of(cls, audios: Sequence[Any]) -> _Packed:
        audio, pieces, windows = pack_speech(audios)
        return cls(audio, pieces, windows, len(audios))


class _Unpacker:
    """Maps times in the packed array back to files and times within them."""

    def __init__(self, pieces: Sequence[_Piece]) -> None:
        self.pieces = list(pieces)
        self.starts = [p.packed_start / SAMPLE_RATE for p in pieces]

    def piece_at(self, t: float) -> _Piece:
        """The piece containing ``t``; a time in a gap belongs to the nearer piece."""
        i = max(0, bisect.bisect_right(self.starts, t) - 1)
        end_s = self.pieces[i].packed_end / SAMPLE_RATE
        if t > end_s and i + 1 < len(self.pieces) and self.starts[i + 1] - t < t - end_s:
            i += 1
        return self.pieces[i]

    @staticmethod
    def file_time(piece: _Piece, t: float) -> float:
        """``t`` as seconds in the piece's file, kept inside the piece."""
        offset = min(max(t - piece.packed_start / SAMPLE_RATE, 0.0), piece.length / SAMPLE_RATE)
        return round((piece.file_start / SAMPLE_RATE) + offset, 3)


def split_segment(seg: Any, unpacker: _Unpacker) -> dict[int, Segment]:
    """One decoded segment of the packed array as per-file segments.

    Words carry their own times, so each word goes to the piece its midpoint lies
    in, and its edges are kept inside that piece; a segment that ran across a file
    boundary becomes one segment in each file.
    """
    by_file: dict[int, list[Word]] = {}
    for w in seg.words or []:
        piece = unpacker.piece_at((w.start + w.end) / 2)
        word = Word(
            start=unpacker.file_time(piece, w.start),
            end=unpacker.file_time(piece, w.end),
            word=w.word.strip(),
            probability=round(float(w.probability), 4),
        )
        by_file.setdefault(piece.file_index, []).append(word)
    return {
        index: Segment(
            start=words[0].start,
            end=max(w.end for w in words),
            text=" ".join(w.word for w in words if w.word),
            words=words,
        )
        for index, words in by_file.items()
    }


class FasterWhisperTranscriber(Transcriber):
    """faster-whisper's BatchedInferencePipeline over the packed speech of many files."""

    backend = AsrBackend.FASTER_WHISPER.value

    def __init__(self, settings: AsrSettings, models_root: Path) -> None:
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        path = model_dir(models_root, settings.model)
        device = resolve_device(settings.device)
        self.compute_type = settings.compute_type or default_compute_type(device)
        self.settings = settings
        self.device = device
        self.model_name = settings.model
        # ctranslate2 rejects a Path: it must be str.
        self.model = WhisperModel(
            str(path),
            device=device,
            compute_type=self.compute_type,
            cpu_threads=settings.cpu_threads,
            local_files_only=True,
        )
        self.pipeline = BatchedInferencePipeline(self.model)
        log.info(
            "asr model loaded: backend=%s model=%s device=%s compute_type=%s",
            self.backend,
            path,
            device,
            self.compute_type,
        )

    def prepare(self, paths: Sequence[Path]) -> PreparedAudio:
        started = time.perf_counter()
        audios = decode_many(paths)
        if self._language() is None:
            # The batched pipeline detects one language per call, and files may differ.
            packs = tuple(_Packed.of([a]) for a in audios)
        else:
            packs = (_Packed.of(audios),) if audios else ()
        return PreparedAudio(
            paths=tuple(paths),
            durations=tuple(len(a) / SAMPLE_RATE for a in audios),
            inputs=packs,
            prepare_seconds=time.perf_counter() - started,
        )

    def transcribe_prepared(self, prepared: PreparedAudio) -> list[Transcript]:
        started = time.perf_counter()
        language = self._language()
        results: list[tuple[list[Segment], str | None, float | None]] = []
        for pack in prepared.inputs:
            segments_per_file, (lang, probability) = self._transcribe_packed(pack, language)
            results.extend((segs, lang, probability) for segs in segments_per_file)
        return self._transcripts(prepared, time.perf_counter() - started, results)

    def _language(self) -> str | None:
        """The language to decode in; None: detect it per file (multilingual model)."""
        if self.settings.language != LANGUAGE_AUTO:
            return self.settings.language
        return None if self.model.model.is_multilingual else "en"

    def _transcribe_packed(
        self, pack: _Packed, language: str | None
    ) -> tuple[list[list[Segment]], tuple[str | None, float | None]]:
        """One batched call over the packed speech of some files, split back per file."""
        per_file: list[list[Segment]] = [[] for _ in range(pack.files)]
        if not pack.windows:  # nothing but silence: empty transcripts, no model call
            return per_file, (language, 1.0 if language else None)
        segments, info = self.pipeline.transcribe(
            pack.audio,
            language=language,
            beam_size=self.settings.beam_size,
            batch_size=self.settings.batch_size,
            word_timestamps=True,  # needed to split a window back into its files
            clip_timestamps=[
                {"start": start / SAMPLE_RATE, "end": end / SAMPLE_RATE}
                for start, end in pack.windows
            ],
        )
        unpacker = _Unpacker(pack.pieces)
        for seg in segments:
            for index, part in split_segment(seg, unpacker).items():
                per_file[index].append(part)
        return per_file, (info.language, float(info.language_probability))


def _clamp(t: float, duration: float) -> float:
    return round(min(max(float(t), 0.0), duration), 3)


class WhisperXTranscriber(Transcriber):
    """WhisperX on a GPU host: batched Whisper, then wav2vec2 word alignment.

    Both models come from MODELS_ROOT (the ASR model in CTranslate2 format, the
    alignment model as a Hugging Face wav2vec2 directory), never from a hub.
    WhisperX's VAD merges speech across the whole input, so files are not joined
    here: each file is one batched call (its windows share the GPU), and alignment
    runs per file.
    """

    backend = AsrBackend.WHISPERX.value

    def __init__(self, settings: AsrSettings, models_root: Path) -> None:
        try:
            import whisperx
        except ImportError as exc:
            raise ConfigError(
                "ASR_BACKEND=whisperx but whisperx is not importable on this host "
                f"({exc}); install requirements-gpu.txt or use ASR_BACKEND=faster-whisper"
            ) from exc
        self.whisperx = whisperx
        path = model_dir(models_root, settings.model)
        align_path = model_dir(models_root, settings.align_model)
        check_punkt_tab(settings.language)
        device = resolve_device(settings.device)
        self.settings = settings
        self.device = device
        self.model_name = settings.model
        language = None if settings.language == LANGUAGE_AUTO else settings.language
        self.model = whisperx.load_model(
            str(path),
            device,
            compute_type=settings.compute_type or default_compute_type(device),
            language=language,
            asr_options={"beam_size": settings.beam_size},
            vad_method="pyannote",  # bundled weights; silero goes through torch.hub
            local_files_only=True,
        )
        self.align_model, self.align_metadata = whisperx.load_align_model(
            language_code=language or "en", device=device, model_name=str(align_path)
        )

    def prepare(self, paths: Sequence[Path]) -> PreparedAudio:
        started = time.perf_counter()
        audios = decode_many(paths)
        return PreparedAudio(
            paths=tuple(paths),
            durations=tuple(len(a) / SAMPLE_RATE for a in audios),
            inputs=tuple(audios),
            prepare_seconds=time.perf_counter() - started,
        )

    def transcribe_prepared(self, prepared: PreparedAudio) -> list[Transcript]:
        started = time.perf_counter()
        results: list[tuple[list[Segment], str | None, float | None]] = []
        for audio, dur in zip(prepared.inputs, prepared.durations, strict=True):
            raw = self.model.transcribe(audio, batch_size=self.settings.batch_size)
            aligned = self.whisperx.align(
                raw["segments"],
                self.align_model,
                self.align_metadata,
                audio,
                self.device,
                return_char_alignments=False,
            )
            segments = [_whisperx_segment(s, dur) for s in aligned["segments"]]
            # whisperx does not report the language probability
            results.append((segments, raw.get("language"), None))
        return self._transcripts(prepared, time.perf_counter() - started, results)


def check_punkt_tab(language: str) -> None:
    """Fail at start-up when nltk's punkt_tab data is missing.

    whisperx's aligner splits sentences with nltk's punkt_tab, found through
    NLTK_DATA (the role points it at the synced ``nltk`` model), and when it is
    missing it tries to download it in the middle of the first batch.
    """
    import nltk

    lang = "english" if language in {LANGUAGE_AUTO, "en"} else None
    if lang is None:
        return  # whisperx picks its own punkt language; English is what the fleet runs
    try:
        nltk.data.find(f"tokenizers/punkt_tab/{lang}/")
    except LookupError:
        raise ConfigError(
            f"nltk punkt_tab data for {lang} not found (NLTK_DATA="
            f"{EnvReader().raw('NLTK_DATA')!r}); whisperx's alignment needs it: sync it "
            "as a model (role variable gpu_worker_nltk_data) or set NLTK_DATA"
        ) from None


def _whisperx_segment(seg: Mapping[str, Any], duration: float) -> Segment:
    words = []
    for w in seg.get("words", []):
        # Alignment leaves out times for tokens it cannot place (digits, symbols).
        if "start" not in w or "end" not in w:
            continue
        words.append(
            Word(
                start=_clamp(float(w["start"]), duration),
                end=_clamp(float(w["end"]), duration),
                word=str(w["word"]).strip(),
                probability=round(float(w.get("score", 0.0)), 4),
            )
        )
    return Segment(
        start=_clamp(float(seg["start"]), duration),
        end=_clamp(float(seg["end"]), duration),
        text=str(seg["text"]).strip(),
        words=words,
    )


def load_transcriber(models_root: Path, settings: AsrSettings | None = None) -> Transcriber:
    """The configured backend, its model loaded (seconds to minutes: call once)."""
    settings = settings or AsrSettings.from_env()
    if settings.backend is AsrBackend.WHISPERX:
        return WhisperXTranscriber(settings, models_root)
    return FasterWhisperTranscriber(settings, models_root)
