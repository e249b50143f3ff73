"""Requeue and purge dead letters: the one implementation behind `audio-pipeline
requeue` / `purge-failed` and the RA app's operator page.

queue_admin.py moves and trims the Redis lists; this module adds what every caller
needs around it: the pipeline-role PostgreSQL connection that puts a requeued job's
rows back in play (records/dead_letters.py), and guards for callers that chose from
a list shown earlier. A web page's "requeue #3" or "purge the 12 I saw" may be
clicked minutes after the page was drawn, when the list has shifted; both carry
what the operator saw and are refused when it is no longer there.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import psycopg
import redis

from audio_pipeline import queue_admin
from audio_pipeline.config import QUEUE_FAILED
from audio_pipeline.queue import ENQUEUED_FIELD
from audio_pipeline.records import dead_letters as dead_letter_records

PG_CONNECT_TIMEOUT = 5  # seconds
PURGE_TRIES = 5  # WATCH rounds lost to dead letters arriving meanwhile before giving up


class DeadLetterActionError(Exception):
    """Nothing was done; the message says why, for the operator."""


class StaleSelectionError(DeadLetterActionError):
    """The dead letters the operator chose from are no longer the ones in queue:failed."""


def fingerprint(raw: str) -> str:
    """A short, stable name of one dead letter's exact text (what a page's button carries)."""
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


# -- requeue --------------------------------------------------------------------------


def requeue(
    r: redis.Redis,
    database_url: str,
    *,
    all_: bool = False,
    index: int | None = None,
    stage: str | None = None,
    expect: str | None = None,
) -> list[dict[str, Any]]:
    """queue_admin.requeue with each job's rows reopened first; what happened per entry.

    ``expect`` (with ``index``) is the fingerprint of the dead letter the caller saw
    at that index: anything else there is refused with StaleSelectionError.
    """
    if expect is not None and index is None:
        raise ValueError("expect names the dead letter at an index: give the index too")
    # Autocommit: each job's rows are back in play before the job is, so a worker
    # that takes it at once never finds them finished (records/dead_letters.py).
    try:
        conn = psycopg.connect(database_url, connect_timeout=PG_CONNECT_TIMEOUT, autocommit=True)
    except psycopg.Error as exc:
        raise DeadLetterActionError(f"PostgreSQL unavailable, nothing requeued: {exc}") from None
    with conn:
        seen = _expected_entry(r, index, expect) if expect is not None else None

        def reopen(queue: str, payload: dict[str, Any]) -> str:
            # queue_admin.requeue reads the list again and calls this before it moves
            # the job it read: refusing here is what makes the check above race-free.
            if expect is not None and not _same_job(seen, queue, payload):
                raise StaleSelectionError(_stale(index))
            return dead_letter_records.reopen(conn, queue, payload)

        try:
            return queue_admin.requeue(r, all_=all_, index=index, stage=stage, reopen=reopen)
        except queue_admin.RequeueError as exc:
            if expect is not None:
                raise StaleSelectionError(_stale(index)) from None
            raise DeadLetterActionError(str(exc)) from None


def _stale(index: int | None) -> str:
    return (
        f"the dead letter at index {index} is no longer the one shown "
        "(the list changed meanwhile): nothing requeued, look again"
    )


def _expected_entry(r: redis.Redis, index: int | None, expect: str) -> dict[str, Any] | None:
    entries = queue_admin.read_failed(r)
    if index is None or not 0 <= index < len(entries) or fingerprint(entries[index][1]) != expect:
        raise StaleSelectionError(_stale(index))
    return entries[index][2]


def _same_job(seen: dict[str, Any] | None, queue: str, payload: dict[str, Any]) -> bool:
    """Whether ``payload`` (bound for ``queue``) is the job of the dead letter seen.
    Two dead letters of one job compare equal: requeueing either does the same."""
    if seen is None or seen.get("queue") != queue:
        return False
    job = queue_admin.reset_attempts(seen.get("job"))  # type: ignore[arg-type]
    if job is None:
        return False
    expected = json.loads(job)
    expected.pop(ENQUEUED_FIELD, None)
    return expected == {k: v for k, v in payload.items() if k != ENQUEUED_FIELD}


# -- purge ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """The oldest ``count`` dead letters as the operator saw them (``digest`` of their text)."""

    count: int
    digest: str


def _digest(raws: list[str]) -> str:
    h = hashlib.sha256()
    for raw in raws:
        data = raw.encode()
        h.update(len(data).to_bytes(8, "big") + data)  # length-prefixed: no two lists collide
    return h.hexdigest()[:32]


def seen_of(raws: list[str]) -> Seen:
    """What purge_seen checks of the dead letters ``raws`` (queue:failed from its head)."""
    return Seen(len(raws), _digest(raws))


def seen_failed(r: redis.Redis) -> Seen:
    """Every dead letter in queue:failed now, as a later purge_seen will check it."""
    return seen_of(r.lrange(QUEUE_FAILED, 0, -1))


def purge_seen(r: redis.Redis, seen: Seen) -> int:
    """Delete exactly the dead letters ``seen`` (the oldest ones): a failure arriving
    meanwhile is kept, and if any seen one left (requeued, purged) nothing is deleted.
    Returns how many were deleted."""
    if seen.count <= 0:
        return 0
    for _ in range(PURGE_TRIES):
        with r.pipeline() as pipe:
            try:
                pipe.watch(QUEUE_FAILED)
                head = pipe.lrange(QUEUE_FAILED, 0, seen.count - 1)
                if len(head) < seen.count or _digest(head) != seen.digest:
                    raise StaleSelectionError(
                        "queue:failed changed since it was shown (dead letters requeued or "
                        "purged meanwhile): nothing deleted, look again"
                    )
                pipe.multi()
                queue_admin.purge_failed(pipe, seen.count)  # type: ignore[arg-type]
                pipe.execute()
                return seen.count
            except redis.WatchError:
                continue  # a new dead letter was appended: check the head again
    raise DeadLetterActionError("queue:failed kept changing: nothing deleted, try again")
