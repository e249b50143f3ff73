"""policies rows: what the gpu stage reads and what operators write.

A policy is versioned: a new wording is a new row, never an edit, so every
classification names the exact text it was judged against. Operators only ever add
versions and switch ``active`` on or off (``audio-pipeline policy ...``).

The functions take a connection with any row factory (see records/__init__.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from audio_pipeline.classify import Policy
from audio_pipeline.records import select_all, select_one


@dataclass(frozen=True)
class PolicyVersion:
    """One row of policies, as the operator tools see it."""

    id: int
    name: str
    version: int
    text: str
    lexicon: tuple[str, ...]
    active: bool

    def same_wording(self, text: str, lexicon: tuple[str, ...]) -> bool:
        return self.text == text and self.lexicon == lexicon


_COLUMNS = "id, name, version, text, lexicon, active"


class PolicyVersionConflict(Exception):
    """A version that exists already with another wording (policies are never edited)."""


def _version(row: dict[str, Any]) -> PolicyVersion:
    return PolicyVersion(
        id=int(row["id"]),
        name=row["name"],
        version=int(row["version"]),
        text=row["text"],
        lexicon=tuple(row["lexicon"] or ()),
        active=bool(row["active"]),
    )


def active_policies(conn: psycopg.Connection) -> list[Policy]:
    """Every active policy version, in a stable order (name, version)."""
    rows = select_all(
        conn,
        "SELECT id, name, version, text, lexicon FROM policies WHERE active ORDER BY name, version",
    )
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


def policy_by_id(conn: psycopg.Connection, policy_id: int) -> Policy | None:
    """One version by id, active or not (a re-classification may name an old one)."""
    r = select_one(
        conn, "SELECT id, name, version, text, lexicon FROM policies WHERE id = %s", (policy_id,)
    )
    if r is None:
        return None
    return Policy(
        id=int(r["id"]),
        name=r["name"],
        version=int(r["version"]),
        text=r["text"],
        lexicon=tuple(r["lexicon"] or ()),
    )


def lock_name(conn: psycopg.Connection, name: str) -> None:
    """Serialise writers of one policy name until the transaction ends.

    Two operators applying at once would otherwise both read version N and both
    try to insert N + 1; one would fail on the unique key.
    """
    conn.execute("SELECT pg_advisory_xact_lock(hashtext('policies:' || %s))", (name,))


def get_version(conn: psycopg.Connection, name: str, version: int) -> PolicyVersion | None:
    row = select_one(
        conn,
        f"SELECT {_COLUMNS} FROM policies WHERE name = %s AND version = %s",  # noqa: S608
        (name, version),
    )
    return None if row is None else _version(row)


def versions(conn: psycopg.Connection, name: str) -> list[PolicyVersion]:
    """Every version of one policy, oldest first."""
    rows = select_all(
        conn,
        f"SELECT {_COLUMNS} FROM policies WHERE name = %s ORDER BY version",  # noqa: S608
        (name,),
    )
    return [_version(r) for r in rows]


def next_version(conn: psycopg.Connection, name: str) -> int:
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute("SELECT max(version) FROM policies WHERE name = %s", (name,)).fetchone()
    assert row is not None  # an aggregate always returns one row
    return int(row[0] or 0) + 1


def insert_version(
    conn: psycopg.Connection, name: str, version: int, text: str, lexicon: list[str]
) -> int:
    """Add a version (active, the column's default); returns its id."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(
            "INSERT INTO policies (name, version, text, lexicon) VALUES (%s, %s, %s, %s) "
            "RETURNING id",
            (name, version, text, lexicon),
        ).fetchone()
    assert row is not None
    return int(row[0])


def set_active(conn: psycopg.Connection, name: str, version: int, active: bool) -> bool:
    """Switch one version on or off; False when there is no such version."""
    return bool(
        conn.execute(
            "UPDATE policies SET active = %s WHERE name = %s AND version = %s",
            (active, name, version),
        ).rowcount
    )


def all_versions(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every version of every policy, for listings."""
    return select_all(
        conn,
        "SELECT id, name, version, active, lexicon, text, created_at "
        "FROM policies ORDER BY name, version",
    )


def add_version(
    conn: psycopg.Connection, name: str, version: int, text: str, lexicon: list[str]
) -> str:
    """Add ``version`` of ``name`` (``audio-pipeline policy add``): "added", or
    "unchanged" when that version exists with this very wording; a different wording
    raises PolicyVersionConflict naming the version to add instead."""
    existing = get_version(conn, name, version)
    if existing is not None:
        if existing.same_wording(text, tuple(lexicon)):
            return "unchanged"
        raise PolicyVersionConflict(
            f"policy {name!r} version {version} already exists with a different text or "
            f"lexicon; policies are never edited: add version {next_version(conn, name)} instead"
        )
    insert_version(conn, name, version, text, lexicon)
    return "added"


def count_active(conn: psycopg.Connection) -> int:
    """Active versions (none: files are transcribed but get no verdict)."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute("SELECT count(*) FROM policies WHERE active").fetchone()
    assert row is not None
    return int(row[0])
