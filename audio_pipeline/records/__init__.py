"""Database writes, one module per owning stage (upserts on natural keys).

A record function takes a connection with any row factory (the workers' pools
return dicts, the CLI's connections tuples), so a read that wants dicts asks for
them on its own cursor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row


def select_all(
    conn: psycopg.Connection, query: str, params: Sequence[Any] | None = None
) -> list[dict[str, Any]]:
    """Every row of ``query``, as dicts."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


def select_one(
    conn: psycopg.Connection, query: str, params: Sequence[Any] | None = None
) -> dict[str, Any] | None:
    """The first row of ``query`` as a dict, or None."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchone()
