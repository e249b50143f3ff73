"""Structured logging for the workers: one logfmt line per event.

journalctl already stamps each line with time and unit, so a line carries the
level, the logger and ``key=value`` fields, e.g.::

    level=info logger=audio_pipeline.worker event=job.done stage=unpack job=3f2a9c1b
    batch_id=b-001 duration_s=1.20

Operators grep for ``event=job.failed`` or ``batch_id=...``; values with spaces or
quotes are quoted so a line always splits back into the same fields.

With ``LOG_FORMAT=json`` each line is one JSON object instead (``level``, ``logger``,
``event`` and the same fields, typed), for a log shipper that indexes fields.

Inside ``log_context(job=..., batch_id=..., audio_id=...)`` every line, whoever logs
it (the queue, a stage, a library warning), carries those fields too, so all the lines
of one job can be found by its id.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

MAX_VALUE_CHARS = 2000  # one huge traceback must not flood the journal
LOG_FORMAT = "level=%(levelname)s logger=%(name)s %(message)s"

# Fields every line logged in this context carries (a job's ids); per thread/task.
_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "audio_pipeline_log_context", default=None
)


class LogFormat(StrEnum):
    LOGFMT = "logfmt"  # key=value lines: what operators grep in journalctl
    JSON = "json"  # one JSON object per line: for a shipper that indexes fields


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every line logged inside, in this thread (None values skipped)."""
    token = _context.set(
        {**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}}
    )
    try:
        yield
    finally:
        _context.reset(token)


def configure_logging(level: str = "INFO", fmt: str = LogFormat.LOGFMT) -> None:
    """Send every log record to stderr as one line (logfmt or JSON); idempotent."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r} (use DEBUG, INFO, WARNING, ERROR)")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_audio_pipeline", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = (
        _JsonFormatter() if LogFormat(fmt) is LogFormat.JSON else _LowerLevelFormatter(LOG_FORMAT)
    )
    handler.setFormatter(formatter)
    handler._audio_pipeline = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    # Library chatter (boto's per-request debug lines) drowns the job events.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "paramiko"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))


def _context_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The context's fields this record does not already carry itself."""
    own = getattr(record, "event_fields", None) or {}
    return {k: v for k, v in (_context.get() or {}).items() if k not in own}


class _LowerLevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        line = line.replace(f"level={record.levelname}", f"level={record.levelname.lower()}", 1)
        extra = _context_fields(record)
        if extra:
            # after the message, before any traceback, so the event stays first
            head, sep, rest = line.partition("\n")
            tail = " ".join(f"{k}={format_value(v, k)}" for k, v in extra.items())
            line = f"{head} {tail}{sep}{rest}"
        if record.exc_info and "\n" in line:
            # Keep the traceback on the same journal line as its event.
            line = line.replace("\n", " | ")
        return line


class _JsonFormatter(logging.Formatter):
    """One JSON object per record; an event's fields keep their types."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"level": record.levelname.lower(), "logger": record.name}
        event = getattr(record, "event", None)
        if event is not None:
            out["event"] = event
            out.update(getattr(record, "event_fields", {}))
        else:
            out["message"] = record.getMessage()
        out.update(_context_fields(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=_json_default, ensure_ascii=False)


def _json_default(value: Any) -> Any:
    text = str(value)
    return text[:MAX_VALUE_CHARS] + "...(truncated)" if len(text) > MAX_VALUE_CHARS else text


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
        logger.log(
            level,
            "%s",
            format_fields(event, fields),
            extra={"event": event, "event_fields": fields},
        )
