"""The shared worker runtime, run as real subprocesses against the real Redis.

The echo worker (tests/support/workerkit/echo_worker.py) records each job it starts and
commits; these tests prove the delivery guarantees of the runtime: a job is
finished or handed back on SIGTERM, returned by the reaper after kill -9, retried
then dead-lettered, and never lost or done twice.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import redis

from audio_pipeline.config import QUEUE_FAILED
from audio_pipeline.queue import WORKERS_KEY, heartbeat_key, processing_key
from tests.support.workerkit.echo_worker import (
    BATCHES_KEY,
    DISCARDED_KEY,
    DONE_KEY,
    EVENTS_KEY,
    PREPARED_KEY,
    STARTED_KEY,
)
from tests.support.workerkit.procs import finish, start_module, wait_for

pytestmark = pytest.mark.integration

ECHO = "tests.support.workerkit.echo_worker"
Q = "queue:echo"


def push(r: redis.Redis, *jobs: dict) -> None:
    r.rpush(Q, *[json.dumps(j) for j in jobs])


def done(r: redis.Redis) -> list[str]:
    return r.lrange(DONE_KEY, 0, -1)


def processing_items(r: redis.Redis) -> list[str]:
    return [item for key in r.scan_iter("processing:*") for item in r.lrange(key, 0, -1)]


def test_drain_processes_everything_then_exits_zero(pipeline_env, redis_client):
    push(redis_client, *[{"id": f"j{n}"} for n in range(5)])
    code, out = finish(start_module(ECHO, pipeline_env, ["--drain"]))
    assert code == 0, out
    assert done(redis_client) == [f"j{n}" for n in range(5)]
    assert redis_client.llen(Q) == 0
    assert processing_items(redis_client) == []
    assert "event=job.done stage=echo" in out
    assert "event=worker.stopped" in out
    # a clean exit leaves no registration behind
    assert redis_client.smembers(WORKERS_KEY) == set()


def test_once_handles_one_claim_only(pipeline_env, redis_client):
    push(redis_client, {"id": "a"}, {"id": "b"})
    code, out = finish(start_module(ECHO, pipeline_env, ["--once"]))
    assert code == 0, out
    assert done(redis_client) == ["a"]
    assert redis_client.llen(Q) == 1


def test_once_with_nothing_queued_exits_zero(pipeline_env, redis_client):
    code, out = finish(start_module(ECHO, pipeline_env, ["--once"]))
    assert code == 0, out
    assert done(redis_client) == []


def test_batch_size_claims_several_jobs_per_call(pipeline_env, redis_client):
    push(redis_client, *[{"id": f"j{n}"} for n in range(5)])
    code, out = finish(
        start_module(ECHO, pipeline_env, ["--drain"], extra_env={"ECHO_BATCH_SIZE": "2"})
    )
    assert code == 0, out
    assert sorted(done(redis_client)) == [f"j{n}" for n in range(5)]
    assert [int(n) for n in redis_client.lrange(BATCHES_KEY, 0, -1)] == [2, 2, 1]


def test_transient_failures_are_retried_then_succeed(pipeline_env, redis_client):
    push(redis_client, {"id": "flaky", "fail": "transient", "fail_times": 2})
    code, out = finish(start_module(ECHO, pipeline_env, ["--drain"]))
    assert code == 0, out
    assert done(redis_client) == ["flaky"]
    assert redis_client.lrange(STARTED_KEY, 0, -1) == ["flaky"] * 3
    assert out.count("event=job.retry") == 2
    assert redis_client.llen(QUEUE_FAILED) == 0


def test_failures_past_max_attempts_are_dead_lettered(pipeline_env, redis_client):
    push(redis_client, {"id": "doomed", "fail": "transient", "fail_times": 99}, {"id": "fine"})
    code, out = finish(start_module(ECHO, pipeline_env, ["--drain"]))
    assert code == 0, out
    assert done(redis_client) == ["fine"]
    [entry] = [json.loads(x) for x in redis_client.lrange(QUEUE_FAILED, 0, -1)]
    assert entry["queue"] == Q
    assert entry["stage"] == "echo"
    assert entry["worker"].startswith("echo:testhost:")
    assert entry["attempts"] == 3  # QUEUE_MAX_ATTEMPTS in the fast test env
    assert "transient failure 3 of job doomed" in entry["error"]
    assert json.loads(entry["job"])["id"] == "doomed"


def test_bad_input_goes_straight_to_failed_and_the_worker_keeps_serving(pipeline_env, redis_client):
    redis_client.rpush(Q, "{oops")
    push(redis_client, {"no_id": 1}, {"id": "bad", "fail": "permanent"}, {"id": "good"})
    code, out = finish(start_module(ECHO, pipeline_env, ["--drain"]))
    assert code == 0, out
    assert done(redis_client) == ["good"]
    entries = [json.loads(x) for x in redis_client.lrange(QUEUE_FAILED, 0, -1)]
    errors = [e["error"] for e in entries]
    assert len(entries) == 3
    assert "malformed JSON" in errors[0]
    assert "missing key 'id'" in errors[1]
    assert "asked to fail permanently" in errors[2]
    assert all(e["attempts"] <= 1 for e in entries)  # never retried


def test_first_sigterm_finishes_the_job_in_hand_and_exits_zero(pipeline_env, redis_client):
    push(redis_client, {"id": "long", "sleep": 2.0}, {"id": "next"})
    proc = start_module(ECHO, pipeline_env)
    wait_for(lambda: redis_client.llen(STARTED_KEY) == 1, what="job start")
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 0, out
    assert done(redis_client) == ["long"]  # finished, and no new claim after the signal
    assert [json.loads(x)["id"] for x in redis_client.lrange(Q, 0, -1)] == ["next"]
    assert processing_items(redis_client) == []
    assert "event=worker.stop_requested" in out


def test_second_sigterm_hands_the_job_back_and_exits_zero(pipeline_env, redis_client):
    push(redis_client, {"id": "long", "sleep": 30}, {"id": "next"})
    proc = start_module(ECHO, pipeline_env)
    wait_for(lambda: redis_client.llen(STARTED_KEY) == 1, what="job start")
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: redis_client.hget(_hb(redis_client), "state") == "stopping", 5, "stopping")
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, timeout=10)
    assert code == 0, out
    assert done(redis_client) == []
    # handed back to the head of its queue, ahead of the job behind it
    assert [json.loads(x)["id"] for x in redis_client.lrange(Q, 0, -1)] == ["long", "next"]
    assert processing_items(redis_client) == []
    assert "event=worker.stop_forced" in out
    assert "event=job.released" in out


def _hb(r: redis.Redis) -> str:
    members = list(r.smembers(WORKERS_KEY))
    return heartbeat_key(members[0]) if members else "none"


def test_idle_worker_stops_promptly_on_sigterm(pipeline_env, redis_client):
    proc = start_module(ECHO, pipeline_env)
    wait_for(lambda: redis_client.scard(WORKERS_KEY) == 1, what="registration")
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, timeout=5)
    assert code == 0, out


def test_kill_9_mid_job_then_a_new_worker_reaps_and_finishes_it(
    pipeline_env, redis_client, tmp_path: Path
):
    push(redis_client, {"id": "victim", "sleep": 2.0}, {"id": "bystander"})
    first = start_module(ECHO, pipeline_env, log_path=tmp_path / "first.log")
    wait_for(lambda: redis_client.llen(STARTED_KEY) == 1, what="job start")
    [worker_id] = redis_client.smembers(WORKERS_KEY)
    first.kill()
    first.wait(timeout=10)
    assert len(redis_client.lrange(processing_key(worker_id, Q), 0, -1)) == 1
    # heartbeat TTL is 1.5 s in the fast env: wait until the dead worker looks dead
    wait_for(lambda: not redis_client.exists(heartbeat_key(worker_id)), 5, "heartbeat expiry")
    second = start_module(ECHO, pipeline_env, ["--drain"])
    code, out = finish(second)
    assert code == 0, out
    assert "event=reaper.returned" in out
    assert sorted(done(redis_client)) == ["bystander", "victim"]  # nothing lost, none twice
    assert redis_client.llen(Q) == 0
    assert processing_items(redis_client) == []
    assert worker_id not in redis_client.smembers(WORKERS_KEY)


def test_a_live_worker_reaps_a_peer_that_died(pipeline_env, redis_client, tmp_path: Path):
    """The periodic reaper (not only the one at start) recovers a dead peer's job."""
    push(redis_client, {"id": "victim", "sleep": 30})
    doomed = start_module(ECHO, pipeline_env, log_path=tmp_path / "doomed.log")
    wait_for(lambda: redis_client.llen(STARTED_KEY) == 1, what="job start")
    survivor = start_module(ECHO, pipeline_env, log_path=tmp_path / "survivor.log")
    wait_for(lambda: redis_client.scard(WORKERS_KEY) == 2, what="second registration")
    doomed.kill()
    doomed.wait(timeout=10)
    # The survivor needs no restart: its side thread reaps once the TTL lapses. The
    # job (30 s) then starts again on the survivor; stop it with two TERMs.
    wait_for(lambda: redis_client.llen(STARTED_KEY) == 2, 15, "job restarted by the survivor")
    survivor.send_signal(signal.SIGTERM)
    # two signals sent at once may coalesce into one: wait for the first to land
    wait_for(lambda: redis_client.hget(_hb(redis_client), "state") == "stopping", 5, "stopping")
    survivor.send_signal(signal.SIGTERM)
    code, _ = finish(survivor, timeout=10)
    assert code == 0
    assert [json.loads(x)["id"] for x in redis_client.lrange(Q, 0, -1)] == ["victim"]
    assert processing_items(redis_client) == []


