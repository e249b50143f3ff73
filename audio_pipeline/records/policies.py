"""policies rows: what the gpu stage reads (the RA app and operators write them)."""

from __future__ import annotations

import psycopg

from audio_pipeline.classify import Policy


def active_policies(conn: psycopg.Connection) -> list[Policy]:
    """Every active policy version, in a stable order (name, version)."""
    rows = conn.execute(
        "SELECT id, name, version, text, lexicon FROM policies WHERE active ORDER BY name, version"
    ).fetchall()
    return [
        Policy(
            id=int(r["id"]),
            name=r["name"],
            version=int(r["version"]),
            text=r["text"],
            lexicon=tuple(r["lexicon"] or ()),
        )
        for r in rows
    ]
