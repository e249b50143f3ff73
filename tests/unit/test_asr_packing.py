"""Pure logic of the faster-whisper backend: settings, and splitting packed windows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from audio_pipeline.asr import (
    SAMPLE_RATE,
    AsrBackend,
    AsrSettings,
    Device,
    _Piece,
    _Unpacker,
    default_compute_type,
    split_segment,
)
from audio_pipeline.config import ConfigError


def test_settings_defaults() -> None:
    s = AsrSettings.from_env({})
    assert s.backend is AsrBackend.FASTER_WHISPER
    assert s.model == "whisper/tiny.en"
    assert s.device is Device.AUTO
    assert s.compute_type is None
    assert default_compute_type("cpu") == "int8"
    assert default_compute_type("cuda") == "float16"


def test_settings_from_env() -> None:
    s = AsrSettings.from_env(
        {
            "ASR_BACKEND": "whisperx",
            "ASR_MODEL": "whisper/large-v3",
            "ASR_DEVICE": "cuda",
            "ASR_COMPUTE_TYPE": "int8_float16",
            "ASR_BATCH_SIZE": "16",
        }
    )
    assert s.backend is AsrBackend.WHISPERX
    assert (s.model, s.device, s.compute_type, s.batch_size) == (
        "whisper/large-v3",
        Device.CUDA,
        "int8_float16",
        16,
    )


def test_settings_errors_name_every_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        AsrSettings.from_env({"ASR_BACKEND": "vosk", "ASR_BATCH_SIZE": "0", "ASR_DEVICE": "tpu"})
    message = str(caught.value)
    assert "ASR_BACKEND='vosk'" in message
    assert "ASR_BATCH_SIZE=0" in message
    assert "ASR_DEVICE='tpu'" in message


def word(text: str, start: float, end: float) -> SimpleNamespace:
    return SimpleNamespace(word=f" {text}", start=start, end=end, probability=0.9)


def test_segment_across_a_file_boundary_is_split_by_word_time() -> None:
    # file 0: speech 0.5-2.5 s of the file at packed 0-2 s; 0.6 s gap;
    # file 1: speech 1.0-3.0 s of the file at packed 2.6-4.6 s.
    pieces = [
        _Piece(0, int(0.5 * SAMPLE_RATE), 2 * SAMPLE_RATE, 0),
        _Piece(1, 1 * SAMPLE_RATE, 2 * SAMPLE_RATE, int(2.6 * SAMPLE_RATE)),
    ]
    seg = SimpleNamespace(
        words=[
            word("hello", 0.1, 0.9),
            word("there", 1.0, 2.2),
            word("next", 2.5, 3.0),
            word("file", 3.1, 3.5),
        ],
    )
    parts = split_segment(seg, _Unpacker(pieces))

    assert set(parts) == {0, 1}
    assert parts[0].text == "hello there"
    assert [(w.start, w.end) for w in parts[0].words] == [(0.6, 1.4), (1.5, 2.5)]  # end clamped
    assert parts[1].text == "next file"
    assert [(w.start, w.end) for w in parts[1].words] == [(1.0, 1.4), (1.5, 1.9)]
    assert (parts[1].start, parts[1].end) == (1.0, 1.9)


def test_time_in_a_gap_goes_to_the_nearer_piece() -> None:
    pieces = [_Piece(0, 0, SAMPLE_RATE, 0), _Piece(1, 0, SAMPLE_RATE, 2 * SAMPLE_RATE)]
    unpacker = _Unpacker(pieces)
    assert unpacker.piece_at(1.2).file_index == 0
    assert unpacker.piece_at(1.8).file_index == 1
    assert unpacker.piece_at(5.0).file_index == 1
