"""A claim that fails as a whole is run again in parts, so a bad file costs only itself.

Real echo worker processes (tests/support/workerkit/echo_worker.py) against the real
Redis, with claims of 8: a "poison" job makes its whole claim raise (at prepare or at
process); an "oom_above" job makes a claim too large raise a CUDA out-of-memory error.
The good jobs must be done once each, on their first attempt; only the poison job is
retried, then dead-lettered with its own error; a claim that ran out of memory is
halved until it fits, and the next claims stay that small for a while. A forced stop,
a kill -9 and a Redis outage (a private Redis of this module's own) in the middle of
an isolation lose nothing and spend no attempt of the good jobs but the kill's.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from audio_pipeline.config import QUEUE_FAILED
from audio_pipeline.queue import DELAYED_KEY, WORKERS_KEY, heartbeat_key, processing_key
from devtools import devstack
from tests.support.private_stack import (
    backend_env,
    running_private_stack,
    stop_redis,
)
from tests.support.private_stack import (
    redis_client as private_redis,
)
from tests.support.workerkit.echo_worker import (
    BATCHES_KEY,
    DONE_ATTEMPT_KEY,
    DONE_KEY,
    OOM_MESSAGE,
    PREPARED_KEY,
    STARTED_KEY,
)
from tests.support.workerkit.procs import FAST_ENV, finish, start_module, wait_for

pytestmark = pytest.mark.integration

ECHO = "tests.support.workerkit.echo_worker"
Q = "queue:echo"
CLAIMS_OF_8 = {"ECHO_BATCH_SIZE": "8"}
MAX_ATTEMPTS = int(FAST_ENV["QUEUE_MAX_ATTEMPTS"])


def push(r: redis.Redis, *jobs: dict) -> None:
    r.rpush(Q, *[json.dumps(j) for j in jobs])


def drain(env: dict[str, str], extra_env: dict[str, str]) -> str:
    code, out = finish(start_module(ECHO, env, ["--drain"], extra_env=extra_env), timeout=60)
    assert code == 0, out
    return out


def claim_sizes(r: redis.Redis) -> list[int]:
    return [int(n) for n in r.lrange(BATCHES_KEY, 0, -1)]


def failed_entries(r: redis.Redis) -> list[dict]:
    return [json.loads(x) for x in r.lrange(QUEUE_FAILED, 0, -1)]


def queued(r: redis.Redis) -> list[dict]:
    return [json.loads(x) for x in r.lrange(Q, 0, -1)]


def processing_items(r: redis.Redis) -> list[str]:
    return [item for key in r.scan_iter("processing:*") for item in r.lrange(key, 0, -1)]


def lines(out: str, event: str) -> list[str]:
    return [line for line in out.splitlines() if f"event={event} " in line]


def assert_done_once_on_first_attempt(r: redis.Redis, ids: list[str]) -> None:
    done = r.lrange(DONE_KEY, 0, -1)
    assert sorted(done) == sorted(ids), "each good job done exactly once"
    assert r.hgetall(DONE_ATTEMPT_KEY) == {i: "1" for i in ids}, "no attempt spent on them"


def assert_poison_dead_lettered(r: redis.Redis, poison_id: str, where: str) -> None:
    [entry] = failed_entries(r)
    assert json.loads(entry["job"])["id"] == poison_id
    assert entry["attempts"] == MAX_ATTEMPTS
    assert f"poison job {poison_id} sinks its claim at {where}" in entry["error"]
    assert f"gave up after {MAX_ATTEMPTS} attempts" in entry["error"]


def assert_nothing_left(r: redis.Redis) -> None:
    assert r.llen(Q) == 0
    assert r.zcard(DELAYED_KEY) == 0
    assert processing_items(r) == []


def test_one_poison_job_among_eight_costs_only_itself(pipeline_env, redis_client):
    jobs = [{"id": f"j{n}"} for n in range(8)]
    jobs[3] = {"id": "poison", "poison": "process"}
    push(redis_client, *jobs)

    out = drain(pipeline_env, CLAIMS_OF_8)

    good = [j["id"] for j in jobs if j["id"] != "poison"]
    assert_done_once_on_first_attempt(redis_client, good)
    assert_poison_dead_lettered(redis_client, "poison", "process")
    # One claim of 8, then each job alone, then the poison job's own retries, alone.
    assert claim_sizes(redis_client) == [8] + [1] * 8 + [1] * (MAX_ATTEMPTS - 1)
    [isolated] = lines(out, "worker.claim_isolated")
    assert "claim_size=8" in isolated
    assert "poison job poison sinks its claim at process" in isolated
    assert len(lines(out, "job.retry")) == MAX_ATTEMPTS - 1  # the poison job's, no other
    assert not lines(out, "worker.claim_halved")
    assert_nothing_left(redis_client)


def test_a_poisoned_look_ahead_preparation_costs_only_its_job(pipeline_env, redis_client):
    """The second claim is prepared ahead, in the side thread, and raises there."""
    first = [{"id": f"a{n}", "sleep": 0.3} for n in range(8)]
    second = [{"id": f"b{n}"} for n in range(8)]
    second[5] = {"id": "poison", "poison": "prepare"}
    push(redis_client, *first, *second)

    out = drain(pipeline_env, {**CLAIMS_OF_8, "ECHO_LOOK_AHEAD": "1"})

    good = [j["id"] for j in first + second if j["id"] != "poison"]
    assert_done_once_on_first_attempt(redis_client, good)
    assert_poison_dead_lettered(redis_client, "poison", "prepare")
    prepared = redis_client.lrange(PREPARED_KEY, 0, -1)
    # the first claim prepared as a whole; the second's good jobs each alone, once
    assert sorted(prepared) == sorted(good)
    assert claim_sizes(redis_client) == [8] + [1] * 7  # the poison one never got that far
    assert len(lines(out, "worker.claim_isolated")) == 1
    assert_nothing_left(redis_client)


def test_an_out_of_memory_claim_is_halved_until_it_fits(pipeline_env, redis_client):
    big = [{"id": f"m{n}", "oom_above": 2} for n in range(8)]
    after = [{"id": f"n{n}"} for n in range(4)]
    push(redis_client, *big, *after)

    out = drain(pipeline_env, CLAIMS_OF_8)

    assert_done_once_on_first_attempt(redis_client, [j["id"] for j in big + after])
    # 8 ran out of memory: 4 did too, so 2 + 2; the other 4 the same. The jobs after
    # them are claimed 2 at a time: the size that fitted holds for a while.
    assert claim_sizes(redis_client) == [8, 4, 2, 2, 4, 2, 2, 2, 2]
    halved = lines(out, "worker.claim_halved")
    assert len(halved) == 3
    assert "claim_size=8 new_size=4" in halved[0]
    assert OOM_MESSAGE in halved[0]
    assert all("claim_size=4 new_size=2" in line for line in halved[1:])
    lowered = lines(out, "worker.claim_size_lowered")
    assert [line.split("claim_size=")[1].split()[0] for line in lowered] == ["4", "2"]
    assert "configured=8" in lowered[0]
    assert not lines(out, "job.retry")
    assert not lines(out, "worker.claim_size_restored")
    assert failed_entries(redis_client) == []
    assert_nothing_left(redis_client)


def test_a_lowered_claim_size_is_restored_after_its_hold(pipeline_env, redis_client):
    push(
        redis_client,
        *[{"id": f"m{n}", "oom_above": 2} for n in range(4)],
        {"id": "slow", "sleep": 6.0},  # outlasts the hold by far
        {"id": "s1"},
        *[{"id": f"n{n}"} for n in range(6)],
    )

    out = drain(pipeline_env, {"ECHO_BATCH_SIZE": "4", "ECHO_CLAIM_SIZE_HOLD_S": "3"})

    # 4 ran out of memory, 2 + 2 fitted; the next claim takes 2 (the slow job and the
    # one behind it); the hold is over by then, so the claims after it take 4 again.
    assert claim_sizes(redis_client) == [4, 2, 2, 2, 4, 2]
    [restored] = lines(out, "worker.claim_size_restored")
    assert "claim_size=4" in restored
    assert len(redis_client.lrange(DONE_KEY, 0, -1)) == 12


def test_an_out_of_memory_of_one_job_is_an_ordinary_retry(pipeline_env, redis_client):
    push(redis_client, {"id": "huge", "oom_above": 0})

    out = drain(pipeline_env, CLAIMS_OF_8)

    [entry] = failed_entries(redis_client)
    assert OOM_MESSAGE in entry["error"]
    assert entry["attempts"] == MAX_ATTEMPTS
    assert len(lines(out, "job.retry")) == MAX_ATTEMPTS - 1
    assert not lines(out, "worker.claim_halved")


def _state(r: redis.Redis) -> str | None:
    members = list(r.smembers(WORKERS_KEY))
    return r.hget(heartbeat_key(members[0]), "state") if members else None


def test_a_first_stop_mid_isolation_lets_the_claim_finish(pipeline_env, redis_client):
    push(
        redis_client,
        {"id": "poison", "poison": "process"},
        {"id": "long", "sleep": 1.0},
        {"id": "c"},
        {"id": "behind"},  # not in the claim of 3: never claimed after the stop
    )
    proc = start_module(ECHO, pipeline_env, extra_env={"ECHO_BATCH_SIZE": "3"})
    wait_for(lambda: redis_client.lrange(STARTED_KEY, 0, -1) == ["long"], what="isolation")
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, timeout=20)
    assert code == 0, out

    assert_done_once_on_first_attempt(redis_client, ["long", "c"])
    assert [j["id"] for j in queued(redis_client)] == ["behind"]
    assert redis_client.zcard(DELAYED_KEY) == 1  # the poison job's own retry
    assert processing_items(redis_client) == []


def test_a_forced_stop_mid_isolation_hands_back_the_unsettled_jobs_unspent(
    pipeline_env, redis_client
):
    push(
        redis_client,
        {"id": "poison", "poison": "process"},
        {"id": "long", "sleep": 30},
        {"id": "c"},
        {"id": "d"},
        {"id": "behind"},  # not in the claim of 4
    )
    proc = start_module(ECHO, pipeline_env, extra_env={"ECHO_BATCH_SIZE": "4"})
    wait_for(lambda: redis_client.lrange(STARTED_KEY, 0, -1) == ["long"], what="isolation")
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: _state(redis_client) == "stopping", 5, "stopping")
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, timeout=10)
    assert code == 0, out

    assert redis_client.lrange(DONE_KEY, 0, -1) == []
    # handed back to the head, in claim order, ahead of the job behind them, untried
    back = queued(redis_client)
    assert [j["id"] for j in back] == ["long", "c", "d", "behind"]
    assert not any("_attempts" in j for j in back)
    assert len(lines(out, "job.released")) == 3
    # the poison job, settled before the stop, waits for its own retry
    [(retry, due)] = redis_client.zrange(DELAYED_KEY, 0, -1, withscores=True)
    retried = json.loads(json.loads(retry)["raw"])
    assert retried.pop("_enqueued_at") == pytest.approx(due, abs=0.01)  # waits from when due
    assert retried == {"id": "poison", "poison": "process", "_attempts": 1}
    assert processing_items(redis_client) == []


@pytest.fixture(scope="module")
def private_stack() -> Iterator[devstack.Stack]:
    """A Redis (and PostgreSQL) of this module's own: the test stops its Redis."""
    with running_private_stack("poison-stack-") as stack:
        yield stack