def test_two_worker_processes_never_share_a_job(pipeline_env, redis_client):
    push(redis_client, *[{"id": f"j{n:03d}", "sleep": 0.01} for n in range(60)])
    procs = [start_module(ECHO, pipeline_env, ["--drain"]) for _ in range(3)]
    for proc in procs:
        code, out = finish(proc, timeout=60)
        assert code == 0, out
    assert sorted(done(redis_client)) == [f"j{n:03d}" for n in range(60)]
    assert sorted(redis_client.lrange(STARTED_KEY, 0, -1)) == [f"j{n:03d}" for n in range(60)]


# -- look-ahead: the next claim is prepared while this one is processed ----------------

LOOK_AHEAD = {"ECHO_LOOK_AHEAD": "1"}


def queued_ids(r: redis.Redis) -> list[str]:
    return [json.loads(x)["id"] for x in r.lrange(Q, 0, -1)]


def test_look_ahead_prepares_the_next_claim_while_this_one_runs(pipeline_env, redis_client):
    push(
        redis_client,
        {"id": "a", "await_prepared": "b"},
        {"id": "b", "await_prepared": "c"},
        {"id": "c"},
    )
    code, out = finish(start_module(ECHO, pipeline_env, ["--drain"], extra_env=LOOK_AHEAD))
    assert code == 0, out
    assert done(redis_client) == ["a", "b", "c"]
    events = redis_client.lrange(EVENTS_KEY, 0, -1)
    # b was prepared while a was still being processed, c while b was: each job waits
    # for the next one's preparation, which only a look-ahead can do before it is done
    assert events.index("prepared:b") < events.index("done:a")
    assert events.index("prepared:c") < events.index("done:b")
    assert redis_client.lrange(PREPARED_KEY, 0, -1) == ["a", "b", "c"]  # each once
    assert processing_items(redis_client) == []


