"""Operating the queues by hand: what is in them, the dead letters, requeue and purge.

The worker side of the queues (claim, ack, retry, reaper) is ``queue.py``; this module
reads the same key layout for the operator's ``audio-pipeline status``, ``failed``,
``requeue`` and ``purge-failed`` (cli.py prints what these return).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis

from audio_pipeline.config import QUEUE_CLASSIFY, QUEUE_FAILED, QUEUE_TRANSCRIBE, QUEUE_UNPACK
from audio_pipeline.queue import (
    ATTEMPTS_FIELD,
    DELAYED_KEY,
    PROCESSING_PREFIX,
    UNSETTLED_PREFIX,
    WORKERS_KEY,
    heartbeat_key,
    parse_processing_key,
    stamped,
)

ALWAYS_SHOWN_QUEUES = (QUEUE_UNPACK, QUEUE_TRANSCRIBE, QUEUE_CLASSIFY, QUEUE_FAILED)

# Moves one dead letter (ARGV[1]) back to a queue only if it is still in queue:failed,
# so two operators requeueing at once never double a job.
_REQUEUE_LUA = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
"""


class RequeueError(ValueError):
    """The selection names no dead letter; the message says why."""


# -- status -------------------------------------------------------------------------


def queue_status(r: redis.Redis) -> dict[str, Any]:
    """Queue depths, processing lists, delayed retries, dead letters and workers."""
    now = time.time()
    queues = {q: 0 for q in ALWAYS_SHOWN_QUEUES}
    for key in r.scan_iter(match="queue:*", count=500):
        if r.type(key) == "list":
            queues[key] = r.llen(key)
    return {
        "queues": dict(sorted(queues.items())),
        "processing": _processing(r),
        "delayed_retries": _delayed_retries(r, now),
        "failed": queues[QUEUE_FAILED],
        "unsettled_dead_letters": _unsettled(r),
        "workers": _workers(r, now),
    }


def _unsettled(r: redis.Redis) -> dict[str, int]:
    """Per stage, the reaper's dead letters whose rows a worker of that stage has not
    yet marked failed (queue.py: dead:unsettled). A count that stays above zero means
    no worker of that stage is running to do it."""
    counts = {}
    for key in r.scan_iter(match=UNSETTLED_PREFIX + "*", count=500):
        counts[key.removeprefix(UNSETTLED_PREFIX)] = int(r.llen(key))
    return {stage: n for stage, n in sorted(counts.items()) if n}


def _processing(r: redis.Redis) -> list[dict[str, Any]]:
    live = {w for w in r.smembers(WORKERS_KEY) if r.exists(heartbeat_key(w))}
    processing = []
    for key in sorted(r.scan_iter(match=PROCESSING_PREFIX + "*", count=500)):
        try:
            worker_id, source = parse_processing_key(key)
        except ValueError:
            continue
        alive = worker_id in live or bool(r.exists(heartbeat_key(worker_id)))
        processing.append(
            {"worker": worker_id, "source": source, "items": r.llen(key), "alive": alive}
        )
    return processing


def _delayed_retries(r: redis.Redis, now: float) -> list[dict[str, Any]]:
    delayed: dict[str, dict[str, Any]] = {}
    for member, due in r.zrange(DELAYED_KEY, 0, -1, withscores=True):
        try:
            queue = json.loads(member)["queue"]
        except (ValueError, KeyError, TypeError):
            queue = "(unreadable)"
        entry = delayed.setdefault(queue, {"queue": queue, "retries": 0, "next_due_s": None})
        entry["retries"] += 1
        wait = max(0.0, due - now)
        entry["next_due_s"] = (
            wait if entry["next_due_s"] is None else min(entry["next_due_s"], wait)
        )
    return sorted(delayed.values(), key=lambda d: d["queue"])