def test_a_redis_outage_mid_isolation_costs_no_attempt(
    private_stack: devstack.Stack, pipeline_env, tmp_path: Path
):
    st = private_stack
    r = private_redis(st)
    r.flushall()
    env = {**pipeline_env, **backend_env(st), "REDIS_DB": "0"}
    push(
        r,
        {"id": "poison", "poison": "process"},
        {"id": "long", "sleep": 3.0},  # ends while Redis is away: its result write fails
        {"id": "c"},
        {"id": "d"},
    )
    log = tmp_path / "echo.log"
    proc = start_module(ECHO, env, ["--drain"], extra_env={"ECHO_BATCH_SIZE": "4"}, log_path=log)
    try:
        wait_for(lambda: r.lrange(STARTED_KEY, 0, -1) == ["long"], what="isolation")
        stop_redis(st)
        time.sleep(5.0)
        assert proc.poll() is None, "the worker exited during the outage"
        devstack.start_redis(st)
        code, _ = finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert code == 0, out

    # "long" was handed back unspent and done later, on its first attempt
    assert_done_once_on_first_attempt(r, ["long", "c", "d"])
    assert r.lrange(STARTED_KEY, 0, -1).count("long") == 2
    assert lines(out, "redis.unavailable")
    assert lines(out, "redis.recovered")
    assert lines(out, "job.released")  # "long", back to the head of its queue, untried
    assert_poison_dead_lettered(r, "poison", "process")
    assert_nothing_left(r)