def test_first_sigterm_waits_for_the_look_ahead_then_hands_it_back_in_order(
    pipeline_env, redis_client
):
    push(
        redis_client,
        {"id": "a", "sleep": 1.0},
        {"id": "b"},
        {"id": "c", "prepare_sleep": 2.0},
        {"id": "d"},
        {"id": "e"},
    )
    proc = start_module(ECHO, pipeline_env, extra_env={**LOOK_AHEAD, "ECHO_BATCH_SIZE": "2"})
    wait_for(lambda: redis_client.llen(STARTED_KEY) == 1, what="job start")
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 0, out
    assert done(redis_client) == ["a", "b"]  # the claim in hand is finished
    # the look-ahead claim was prepared to the end, discarded, and put back in order
    assert redis_client.lrange(PREPARED_KEY, 0, -1) == ["a", "b", "c", "d"]
    assert redis_client.lrange(DISCARDED_KEY, 0, -1) == ["c", "d"]
    assert queued_ids(redis_client) == ["c", "d", "e"]
    assert processing_items(redis_client) == []
    assert out.count("event=job.released") == 2


def test_second_sigterm_hands_back_both_claims_in_order(pipeline_env, redis_client):
    push(redis_client, {"id": "a", "sleep": 30}, *[{"id": i} for i in "bcde"])
    proc = start_module(ECHO, pipeline_env, extra_env={**LOOK_AHEAD, "ECHO_BATCH_SIZE": "2"})
    wait_for(lambda: redis_client.llen(PREPARED_KEY) == 4, what="look-ahead prepared")
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: redis_client.hget(_hb(redis_client), "state") == "stopping", 5, "stopping")
    assert redis_client.hget(_hb(redis_client), "look_ahead") == "2"
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, timeout=10)
    assert code == 0, out
    assert done(redis_client) == []
    assert queued_ids(redis_client) == ["a", "b", "c", "d", "e"]
    assert processing_items(redis_client) == []


