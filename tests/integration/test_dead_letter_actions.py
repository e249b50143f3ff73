"""dead_letter_actions: the guards of a requeue or purge chosen from a list shown
earlier, on real Redis and PostgreSQL (the CLI's own behaviour is test_cli's)."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import yaml
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from audio_pipeline import dead_letter_actions, queue_admin
from audio_pipeline.config import (
    QUEUE_CLASSIFY,
    QUEUE_FAILED,
    QUEUE_TRANSCRIBE,
    QUEUE_UNPACK,
    Settings,
)
from devtools import devstack
from tests.support.operator_page import dead_letter
from tests.support.rows import (
    add_audio_file,
    add_batch,
    add_policy,
    add_reclassify_run,
    add_transcript,
)

REPO = Path(__file__).resolve().parents[2]

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


def test_the_operator_pages_own_role_reopens_every_kind_of_dead_letter_and_nothing_else(
    redis_client: redis.Redis, settings: Settings, db_conn: Any, stack: devstack.Stack
) -> None:
    """The fleet's RA app requeues as ra_operator, with SELECT and UPDATE on the tables
    the orchestrator role grants it (roles/orchestrator/defaults, read here): enough to
    reopen a failed batch, a failed file of a done batch and a failed re-classification
    file, and no more (it cannot touch a transcript)."""
    defaults = yaml.safe_load((REPO / "roles/orchestrator/defaults/main.yml").read_text())
    privileges: dict[str, str] = defaults["orchestrator_ra_operator_db_privileges"]
    add_batch(db_conn, "b-unpack", "failed", error="unpack broke")
    add_batch(db_conn, "b-gpu", "done", file_count=1, files_failed=1)
    audio_id = add_audio_file(
        db_conn, "b-gpu", "a.mp3", "failed", error="asr broke", opus_path="/o/a.opus"
    )
    add_transcript(db_conn, audio_id, "words")
    policy_id = add_policy(db_conn, "boats", lexicon=["canoe"])
    run_id = add_reclassify_run(
        db_conn, policy_id, "b-gpu", [audio_id], status="failed", error="classifier broke"
    )
    db_conn.commit()
    dead_letter(redis_client, "unpack", QUEUE_UNPACK, {"batch_id": "b-unpack", "s3_key": "k"})
    dead_letter(
        redis_client, "gpu", QUEUE_TRANSCRIBE, {"audio_id": audio_id, "opus_path": "/o/a.opus"}
    )
    classify = {"kind": "classify", "run_id": run_id, "audio_id": audio_id, "policy_id": policy_id}
    dead_letter(redis_client, "gpu", QUEUE_CLASSIFY, classify)

    role, password = f"ra_operator_t{os.getpid()}", secrets.token_urlsafe(12)
    info = conninfo_to_dict(settings.database_url)
    with devstack.admin_connect(stack, str(info["dbname"])) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        for table, privs in privileges.items():
            admin.execute(
                sql.SQL("GRANT {} ON {} TO {}").format(
                    sql.SQL(", ").join(sql.SQL(p.strip()) for p in privs.split(",")),
                    sql.Identifier(table),
                    sql.Identifier(role),
                )
            )
    try:
        url = make_conninfo(settings.database_url, user=role, password=password)
        report = dead_letter_actions.requeue(redis_client, url, all_=True)
        assert [o["result"] for o in report] == ["requeued"] * 3, report
        assert all(o["rows"] for o in report), report
        batches = {
            r["batch_id"]: r["status"]
            for r in db_conn.execute("SELECT batch_id, status FROM batches")
        }
        assert batches == {"b-unpack": "transferred", "b-gpu": "unpacked"}
        file = db_conn.execute("SELECT status FROM audio_files WHERE id = %s", (audio_id,))
        assert file.fetchone()["status"] == "converted"
        run_file = db_conn.execute("SELECT status FROM reclassify_files").fetchone()
        assert run_file["status"] == "queued"
        db_conn.commit()
        with (
            psycopg.connect(url) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            conn.execute("UPDATE transcripts SET text = 'forged'")
    finally:
        with devstack.admin_connect(stack, str(info["dbname"])) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
