"""Log lines: logfmt by default, JSON on request, and a job's ids on every line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from audio_pipeline.logs import LogFormat, configure_logging, log_context, log_event


class Lines:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys
        self._seen = ""

    def getvalue(self) -> str:
        self._seen += self._capsys.readouterr().err
        return self._seen


@pytest.fixture
def captured(capsys: pytest.CaptureFixture[str]):
    # configured inside the test: pytest swaps sys.stderr between setup and call
    def lines(fmt: LogFormat) -> tuple[logging.Logger, Lines]:
        configure_logging("INFO", fmt)
        return logging.getLogger("audio_pipeline.test"), Lines(capsys)

    yield lines
    configure_logging("INFO")


def test_logfmt_lines_carry_the_context_after_the_event(captured) -> None:
    log, out = captured(LogFormat.LOGFMT)
    with log_context(job="3f2a9c1b", batch_id="b-001", audio_id=None):
        log_event(log, "job.done", stage="unpack", duration_s=1.2)
        log.warning("a library's own line")
    log_event(log, "worker.idle")
    first, second, third = out.getvalue().splitlines()
    assert first == (
        "level=info logger=audio_pipeline.test event=job.done stage=unpack duration_s=1.20"
        " job=3f2a9c1b batch_id=b-001"
    )
    assert second.endswith("a library's own line job=3f2a9c1b batch_id=b-001")
    assert third == "level=info logger=audio_pipeline.test event=worker.idle"


def test_an_events_own_field_wins_over_the_context(captured) -> None:
    log, out = captured(LogFormat.LOGFMT)
    with log_context(batch_id="outer"):
        log_event(log, "gpu.file_done", batch_id="inner")
    assert out.getvalue().count("batch_id=") == 1
    assert "batch_id=inner" in out.getvalue()


def test_json_lines_keep_types_and_tracebacks(captured) -> None:
    log, out = captured(LogFormat.JSON)
    with log_context(job="j1", audio_id=42):
        log_event(log, "gpu.file_done", audio_s=3.5, flagged=1, note='say "hi"')
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("hook failed")
    event, failure = (json.loads(line) for line in out.getvalue().splitlines())
    assert event == {
        "level": "info",
        "logger": "audio_pipeline.test",
        "event": "gpu.file_done",
        "audio_s": 3.5,
        "flagged": 1,
        "note": 'say "hi"',
        "job": "j1",
        "audio_id": 42,
    }
    assert failure["message"] == "hook failed"
    assert failure["level"] == "error"
    assert "RuntimeError: boom" in failure["exception"]


def test_a_worker_rejects_an_unknown_log_format() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "audio_pipeline.workers.unpack_worker", "--once"],
        env={"LOG_FORMAT": "xml", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "'xml' is not one of: logfmt, json" in result.stderr
