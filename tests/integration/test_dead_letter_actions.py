"""dead_letter_actions: the guards of a requeue or purge chosen from a list shown
earlier, on real Redis and PostgreSQL (the CLI's own behaviour is test_cli's)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from audio_pipeline import dead_letter_actions, queue_admin
from audio_pipeline.config import QUEUE_FAILED, QUEUE_UNPACK, Settings
from tests.support.operator_page import dead_letter

pytestmark = pytest.mark.integration


def _batches_in_failed(r: redis.Redis) -> list[str]:
    return [json.loads(json.loads(raw)["job"])["batch_id"] for raw in r.lrange(QUEUE_FAILED, 0, -1)]


def test_requeue_with_the_fingerprint_seen_moves_that_entry(
    redis_client: redis.Redis, settings: Settings
) -> None:
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "a"})
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "b"})
    raw = redis_client.lindex(QUEUE_FAILED, 1)
    report = dead_letter_actions.requeue(
        redis_client, settings.database_url, index=1, expect=dead_letter_actions.fingerprint(raw)
    )
    assert [o["result"] for o in report] == ["requeued"]
    assert _batches_in_failed(redis_client) == ["a"]
    assert json.loads(redis_client.lindex(QUEUE_UNPACK, 0))["batch_id"] == "b"


def test_a_change_between_the_check_and_the_move_is_refused(
    redis_client: redis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fingerprint matches when checked, but another operator requeues the first
    entry before queue_admin.requeue reads the list: the entry it would move is then
    another one, and the reopen hook refuses it before anything moves."""
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "a"})
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "b"})
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "c"})
    seen = dead_letter_actions.fingerprint(redis_client.lindex(QUEUE_FAILED, 1))
    real_read = queue_admin.read_failed
    reads = 0

    def read_while_another_operator_acts(r: redis.Redis) -> Any:
        nonlocal reads
        reads += 1
        if reads == 2:  # queue_admin.requeue's own read: "a" has just left the list
            redis_client.lpop(QUEUE_FAILED)
        return real_read(r)

    monkeypatch.setattr(queue_admin, "read_failed", read_while_another_operator_acts)
    with pytest.raises(dead_letter_actions.StaleSelectionError):
        dead_letter_actions.requeue(redis_client, settings.database_url, index=1, expect=seen)
    assert reads == 2
    assert _batches_in_failed(redis_client) == ["b", "c"]  # "c", now at index 1, stayed
    assert redis_client.llen(QUEUE_UNPACK) == 0


def test_purge_seen_keeps_what_arrived_and_refuses_what_changed(
    redis_client: redis.Redis,
) -> None:
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "a"})
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "b"})
    seen = dead_letter_actions.seen_failed(redis_client)
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "c"})
    assert dead_letter_actions.purge_seen(redis_client, seen) == 2
    assert _batches_in_failed(redis_client) == ["c"]

    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "d"})
    seen = dead_letter_actions.seen_failed(redis_client)
    redis_client.lpop(QUEUE_FAILED)  # "c" requeued by someone else meanwhile
    with pytest.raises(dead_letter_actions.StaleSelectionError):
        dead_letter_actions.purge_seen(redis_client, seen)
    assert _batches_in_failed(redis_client) == ["d"]


def test_requeue_without_postgresql_moves_nothing(redis_client: redis.Redis) -> None:
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "a"})
    unreachable = "postgresql://pipeline:x@127.0.0.1:9/none"
    with pytest.raises(dead_letter_actions.DeadLetterActionError, match="PostgreSQL unavailable"):
        dead_letter_actions.requeue(redis_client, unreachable, all_=True)
    assert redis_client.llen(QUEUE_FAILED) == 1