def test_kill_9_mid_isolation_loses_nothing(pipeline_env, redis_client, tmp_path: Path):
    push(
        redis_client,
        {"id": "poison", "poison": "process"},
        {"id": "long", "sleep": 2.0},
        {"id": "c"},
        {"id": "d"},
    )
    env = {"ECHO_BATCH_SIZE": "4"}
    first = start_module(ECHO, pipeline_env, extra_env=env, log_path=tmp_path / "first.log")
    wait_for(lambda: redis_client.lrange(STARTED_KEY, 0, -1) == ["long"], what="isolation")
    [worker_id] = redis_client.smembers(WORKERS_KEY)
    first.kill()
    first.wait(timeout=10)
    # the unsettled rest of the claim waits in the dead worker's processing list
    held = [json.loads(x)["id"] for x in redis_client.lrange(processing_key(worker_id, Q), 0, -1)]
    assert held == ["long", "c", "d"]
    wait_for(lambda: not redis_client.exists(heartbeat_key(worker_id)), 5, "heartbeat expiry")

    out = drain(pipeline_env, env)

    assert "event=reaper.returned" in out
    assert sorted(redis_client.lrange(DONE_KEY, 0, -1)) == ["c", "d", "long"]
    assert_poison_dead_lettered(redis_client, "poison", "process")
    assert_nothing_left(redis_client)