def test_a_failed_look_ahead_preparation_is_retried_like_any_failure(pipeline_env, redis_client):
    push(redis_client, {"id": "a", "sleep": 0.5}, {"id": "b", "prepare_fail_times": 1})
    code, out = finish(start_module(ECHO, pipeline_env, ["--drain"], extra_env=LOOK_AHEAD))
    assert code == 0, out
    assert done(redis_client) == ["a", "b"]
    assert "prepare failure 1 of job b" in out
    assert redis_client.llen(QUEUE_FAILED) == 0


def test_once_never_claims_ahead(pipeline_env, redis_client):
    push(redis_client, {"id": "a"}, {"id": "b"})
    code, out = finish(start_module(ECHO, pipeline_env, ["--once"], extra_env=LOOK_AHEAD))
    assert code == 0, out
    assert done(redis_client) == ["a"]
    assert redis_client.lrange(PREPARED_KEY, 0, -1) == ["a"]
    assert queued_ids(redis_client) == ["b"]


def test_kill_9_with_a_look_ahead_loses_nothing(pipeline_env, redis_client, tmp_path: Path):
    push(redis_client, {"id": "a", "sleep": 2.0}, {"id": "b"}, {"id": "c"})
    first = start_module(ECHO, pipeline_env, extra_env=LOOK_AHEAD, log_path=tmp_path / "first.log")
    wait_for(lambda: redis_client.llen(PREPARED_KEY) == 2, what="look-ahead prepared")
    [worker_id] = redis_client.smembers(WORKERS_KEY)
    first.kill()
    first.wait(timeout=10)
    # the claim in hand and the look-ahead both wait in the dead worker's processing list
    held = [json.loads(x)["id"] for x in redis_client.lrange(processing_key(worker_id, Q), 0, -1)]
    assert held == ["a", "b"]
    wait_for(lambda: not redis_client.exists(heartbeat_key(worker_id)), 5, "heartbeat expiry")
    code, out = finish(start_module(ECHO, pipeline_env, ["--drain"], extra_env=LOOK_AHEAD))
    assert code == 0, out
    assert sorted(done(redis_client)) == ["a", "b", "c"]  # nothing lost, none twice
    assert processing_items(redis_client) == []
