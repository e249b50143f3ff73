"""Export of labels with transcript metadata, streamed as CSV or JSONL.

One query with a server-side cursor: memory stays flat however many labels
there are, and the pipeline tables are outer-joined by primary key.

Formula injection: file names, transcripts and notes come from outside the
study, and a spreadsheet runs a cell that starts with = + - @ (tab and CR too)
as a formula (=HYPERLINK(...) can leak data). Following OWASP, every string value
that starts with one of those gets a leading single quote, and every CSV cell is
quoted. JSONL gets the same treatment: it is meant for programs, but it is also
pasted into or converted for spreadsheets, and the issue asks for both. To keep
the values recoverable, a string that already starts with a quote is prefixed
too, so a program gets the raw value back by removing exactly one leading "'"
from any string that starts with one (see ``unneutralise``).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import text

from ra_app import audit_log
from ra_app.codebook import Codebook, Field, FieldType
from ra_app.extensions import db
from ra_app.pipeline import ITEM_FACTS, TRANSCRIPT_FACTS

FETCH_ROWS = 1000  # rows per round trip of the server-side cursor
MULTI_SEPARATOR = ";"  # joins a multi-choice answer in one CSV cell
FORMULA_ESCAPE = "'"
# The escape itself is in the list so that the escaping can be undone exactly.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", FORMULA_ESCAPE)


class ExportFormat(StrEnum):
    CSV = "csv"
    JSONL = "jsonl"


MIME = {ExportFormat.CSV: "text/csv; charset=utf-8", ExportFormat.JSONL: "application/x-ndjson"}

# Labels first, the pipeline's rows outer-joined: a label whose batch the pipeline
# has deleted (the delete cascades to its classifications) is still exported, with
# the facts it kept when it was made (models.Label), an empty transcript, and
# pipeline_deleted = true. A label's own copy wins over the live row: the export
# shows what the coder judged, even if the pipeline re-scored the item since.
# Labels from before the copy existed fall back to the live row (or ra_items).
# The exception is the transcript, which is not copied: its text, language and ASR
# model come together from the pipeline's transcript row while there is one, so they
# never describe two different transcription runs.
_EXPORT_SQL = """
SELECT l.id AS label_id, l.assignment_id, l.classification_id,
       coalesce(l.audio_id, c.audio_id, i.audio_id) AS audio_id,
       coalesce(l.batch_id, f.batch_id, i.batch_id) AS batch_id,
       coalesce(l.rel_path, f.rel_path) AS rel_path,
       coalesce(l.duration_s, f.duration_s) AS duration_s,
       coalesce(l.opus_s3_key, f.opus_s3_key) AS opus_s3_key,
       coalesce(l.policy_name, p.name) AS policy_name,
       coalesce(l.policy_version, p.version) AS policy_version,
       coalesce(l.classifier_model, c.model) AS classifier_model,
       coalesce(l.score, c.score, i.score::real) AS score,
       coalesce(l.threshold, c.threshold) AS threshold,
       u.username AS coder, a.source AS assignment_source, i.coders_needed,
       i.entry AS entered_as, i.sample_probability, l.reviewed_blind,
       l.codebook_version, l.time_on_task_ms, a.assigned_at, l.created_at AS labeled_at,
       CASE WHEN t.audio_id IS NULL THEN l.language ELSE t.language END AS language,
       CASE WHEN t.audio_id IS NULL THEN l.asr_model ELSE t.model END AS asr_model,
       t.text AS transcript,
       c.id IS NULL AS pipeline_deleted, l.answer,
       adj.answer AS final_answer, adj.decided_by AS final_decided_by,
       adj.decided_at AS final_decided_at, adj.note AS final_note
