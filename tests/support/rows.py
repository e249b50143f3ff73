"""Row factories for the pipeline's tables: the rows the pipeline would have written.

Each inserts one row from the columns a test names and returns its key; every other
column keeps the schema's default, so a test says only what it is about. They write
through the caller's connection (the pipeline-role ``db_conn``, as the pipeline
itself would) and never commit: the test decides when its rows become visible.
Tests of the schema's own constraints keep their raw SQL, which is what they test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

SEGMENTS = [
    {"start": 0.0, "end": 2.5, "text": " Hello and welcome.", "words": []},
    {"start": 2.5, "end": 5.0, "text": " You people are vermin.", "words": []},
    {"start": 5.0, "end": 7.0, "text": " Goodbye.", "words": []},
]


def _insert(
    conn: psycopg.Connection[Any],
    table: str,
    values: Mapping[str, Any],
    returning: str,
    on_conflict: sql.Composable | None = None,
) -> Any:
    columns = list(values)
    query = sql.SQL("INSERT INTO {} ({}) VALUES ({}){} RETURNING {}").format(
        sql.Identifier(table),
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join(sql.Placeholder() * len(columns)),
        sql.SQL(" ") + on_conflict if on_conflict is not None else sql.SQL(""),
        sql.Identifier(returning),
    )
    row = conn.execute(query, [values[c] for c in columns]).fetchone()
    assert row is not None, f"{table}: the insert returned no row"
    # db_conn yields dicts, other connections tuples
    return row[returning] if isinstance(row, Mapping) else row[0]


def add_batch(
    conn: psycopg.Connection[Any],
    batch_id: str = "b-1",
    status: str | None = None,
    *,
    exist_ok: bool = False,
    **columns: Any,
) -> str:
    """A ``batches`` row (archive key ``archives/{batch_id}.tar`` unless given);
    with ``exist_ok`` an existing row of that id is kept as it is."""
    values = {"batch_id": batch_id, "s3_key": f"archives/{batch_id}.tar", **columns}
    if status is not None:
        values["status"] = status
    conflict = None
    if exist_ok:
        # DO UPDATE with no change, so that RETURNING yields the existing row too
        conflict = sql.SQL("ON CONFLICT (batch_id) DO UPDATE SET batch_id = EXCLUDED.batch_id")
    return str(_insert(conn, "batches", values, "batch_id", conflict))


def add_audio_file(
    conn: psycopg.Connection[Any],
    batch_id: str,
    rel_path: str,
    status: str | None = None,
    **columns: Any,
) -> int:
    """An ``audio_files`` row of ``batch_id``; returns its id (a transcribe job's audio_id)."""
    values = {"batch_id": batch_id, "rel_path": rel_path, **columns}
    if status is not None:
        values["status"] = status
    return int(_insert(conn, "audio_files", values, "id"))


def add_policy(
    conn: psycopg.Connection[Any],
    name: str = "harassment",
    text: str = "# Policy",
    *,
    version: int = 1,
    lexicon: Sequence[str] = (),
    **columns: Any,
) -> int:
    """A ``policies`` row; the same name and version again updates its text and
    returns the same id, so helpers that seed several batches share one policy."""
    values = {"name": name, "version": version, "text": text, "lexicon": list(lexicon), **columns}
    conflict = sql.SQL("ON CONFLICT (name, version) DO UPDATE SET text = EXCLUDED.text")
    return int(_insert(conn, "policies", values, "id", conflict))


def add_transcript(
    conn: psycopg.Connection[Any],
    audio_id: int,
    text: str | None = None,
    *,
    segments: Sequence[Mapping[str, Any]] | None = None,
    model: str = "tiny.en",
    backend: str = "faster-whisper",
    **columns: Any,
) -> int:
    """A ``transcripts`` row for ``audio_id``; without a text, the segments' words."""
    if segments is None:
        segments = SEGMENTS if text is None else []
    if text is None:
        text = " ".join(str(s["text"]).strip() for s in segments)
    values = {
        "audio_id": audio_id,
        "text": text,
        "segments": Jsonb(list(segments)),
        "model": model,
        "backend": backend,
        **columns,
    }
    return int(_insert(conn, "transcripts", values, "audio_id"))


def add_classification(
    conn: psycopg.Connection[Any],
    audio_id: int,
    policy_id: int,
    score: float = 0.9,
    *,
    threshold: float = 0.5,
    label: int | None = None,
    model: str = "cope-a-tiny",
    evidence: Sequence[Mapping[str, Any]] = (),
    **columns: Any,
) -> int:
    """A ``classifications`` row; its label is ``score >= threshold`` unless given."""
    values = {
        "audio_id": audio_id,
        "policy_id": policy_id,
        "model": model,
        "score": score,
        "label": int(score >= threshold) if label is None else label,
        "threshold": threshold,
        "evidence": Jsonb(list(evidence)),
        **columns,
    }
    return int(_insert(conn, "classifications", values, "id"))


def add_reclassify_run(
    conn: psycopg.Connection[Any],
    policy_id: int,
    batch_id: str | None,
    audio_ids: Sequence[int],
    *,
    model: str = "lexicon-v1",
    files: int | None = None,
    **file_columns: Any,
) -> int:
    """A ``reclassify_runs`` row (``files`` defaults to how many ids are given) and a
    ``reclassify_files`` row per audio id, each with ``file_columns``; the run's id."""
    run = {
        "policy_id": policy_id,
        "model": model,
        "batch_id": batch_id,
        "files": len(audio_ids) if files is None else files,
    }
    run_id = int(_insert(conn, "reclassify_runs", run, "id"))
    for audio_id in audio_ids:
        values = {"run_id": run_id, "audio_id": audio_id, **file_columns}
        _insert(conn, "reclassify_files", values, "run_id")
    return run_id
