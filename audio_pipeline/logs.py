"""Structured logging for the workers: one logfmt line per event.

journalctl already stamps each line with time and unit, so a line carries the
level, the logger and ``key=value`` fields, e.g.::

    level=info logger=audio_pipeline.worker event=job.done stage=unpack job=3f2a9c1b
    batch_id=b-001 duration_s=1.20

Operators grep for ``event=job.failed`` or ``batch_id=...``; values with spaces or
quotes are quoted so a line always splits back into the same fields.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

MAX_VALUE_CHARS = 2000  # one huge traceback must not flood the journal
LOG_FORMAT = "level=%(levelname)s logger=%(name)s %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Send every log record to stderr as one logfmt line; idempotent."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r} (use DEBUG, INFO, WARNING, ERROR)")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_audio_pipeline", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LowerLevelFormatter(LOG_FORMAT))
    handler._audio_pipeline = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    # Library chatter (boto's per-request debug lines) drowns the job events.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "paramiko"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))


class _LowerLevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        line = line.replace(f"level={record.levelname}", f"level={record.levelname.lower()}", 1)
        if record.exc_info and "\n" in line:
            # Keep the traceback on the same journal line as its event.
            line = line.replace("\n", " | ")
        return line


def format_value(value: Any, key: str = "") -> str:
    """A logfmt value: bare when safe, otherwise double-quoted with escapes."""
    if value is None:
        text = ""
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        # durations read best at a fixed 2 decimals; scores keep 4 significant digits
        text = f"{value:.2f}" if key.endswith("_s") else f"{value:.4g}"
    else:
        text = str(value)
    if len(text) > MAX_VALUE_CHARS:
        text = text[:MAX_VALUE_CHARS] + "...(truncated)"
    if text and not any(c in text for c in ' "=\\\n\r\t'):
        return text
    escaped = (
        text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    )
    return f'"{escaped}"'


def format_fields(event: str, fields: dict[str, Any]) -> str:
    parts = [f"event={format_value(event)}"]
    parts += [f"{key}={format_value(value, key)}" for key, value in fields.items()]
    return " ".join(parts)


def log_event(
    logger: logging.Logger, event: str, *, level: int = logging.INFO, **fields: Any
) -> None:
    """Log one event with its fields as logfmt (``event=job.done stage=unpack ...``)."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", format_fields(event, fields))
