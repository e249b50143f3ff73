"""Real media made with espeak-ng and ffmpeg: speech, tones, silence and an image.

A file is encoded by its suffix: ``.opus`` as the unpack worker writes it (16 kHz
mono Opus at 24 kb/s), ``.mp3`` as a collection holds it. ``wer`` scores a
transcript against the text that was spoken.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import jiwer

FFMPEG = ["ffmpeg", "-loglevel", "error", "-y"]
ENCODINGS = {
    ".opus": ["-ac", "1", "-ar", "16000", "-c:a", "libopus", "-b:a", "24k"],
    ".mp3": ["-c:a", "libmp3lame"],
}
ESPEAK_WPM = 160

NORMALISE = jiwer.Compose(
    [jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(), jiwer.Strip()]
)


def ffmpeg(*args: str | Path) -> None:
    subprocess.run([*FFMPEG, *map(str, args)], check=True)


def encode(path: Path, *source: str | Path) -> Path:
    """``path`` written from ffmpeg's input arguments ``source``, encoded by its suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg(*source, *ENCODINGS[path.suffix], path)
    return path


def speech(text: str, path: Path, pad_s: float = 0.0) -> Path:
    """espeak-ng saying ``text``, after ``pad_s`` seconds of silence."""
    wav = path.with_suffix(".wav")
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["espeak-ng", "-s", str(ESPEAK_WPM), "-w", str(wav), "--", text], check=True)
    delay = ["-af", f"adelay={int(pad_s * 1000)}"] if pad_s else []
    encode(path, "-i", wav, *delay)
    wav.unlink()
    return path


def tone(path: Path, seconds: float, stereo: bool = False) -> Path:
    """A 440 Hz sine sampled at 44.1 kHz; ``stereo`` is for an .mp3 (Opus is mono)."""
    sine = f"sine=frequency=440:sample_rate=44100:duration={seconds}"
    return encode(path, "-f", "lavfi", "-i", sine, *(["-ac", "2"] if stereo else []))


def silence(path: Path, seconds: float = 3.0) -> Path:
    return encode(path, "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", str(seconds))


def image(path: Path) -> Path:
    """A 16x16 red picture, written as an image whatever ``path``'s suffix says
    (PNG for .png): a file with no audio stream."""
    ffmpeg("-f", "lavfi", "-i", "color=c=red:s=16x16", "-frames:v", "1", "-f", "image2", path)
    return path


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate of a transcript; an empty one counts as every word missed."""
    return jiwer.wer(NORMALISE(reference), NORMALISE(hypothesis) or "<empty>")