def _workers(r: redis.Redis, now: float) -> list[dict[str, Any]]:
    workers = []
    for worker_id in sorted(r.smembers(WORKERS_KEY)):
        info = r.hgetall(heartbeat_key(worker_id))
        beat_at = float(info["beat_at"]) if info.get("beat_at") else None
        workers.append(
            {
                "worker": worker_id,
                "stage": info.get("stage", worker_id.split(":", 1)[0]),
                "host": info.get("host"),
                "pid": info.get("pid"),
                "state": info.get("state") if info else "dead (awaiting reaper)",
                "heartbeat_age_s": None if beat_at is None else round(now - beat_at, 1),
                "job": info.get("job_raw") or None,
                # jobs claimed ahead and being prepared (gpu worker, PREFETCH)
                "look_ahead": int(info.get("look_ahead") or 0),
            }
        )
    return workers


# -- dead letters -------------------------------------------------------------------


def read_failed(r: redis.Redis) -> list[tuple[int, str, dict[str, Any] | None]]:
    """(index, raw entry, parsed entry or None if unreadable) for each dead letter."""
    out = []
    for index, raw in enumerate(r.lrange(QUEUE_FAILED, 0, -1)):
        try:
            entry = json.loads(raw)
            parsed = entry if isinstance(entry, dict) else None
        except json.JSONDecodeError:
            parsed = None
        out.append((index, raw, parsed))
    return out


def reset_attempts(job: str) -> str | None:
    """The job as it goes back to its queue: retry count cleared, enqueued now; None
    if unusable."""
    try:
        payload = json.loads(job)
    except (TypeError, json.JSONDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    payload.pop(ATTEMPTS_FIELD, None)
    return json.dumps(stamped(payload), separators=(",", ":"))


# (queue, job payload) -> what rows it put back in play ("" for none)
Reopen = Callable[[str, dict[str, Any]], str]


def requeue(
    r: redis.Redis,
    *,
    all_: bool = False,
    index: int | None = None,
    stage: str | None = None,
    reopen: Reopen | None = None,
) -> list[dict[str, Any]]:
    """Move selected dead letters back to their source queues; returns what happened.

    ``reopen`` puts each job's rows back in play (records/dead_letters.py) before the
    job is moved, so a worker that takes it at once never finds them finished.
    """
    entries = read_failed(r)
    if index is not None:
        if not 0 <= index < len(entries):
            raise RequeueError(f"no dead letter at index {index} ({len(entries)} in queue:failed)")
        selected = [entries[index]]
    elif stage is not None:
        selected = [e for e in entries if e[2] is not None and e[2].get("stage") == stage]
    elif all_:
        selected = entries
    else:
        raise RequeueError("say which: --all, --index N or --stage S")
    move = r.register_script(_REQUEUE_LUA)
    report = []
    for idx, raw, entry in selected:
        outcome: dict[str, Any] = {"index": idx, "stage": None, "queue": None}
        if entry is None or not isinstance(entry.get("queue"), str):
            outcome["result"] = "skipped: unreadable dead letter"
        else:
            outcome.update(stage=entry.get("stage"), queue=entry["queue"])
            job = reset_attempts(entry.get("job"))
            if job is None:
                outcome["result"] = "skipped: the job is not a JSON object (it would fail again)"
            else:
                if reopen is not None:
                    outcome["rows"] = reopen(entry["queue"], json.loads(job))
                if move(keys=[QUEUE_FAILED, entry["queue"]], args=[raw, job]):
                    outcome["result"] = "requeued"
                    outcome["job"] = job
                else:
                    outcome["result"] = "skipped: no longer in queue:failed"
        report.append(outcome)
    return report


def failed_count(r: redis.Redis) -> int:
    return int(r.llen(QUEUE_FAILED))


def purge_failed(r: redis.Redis, count: int) -> None:
    """Delete the oldest ``count`` dead letters: exactly those counted, so a failure
    arriving meanwhile is kept."""
    r.ltrim(QUEUE_FAILED, count, -1)
