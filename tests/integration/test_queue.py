"""JobQueue against the real Redis of the local stack."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from audio_pipeline.config import QUEUE_FAILED, QUEUE_TRANSCRIBE
from audio_pipeline.queue import (
    DELAYED_KEY,
    WORKERS_KEY,
    JobQueue,
    RetryPolicy,
    heartbeat_key,
    processing_key,
    reap_dead_workers,
)
from audio_pipeline.redis_conn import get_redis

pytestmark = pytest.mark.integration

Q = "queue:qtest"
FAST = RetryPolicy(max_attempts=3, base_s=0.05, cap_s=0.2)


def make_queue(redis_client: redis.Redis, worker_id: str = "qtest:h:1") -> JobQueue:
    return JobQueue(redis_client, worker_id, "qtest", retry_policy=FAST)


def failed_entries(redis_client: redis.Redis) -> list[dict]:
    return [json.loads(x) for x in redis_client.lrange(QUEUE_FAILED, 0, -1)]


def test_enqueue_claim_ack_is_fifo_and_leaves_nothing(redis_client):
    q = make_queue(redis_client)
    q.enqueue(Q, {"n": 1})
    q.enqueue(Q, {"n": 2})
    job = q.claim([Q], timeout=0)
    assert job is not None
    assert (job.queue, job.payload, job.attempts) == (Q, {"n": 1}, 0)
    assert redis_client.lrange(processing_key("qtest:h:1", Q), 0, -1) == [job.raw]
    q.ack(job)
    assert redis_client.llen(processing_key("qtest:h:1", Q)) == 0
    assert q.claim([Q], timeout=0).payload == {"n": 2}


def test_a_job_carries_its_enqueue_time_to_the_claim_and_a_retry_restarts_it(redis_client):
    """The stamp travels beside the payload (stages never see it); a job pushed by
    hand has none; a retry's wait starts when it falls due, a requeue's when requeued."""
    q = make_queue(redis_client)
    before = time.time()
    q.enqueue(Q, {"n": 1})
    redis_client.rpush(Q, json.dumps({"n": "by hand"}))
    job = q.claim([Q], timeout=0)
    assert job.payload == {"n": 1}
    assert before - 0.01 <= job.enqueued_at <= time.time()
    assert 0 <= job.queue_wait_s() < 5
    assert job.queue_wait_s(now=job.enqueued_at - 3) == 0  # another host's clock, behind
    hand = q.claim([Q], timeout=0)
    assert (hand.payload, hand.enqueued_at, hand.queue_wait_s()) == ({"n": "by hand"}, None, None)
    q.ack(hand)
    failed_at = time.time()
    assert q.retry(job, "transient")
    due = redis_client.zrange(DELAYED_KEY, 0, -1, withscores=True)[0][1]
    wait_for_due = max(0.0, due - time.time()) + 0.05
    time.sleep(wait_for_due)
    again = q.claim([Q], timeout=1)
    assert (again.payload, again.attempts) == ({"n": 1}, 1)
    assert again.enqueued_at == pytest.approx(due, abs=0.01)
    assert again.enqueued_at >= failed_at


def test_operator_lpush_jumps_the_line(redis_client):
    q = make_queue(redis_client)
    q.enqueue(Q, {"n": 1})
    redis_client.lpush(Q, json.dumps({"n": "urgent"}))
    assert q.claim([Q], timeout=0).payload == {"n": "urgent"}


def test_claim_tries_queues_in_priority_order(redis_client):
    q = make_queue(redis_client)
    q.enqueue("queue:low", {"n": "low"})
    q.enqueue("queue:high", {"n": "high"})
    jobs = q.claim_many(["queue:high", "queue:low"], max_jobs=5, timeout=0)
    assert [j.payload["n"] for j in jobs] == ["high", "low"]
    assert [j.queue for j in jobs] == ["queue:high", "queue:low"]


def test_claim_blocks_until_a_job_arrives(redis_client):
    q = make_queue(redis_client)
    timer = threading.Timer(0.3, lambda: redis_client.rpush(Q, '{"late": true}'))
    timer.start()
    started = time.monotonic()
    job = q.claim([Q], timeout=5)
    assert job is not None
    assert job.payload == {"late": True}
    assert time.monotonic() - started < 2.0


def test_claim_times_out_empty(redis_client):
    started = time.monotonic()
    assert make_queue(redis_client).claim([Q], timeout=0.3) is None
    assert 0.25 <= time.monotonic() - started < 2.0


def test_claim_many_waits_for_first_then_takes_what_is_ready(redis_client):
    q = make_queue(redis_client)
    for n in range(5):
        q.enqueue(Q, {"n": n})
    jobs = q.claim_many([Q], max_jobs=3, timeout=1)
    assert [j.payload["n"] for j in jobs] == [0, 1, 2]
    assert redis_client.llen(Q) == 2
    assert q.claim_many(["queue:empty"], max_jobs=3, timeout=0) == []


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "JSON object is required, got list"),
        ('"text"', "got str"),
    ],
)
def test_malformed_items_go_straight_to_failed_and_claim_goes_on(redis_client, raw, reason):
    q = make_queue(redis_client)
    redis_client.rpush(Q, raw)
    q.enqueue(Q, {"ok": True})
    job = q.claim([Q], timeout=0)
    assert job is not None
    assert job.payload == {"ok": True}
    [entry] = failed_entries(redis_client)
    assert entry["job"] == raw
    assert reason in entry["error"]
    assert (entry["queue"], entry["stage"], entry["worker"]) == (Q, "qtest", "qtest:h:1")
    assert entry["attempts"] == 0
    assert entry["failed_at"]
    assert redis_client.llen(processing_key("qtest:h:1", Q)) == 1  # only the good job


def test_retry_backs_off_then_dead_letters_after_max_attempts(redis_client):
    q = make_queue(redis_client)
    q.enqueue(Q, {"n": 7})
    seen_attempts = []
    for _ in range(FAST.max_attempts):
        job = q.claim([Q], timeout=2)
        assert job is not None, "the retry was never promoted"
        assert job.payload == {"n": 7}  # the attempt counter is not part of the payload
        seen_attempts.append(job.attempts)
        q.retry(job, RuntimeError("boom"))
    assert seen_attempts == [0, 1, 2]
    assert redis_client.zcard(DELAYED_KEY) == 0
    [entry] = failed_entries(redis_client)
    assert entry["attempts"] == 3
    assert "RuntimeError: boom" in entry["error"]
    assert "gave up after 3 attempts" in entry["error"]
    assert json.loads(entry["job"])["n"] == 7
    assert redis_client.llen(processing_key("qtest:h:1", Q)) == 0


def test_retry_waits_in_delayed_set_until_due(redis_client):
    q = JobQueue(redis_client, "qtest:h:1", "qtest", retry_policy=RetryPolicy(3, 30, 60))
    q.enqueue(Q, {"n": 1})
    q.retry(q.claim([Q], timeout=0), "flaky")
    assert redis_client.zcard(DELAYED_KEY) == 1
    assert q.pending_retries([Q]) == 1
    assert q.pending_retries(["queue:other"]) == 0
    assert q.claim([Q], timeout=0) is None  # not due for 30 s
    assert q.promote_due(now=time.time() + 31) == 1
    job = q.claim([Q], timeout=0)
    assert job.attempts == 1
    assert job.payload == {"n": 1}


def test_backoff_is_exponential_and_capped():
    policy = RetryPolicy(max_attempts=10, base_s=2, cap_s=30)
    assert [policy.delay_s(n) for n in range(6)] == [2, 4, 8, 16, 30, 30]


def test_release_puts_job_back_at_the_head(redis_client):
    q = make_queue(redis_client)
    q.enqueue(Q, {"n": 1})
    q.enqueue(Q, {"n": 2})
    job = q.claim([Q], timeout=0)
    q.release(job)
    assert [json.loads(x)["n"] for x in redis_client.lrange(Q, 0, -1)] == [1, 2]
    assert redis_client.llen(processing_key("qtest:h:1", Q)) == 0


def test_settling_a_job_the_reaper_took_back_does_nothing(redis_client):
    q = make_queue(redis_client)
    q.enqueue(Q, {"n": 1})
    job = q.claim([Q], timeout=0)
    reap_dead_workers(redis_client)  # no heartbeat: the job goes back to Q
    assert redis_client.llen(Q) == 1
    q.retry(job, "late")
    q.dead_letter(job, "late")
    q.release(job)
    assert redis_client.llen(Q) == 1
    assert redis_client.zcard(DELAYED_KEY) == 0
    assert redis_client.llen(QUEUE_FAILED) == 0


def test_two_claimers_never_share_a_job(settings, redis_client):
    total = 400
    redis_client.rpush(Q, *[json.dumps({"n": n}) for n in range(total)])
    claimed: dict[str, list[int]] = {}

    def claimer(worker_id: str) -> None:
        q = JobQueue(get_redis(settings), worker_id, "qtest", retry_policy=FAST)
        mine = claimed.setdefault(worker_id, [])
        while (job := q.claim([Q], timeout=0.2)) is not None:
            mine.append(job.payload["n"])
            q.ack(job)

    threads = [threading.Thread(target=claimer, args=(f"qtest:h:{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    everything = [n for ns in claimed.values() for n in ns]
    assert sorted(everything) == list(range(total))  # nothing lost, nothing twice
    assert sum(1 for ns in claimed.values() if ns) >= 2  # they really competed


def test_reaper_returns_items_of_dead_workers_only(redis_client):
    live = make_queue(redis_client, "qtest:alive:1")
    dead = make_queue(redis_client, "qtest:dead:2")
    live.heartbeat(30, {"stage": "qtest"})
    dead.heartbeat(0.2, {"stage": "qtest"})
    live.enqueue(Q, {"n": "live"})
    live.enqueue(Q, {"n": "dead-1"})
    live.enqueue(Q, {"n": "dead-2"})
    assert live.claim([Q], 0).payload["n"] == "live"
    assert [j.payload["n"] for j in dead.claim_many([Q], 2, 0)] == ["dead-1", "dead-2"]
    time.sleep(0.3)
    assert redis_client.sismember(WORKERS_KEY, "qtest:dead:2")
    reaped = reap_dead_workers(redis_client)
    assert reaped == [("qtest:dead:2", Q, 2)]
    # back at the head of the queue, oldest first
    assert [json.loads(x)["n"] for x in redis_client.lrange(Q, 0, -1)] == ["dead-1", "dead-2"]
    assert redis_client.llen(processing_key("qtest:alive:1", Q)) == 1
    assert not redis_client.sismember(WORKERS_KEY, "qtest:dead:2")
    assert redis_client.sismember(WORKERS_KEY, "qtest:alive:1")


def test_reaper_sends_a_dead_hosts_transcribe_jobs_to_the_shared_queue(redis_client):
    host_queue = f"{QUEUE_TRANSCRIBE}:gpu-07"
    dead = make_queue(redis_client, "gpu:gpu-07:99")
    dead.enqueue(host_queue, {"audio_id": 1, "opus_path": "/x.opus"})
    dead.claim([host_queue, QUEUE_TRANSCRIBE], 0)
    assert reap_dead_workers(redis_client) == [("gpu:gpu-07:99", QUEUE_TRANSCRIBE, 1)]
    assert json.loads(redis_client.lpop(QUEUE_TRANSCRIBE))["audio_id"] == 1


def test_only_one_reaper_at_a_time(redis_client):
    dead = make_queue(redis_client, "qtest:dead:3")
    dead.enqueue(Q, {"n": 1})
    dead.claim([Q], 0)
    holder = redis_client.lock("lock:reaper", timeout=5)
    assert holder.acquire(blocking=False)
    try:
        assert reap_dead_workers(redis_client) == []
        assert redis_client.llen(Q) == 0
    finally:
        holder.release()
    assert reap_dead_workers(redis_client) == [("qtest:dead:3", Q, 1)]


def test_restarted_worker_with_same_id_recovers_its_predecessors_items(redis_client):
    host_queue = f"{QUEUE_TRANSCRIBE}:testhost"
    old = make_queue(redis_client, "gpu:testhost:42")
    old.enqueue(host_queue, {"audio_id": 5, "opus_path": "/x.opus"})
    old.claim([host_queue], 0)
    new = make_queue(redis_client, "gpu:testhost:42")
    new.heartbeat(30, {"stage": "gpu"})
    assert new.recover_own() == 1
    # same host: the local file is still here, so it goes back to the host queue
    assert redis_client.llen(host_queue) == 1


def test_heartbeat_expires_and_unregister_cleans_up(redis_client):
    q = make_queue(redis_client, "qtest:h:9")
    q.heartbeat(0.3, {"stage": "qtest", "job": None})
    assert redis_client.hget(heartbeat_key("qtest:h:9"), "stage") == "qtest"
    time.sleep(0.45)
    assert not redis_client.exists(heartbeat_key("qtest:h:9"))
    q.heartbeat(30, {"stage": "qtest"})
    q.unregister()
    assert not redis_client.exists(heartbeat_key("qtest:h:9"))
    assert not redis_client.sismember(WORKERS_KEY, "qtest:h:9")


def test_a_job_that_kills_its_worker_every_time_is_dead_lettered(redis_client):
    # Each "crash": a worker claims the job and vanishes without a heartbeat. Every
    # reap costs the job a try, so it cannot loop forever (FAST allows 3 tries).
    redis_client.rpush(Q, json.dumps({"n": "poison"}))
    for crash in range(1, FAST.max_attempts + 1):
        victim = make_queue(redis_client, f"qtest:crashy:{crash}")
        job = victim.claim([Q], timeout=0)
        assert job is not None
        assert job.attempts == crash - 1
        assert job.payload == {"n": "poison"}  # the count never leaks into the payload
        reap_dead_workers(redis_client, max_attempts=FAST.max_attempts)
    assert redis_client.llen(Q) == 0
    [letter] = [json.loads(x) for x in redis_client.lrange(QUEUE_FAILED, 0, -1)]
    assert letter["attempts"] == FAST.max_attempts
    assert letter["stage"] == "qtest"
    assert letter["worker"] == f"qtest:crashy:{FAST.max_attempts}"
    assert "died while processing" in letter["error"]
    assert json.loads(letter["job"])["n"] == "poison"


def test_one_crash_costs_one_try_and_keeps_the_payload(redis_client):
    payload = {"audio_id": 7, "opus_path": "/data/scratch/b/x.opus", "batch_id": "b"}
    redis_client.rpush(Q, json.dumps(payload))
    make_queue(redis_client, "qtest:crashy:1").claim([Q], timeout=0)
    assert reap_dead_workers(redis_client, max_attempts=5) == [("qtest:crashy:1", Q, 1)]
    again = make_queue(redis_client, "qtest:h:2").claim([Q], timeout=0)
    assert again.attempts == 1
    assert again.payload == payload
