"""audio.py with the real ffmpeg/ffprobe: probing, Opus conversion, failures, parallel runs."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from audio_pipeline import archive, audio
from audio_pipeline.config import ConfigError
from tests.support.hostile_media import PLAYLISTS, FifoWatch, RecordingServer
from tests.support.media import image, speech, tone

pytestmark = pytest.mark.integration

BIRCH_CANOE = "The birch canoe slid on the smooth planks."


def opus_head(path: Path) -> tuple[int, int]:
    """(channels, input sample rate) from the Ogg Opus identification header."""
    data = path.read_bytes()
    at = data.index(b"OpusHead")
    channels = data[at + 9]
    (rate,) = struct.unpack("<I", data[at + 12 : at + 16])
    return channels, rate


def test_probe_speech_mp3(tmp_path):
    info = audio.probe(speech(BIRCH_CANOE, tmp_path / "s.mp3"))
    assert info.codec == "mp3"
    assert info.format_name == "mp3"
    assert 1.5 < info.duration_s < 5
    assert info.channels == 1


def test_probe_refuses_a_file_without_audio(tmp_path):
    text = tmp_path / "fake.mp3"
    text.write_text("I am text, not audio.\n" * 50)
    with pytest.raises(audio.AudioError, match="ffprobe failed"):
        audio.probe(text)
    with pytest.raises(audio.AudioError, match="no audio stream"):
        audio.probe(image(tmp_path / "pic.png"))


def test_convert_gives_16khz_mono_opus_atomically(tmp_path):
    src = tone(tmp_path / "stereo 44k.mp3", 4.0, stereo=True)
    out = tmp_path / "out" / "nested" / "stereo 44k.opus"
    duration = audio.convert_to_opus(src, out)
    assert duration == pytest.approx(4.0, abs=0.1)
    assert opus_head(out) == (1, 16_000)
    info = audio.probe(out)
    assert (info.codec, info.format_name, info.channels) == ("opus", "ogg", 1)
    assert os.listdir(out.parent) == [out.name], "no temporary file left behind"


def test_bitrate_setting_changes_the_output(tmp_path):
    src = tone(tmp_path / "t.mp3", 6.0)
    low, high = tmp_path / "low.opus", tmp_path / "high.opus"
    audio.convert_to_opus(src, low, bitrate="12k")
    audio.convert_to_opus(src, high, bitrate="48k")
    assert high.stat().st_size > 2 * low.stat().st_size
    # 24k for 6 s is about 18 kB of audio plus Ogg overhead
    assert 8_000 < low.stat().st_size < 16_000


def test_failed_conversion_leaves_nothing_and_keeps_an_existing_output(tmp_path):
    text = tmp_path / "fake.mp3"
    text.write_text("definitely not audio\n" * 100)
    out = tmp_path / "fake.opus"
    out.write_bytes(b"previous good output")
    with pytest.raises(audio.AudioError) as exc_info:
        audio.convert_to_opus(text, out)
    assert "fake.mp3" in str(exc_info.value)
    assert str(tmp_path) not in str(exc_info.value), "scratch paths are shortened"
    assert out.read_bytes() == b"previous good output"
    assert sorted(os.listdir(tmp_path)) == ["fake.mp3", "fake.opus"]


def test_an_input_without_audio_is_reported_as_unreadable(tmp_path):
    picture = image(tmp_path / "picture.mp3")
    with pytest.raises(audio.AudioError, match=r"not a readable audio file: .*picture\.mp3"):
        audio.convert_to_opus(picture, tmp_path / "picture.opus")
    assert not list(tmp_path.glob("*.opus"))


# --- playlists named .mp3: refused, and what they list is never opened --------------


def test_fifo_watch_sees_a_reader(tmp_path):
    """The witness used below: it does see an open for reading."""
    with FifoWatch(tmp_path / "pipe") as watch:
        fd = os.open(watch.path, os.O_RDONLY | os.O_NONBLOCK)
        assert watch.opened.wait(5)
        os.close(fd)


@pytest.mark.parametrize("kind", sorted(PLAYLISTS))
def test_playlist_named_mp3_is_refused_without_opening_the_file_it_lists(tmp_path, kind):
    batch = tmp_path / "batch"
    batch.mkdir()
    with FifoWatch(batch / "other.mp3") as other:
        # ffconcat's "safe" mode allows a plain name beside the playlist; HLS takes a path
        target = "other.mp3" if kind == "ffconcat" else str(other.path)
        playlist = PLAYLISTS[kind](batch / "clip.mp3", target)
        out = tmp_path / "out" / "clip.opus"
        with pytest.raises(audio.AudioError, match=r"not a readable audio file: .*clip\.mp3"):
            audio.convert_to_opus(playlist, out)
        assert not other.opened.is_set(), f"ffmpeg opened the file the {kind} playlist lists"
    assert not out.exists()
    assert not list(out.parent.glob(".*"))


@pytest.mark.parametrize("kind", sorted(PLAYLISTS))
def test_playlist_named_mp3_never_contacts_the_url_it_lists(tmp_path, kind):
    spoken = speech(BIRCH_CANOE, tmp_path / "speech.mp3").read_bytes()
    with RecordingServer(body=spoken) as server:
        playlist = PLAYLISTS[kind](tmp_path / "clip.mp3", f"{server.url}/speech.mp3")
        with pytest.raises(audio.AudioError, match=r"not a readable audio file"):
            audio.convert_to_opus(playlist, tmp_path / "clip.opus")
        assert server.requests == [], f"ffmpeg fetched what the {kind} playlist lists"
        # the witness works: a real fetch is recorded
        with urllib.request.urlopen(f"{server.url}/check", timeout=10) as reply:  # noqa: S310
            assert reply.read() == spoken
        assert server.requests == ["/check"]


def test_output_is_held_to_local_files(tmp_path):
    cmd = audio.opus_command(Path("/s/in.mp3"), Path("/s/out.opus"))
    assert cmd[cmd.index("-i") - 4 : cmd.index("-i")] == [
        "-f",
        "mp3",
        "-protocol_whitelist",
        "file",
    ]
    assert cmd[-4:] == ["ogg", "-protocol_whitelist", "file", "/s/out.opus"]
    source = tone(tmp_path / "t.mp3", 1.0)
    with RecordingServer() as server:
        *command, _ = audio.opus_command(source, Path("unused"))
        proc = subprocess.run(
            [*command, f"{server.url}/upload.ogg"], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode != 0
        assert "not on whitelist" in proc.stderr
        assert server.requests == []


def test_every_extracted_suffix_has_an_input_format(tmp_path):
    assert set(audio.INPUT_FORMATS) == set(archive.AUDIO_SUFFIXES)
    assert audio.input_format(Path("a/B.MP3")) == "mp3"
    with pytest.raises(audio.AudioError, match=r"x\.wav: not a known audio format"):
        audio.convert_to_opus(tmp_path / "x.wav", tmp_path / "x.opus")


@pytest.mark.parametrize("seconds", [0.5, 3.0, 17.3])
def test_ogg_duration_agrees_with_ffprobe(tmp_path, seconds):
    out = tmp_path / "t.opus"
    duration = audio.convert_to_opus(tone(tmp_path / "t.mp3", seconds), out)
    assert duration == pytest.approx(audio.probe(out).duration_s, abs=0.01)
    assert duration == pytest.approx(seconds, abs=0.1)


def test_ogg_duration_refuses_a_file_that_is_not_ogg_opus(tmp_path):
    text = tmp_path / "x.opus"
    text.write_bytes(b"OggS but not really" * 10)
    with pytest.raises(audio.AudioError):
        audio.ogg_opus_duration(text)
    out = tmp_path / "t.opus"
    audio.convert_to_opus(tone(tmp_path / "t.mp3", 2.0), out)
    cut = tmp_path / "cut.opus"
    cut.write_bytes(out.read_bytes()[:-10])  # last page incomplete
    with pytest.raises(audio.AudioError, match="no complete last Ogg page"):
        audio.ogg_opus_duration(cut)


def test_timeout_is_a_clear_failure(tmp_path):
    src = tone(tmp_path / "t.mp3", 30.0)
    with pytest.raises(audio.AudioError, match=r"ffmpeg timed out after 0.01 s"):
        audio.convert_to_opus(src, tmp_path / "t.opus", timeout_s=0.01)
    assert not list(tmp_path.glob("*.opus"))
    assert not list(tmp_path.glob(".*partial"))


def test_convert_many_reports_every_file_and_a_bad_one_does_not_stop_the_rest(tmp_path):
    jobs = []
    for i in range(5):
        src = tone(tmp_path / f"good {i}.mp3", 1.0 + i)
        jobs.append(audio.Conversion(f"good {i}", src, tmp_path / "out" / f"good {i}.opus"))
    fake = tmp_path / "really text.mp3"
    fake.write_text("This MP3 is really a text file.\n" * 30)
    jobs.insert(2, audio.Conversion("bad", fake, tmp_path / "out" / "bad.opus"))
    truncated = tmp_path / "cut.mp3"
    truncated.write_bytes((tmp_path / "good 4.mp3").read_bytes()[:300])
    jobs.append(audio.Conversion("cut", truncated, tmp_path / "out" / "cut.opus"))

    results = {r.key: r for r in audio.convert_many(jobs, audio.AudioSettings(jobs=2))}

    assert set(results) == {j.key for j in jobs}
    for i in range(5):
        r = results[f"good {i}"]
        assert r.ok
        assert r.error is None
        assert r.duration_s == pytest.approx(1.0 + i, abs=0.1)
        assert r.output.exists()
    bad = results["bad"]
    assert not bad.ok
    assert bad.duration_s is None
    # ffmpeg's own reason, after a plain statement that the input is the problem
    assert bad.error.startswith("not a readable audio file: ")
    assert "really text.mp3" in bad.error
    assert not (tmp_path / "out" / "bad.opus").exists()
    assert results["cut"].ok is False or results["cut"].duration_s < 0.5
    assert not list((tmp_path / "out").glob(".*"))


def test_commands_use_one_thread_per_process():
    cmd = audio.opus_command(Path("in.mp3"), Path("out.opus"), "24k")
    assert cmd.count("-threads") == 2
    assert "-filter_threads" in cmd
    assert cmd[cmd.index("-ar") + 1] == "16000"
    assert cmd[cmd.index("-ac") + 1] == "1"
    assert cmd[cmd.index("-b:a") + 1] == "24k"
    assert "libopus" in cmd


def test_settings_from_env():
    s = audio.AudioSettings.from_env(
        {"OPUS_BITRATE": "32k", "UNPACK_FFMPEG_JOBS": "3", "UNPACK_FFMPEG_TIMEOUT_S": "9.5"}
    )
    assert (s.opus_bitrate, s.jobs, s.timeout_s) == ("32k", 3, 9.5)
    assert audio.AudioSettings.from_env({}).jobs == (os.cpu_count() or 1)
    with pytest.raises(ConfigError, match=r"(?s)OPUS_BITRATE.*UNPACK_FFMPEG_JOBS"):
        audio.AudioSettings.from_env({"OPUS_BITRATE": "fast", "UNPACK_FFMPEG_JOBS": "0"})


def _own_child_with_arg(fragment: str) -> int | None:
    """The pid of a child of this test process whose command line contains ``fragment``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and fragment in cmdline:
            return int(entry.name)
    return None


