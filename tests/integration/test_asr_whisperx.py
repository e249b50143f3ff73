"""The whisperx backend, where whisperx is importable (GPU hosts with requirements-gpu.txt).

Skipped elsewhere: whisperx's PyPI release pins a CUDA build of torch (~3.8 GB) that
CI machines do not carry. Where it runs it needs, under MODELS_ROOT (or
ASR_TEST_MODELS_ROOT), the CTranslate2 whisper model and the wav2vec2 alignment
model that Ansible syncs; nothing is fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from audio_pipeline.asr import AsrBackend, AsrSettings, load_transcriber
from tests.support.media import speech, wer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("whisperx") is None,
        reason="whisperx is not installed: its PyPI release pins a CUDA torch; "
        "it is installed on GPU hosts from requirements-gpu.txt",
    ),
]


TEXTS = {
    "two.opus": "The birch canoe slid on the smooth planks. Help the woman get back to her feet.",
    "kick.opus": "Kick the ball straight and follow through.",
}


def test_whisperx_transcribes_espeak_speech_with_aligned_words(tmp_path: Path) -> None:
    models = Path(os.environ.get("ASR_TEST_MODELS_ROOT", os.environ.get("MODELS_ROOT", "")))
    settings = AsrSettings.from_env({**os.environ, "ASR_BACKEND": "whisperx"})
    if not (models / settings.model).is_dir() or not (models / settings.align_model).is_dir():
        pytest.skip(f"whisper and alignment models are not under {models}")
    transcriber = load_transcriber(models, settings)
    names = ["two.opus", "kick.opus"]
    transcripts = transcriber.transcribe_many([speech(TEXTS[n], tmp_path / n) for n in names])

    for name, t in zip(names, transcripts, strict=True):
        assert t.backend == AsrBackend.WHISPERX.value
        assert wer(TEXTS[name], t.text) <= 0.6
        assert all(0 <= w.start <= w.end <= t.audio_seconds for s in t.segments for w in s.words)