FROM ra_labels l
JOIN ra_assignments a ON a.id = l.assignment_id
JOIN ra_users u ON u.id = l.user_id
JOIN ra_items i ON i.classification_id = l.classification_id
LEFT JOIN classifications c ON c.id = l.classification_id
LEFT JOIN audio_files f ON f.id = c.audio_id
LEFT JOIN policies p ON p.id = c.policy_id
LEFT JOIN transcripts t ON t.audio_id = c.audio_id
LEFT JOIN LATERAL (
    SELECT d.answer, du.username AS decided_by, d.decided_at, d.note
    FROM ra_adjudications d JOIN ra_users du ON du.id = d.decided_by
    WHERE d.classification_id = l.classification_id
    ORDER BY d.id DESC LIMIT 1
) adj ON true
ORDER BY l.id
"""
BASE_COLUMNS = [
    "label_id",
    "assignment_id",
    "classification_id",
    *ITEM_FACTS,
    "coder",
    "assignment_source",
    "coders_needed",
    "entered_as",  # flagged, or audit (an unflagged item drawn into the audit sample)
    "sample_probability",  # with which it was drawn: 1 for flagged items
    "reviewed_blind",  # the coder saw no score, flag or evidence (RA_BLIND)
    "codebook_version",
    "time_on_task_ms",
    "assigned_at",
    "labeled_at",
    *TRANSCRIPT_FACTS,
    "transcript",
    "pipeline_deleted",
]
# The item's current final label (ra_app.adjudication), repeated on each of its
# coders' rows; empty where nobody adjudicated. The answer itself follows: one
# final_<field> column per codebook field in CSV, a final_answer object in JSONL.
FINAL_COLUMNS = ["final_decided_by", "final_decided_at", "final_note"]


def _rows() -> Iterator[dict[str, Any]]:
    result = db.session.execute(
        text(_EXPORT_SQL).execution_options(stream_results=True, yield_per=FETCH_ROWS)
    )
    for row in result.mappings():
        yield dict(row)


def neutralise(value: Any) -> Any:
    """``value`` with any string in it made inert for a spreadsheet (see above)."""
    if isinstance(value, str):
        return FORMULA_ESCAPE + value if value.startswith(FORMULA_STARTS) else value
    if isinstance(value, dict):
        return {k: neutralise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [neutralise(v) for v in value]
    return value


def unneutralise(value: str) -> str:
    """The raw string an exported string value stands for."""
    return value[1:] if value.startswith(FORMULA_ESCAPE) else value


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def jsonl(codebook: Codebook) -> Iterator[str]:
    for row in _rows():
        record = {k: _plain(row[k]) for k in BASE_COLUMNS}
        record["answer"] = row["answer"]
        record["final_answer"] = row["final_answer"]
        record.update({k: _plain(row[k]) for k in FINAL_COLUMNS})
        yield json.dumps(neutralise(record), ensure_ascii=False) + "\n"


def csv_lines(codebook: Codebook) -> Iterator[str]:
    """CSV with one column per codebook field after the metadata columns."""
    fields = list(codebook.fields)
    buffer = io.StringIO()
    # Quoting every cell (OWASP's second half) keeps a value whole in spreadsheets
    # that split unquoted cells on ';' (locales with a decimal comma).
    writer = csv.writer(buffer, quoting=csv.QUOTE_ALL)

    def flush() -> str:
        out = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return out

    writer.writerow(
        BASE_COLUMNS
        + [f"answer_{f.id}" for f in fields]
        + [f"final_{f.id}" for f in fields]
        + FINAL_COLUMNS
    )
    yield flush()
    for row in _rows():
        cells = [_plain(row[k]) for k in BASE_COLUMNS]
        cells += _answer_cells(row["answer"], fields)
        cells += _answer_cells(row["final_answer"], fields)
        cells += ["" if row[k] is None else _plain(row[k]) for k in FINAL_COLUMNS]
        writer.writerow([neutralise(c) for c in cells])
        yield flush()


def _answer_cells(answer: dict[str, Any] | None, fields: list[Field]) -> list[Any]:
    """One cell per codebook field; all empty when there is no answer."""
    cells: list[Any] = []
    for f in fields:
        value = (answer or {}).get(f.id)
        if f.type is FieldType.MULTI and isinstance(value, list):
            value = MULTI_SEPARATOR.join(value)
        cells.append("" if value is None else value)
    return cells


def export_lines(fmt: ExportFormat, codebook: Codebook) -> Iterator[str]:
    return csv_lines(codebook) if fmt is ExportFormat.CSV else jsonl(codebook)


def audit_log_csv_lines(filters: audit_log.Filters) -> Iterator[str]:
    """The audit log rows that match ``filters`` as CSV, neutralised like the labels."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_ALL)
    writer.writerow(audit_log.COLUMNS)
    for row in audit_log.rows(filters):
        cells = []
        for key in audit_log.COLUMNS:
            value = row._mapping[key]
            if key == "details" and value is not None:
                value = json.dumps(value, ensure_ascii=False, sort_keys=True)
            cells.append("" if value is None else _plain(value))
        writer.writerow([neutralise(c) for c in cells])
        out = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        yield out
    yield buffer.getvalue()