def test_a_signalled_ffmpeg_is_reported_as_interrupted_not_as_a_bad_file(tmp_path):
    """systemd signals every process of a stopping unit; that is not the file's fault."""
    src = tone(tmp_path / "long.mp3", 200.0)
    out = tmp_path / "out" / "long-unique-name.opus"
    results: list[audio.ConversionResult] = []
    runner = threading.Thread(
        target=lambda: results.extend(audio.convert_many([audio.Conversion("k", src, out)]))
    )
    runner.start()
    pid = None
    deadline = time.monotonic() + 20
    while pid is None and time.monotonic() < deadline:
        pid = _own_child_with_arg(".long-unique-name.opus.")
        time.sleep(0.02)
    assert pid is not None, "ffmpeg did not start"
    # Once it is converting: a signal that lands while ffmpeg still sets up its filters
    # can end it like a bad input (exit 1), which only its caller can tell apart, by
    # knowing it is stopping (the unpack worker does).
    while not any(p.stat().st_size for p in out.parent.glob(".*")):
        assert time.monotonic() < deadline, "ffmpeg wrote nothing"
        time.sleep(0.02)
    os.kill(pid, signal.SIGTERM)
    runner.join(timeout=30)
    [result] = results
    assert result.interrupted
    assert not result.ok
    assert "stopped by a signal" in result.error
    assert not out.exists()
    assert not list(out.parent.glob(".*"))
