"""Reliable job queues on Redis lists: claim, ack, retry, dead letter, reaper.

Delivery is at-least-once and never loses a job:

- A claim moves the item atomically (LMOVE/BLMOVE) from its source queue into a
  processing list of this worker *for that source queue*,
  ``processing:{worker_id}:from:{queue}``. The source is therefore part of the key,
  so a kill -9 at any instant leaves nothing to reconstruct: whoever finds the list
  knows exactly where its items go back to.
- An item leaves the processing list only in one atomic step with its next home:
  ack (gone), retry (into the delayed set), dead letter (queue:failed) or release
  (back to the head of its source). Each of these is a Lua script that moves the
  item only if it is still in this worker's processing list, so a job the reaper
  already handed to someone else is never also retried or dead-lettered.
- Workers keep a heartbeat hash ``worker:{worker_id}`` with a TTL. The reaper
  (any worker, under a short lock) returns the items of every processing list
  whose worker has no heartbeat any more.
- Retries wait in the sorted set ``retry:delayed`` (score = due time) and are
  promoted back to their queue by whichever worker claims next.
- A lost host: when no worker of host H has beaten for the heartbeat TTL
  (``host:{H}`` expired, and no live worker hash names H), the reaper moves
  H's ``queue:transcribe:{H}`` and the delayed retries routed to it to the shared
  ``queue:transcribe`` (any gpu worker fetches the Opus from S3). A host whose
  workers still beat, however slowly they work, keeps its queue.
- Every dead letter of a job (the worker's own, or the reaper's when the job's
  worker died with it once too often) is also listed, in the same atomic step, in
  ``dead:unsettled:{stage}`` until its stage's ``on_job_failed`` hook has run: by the
  worker that dead-lettered it, or, if that worker died first (or it was the
  reaper's), by any worker of the stage. So no dead letter leaves its rows working.

Retry counts travel inside the payload as ``_attempts`` (stripped from
``Job.payload``), so they survive crashes without any side table. A retry waits a
jittered backoff (``jittered_backoff_s``): jobs that failed together (one outage, one
bad claim) come due spread out, not in step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

from audio_pipeline.config import QUEUE_FAILED, QUEUE_TRANSCRIBE, EnvReader, EnvSettings
from audio_pipeline.logs import log_event

log = logging.getLogger(__name__)

# Key layout (documented for operators using redis-cli).
PROCESSING_PREFIX = "processing:"
PROCESSING_SOURCE_SEP = ":from:"
DELAYED_KEY = "retry:delayed"  # sorted set: {"queue","raw","id"} scored by due time
WORKERS_KEY = "workers"  # set of registered worker ids
HEARTBEAT_PREFIX = "worker:"  # hash per live worker, expires without heartbeats
# Per host, refreshed by each of its workers' heartbeats with the same TTL. It outlives
# a graceful stop (which deletes the worker's hash at once), so a host whose workers
# restart (a deploy) is not taken for lost; only a TTL of silence makes it lost.
HOST_ALIVE_PREFIX = "host:"
REAPER_LOCK_KEY = "lock:reaper"
UNSETTLED_PREFIX = "dead:unsettled:"  # list per stage: reaper dead letters awaiting its hook
ATTEMPTS_FIELD = "_attempts"  # retries so far, carried inside the payload
# When the job entered (or, for a retry, became due in) its queue, Unix seconds: the
# claiming worker's queue-wait metric. Absent from jobs pushed by hand.
ENQUEUED_FIELD = "_enqueued_at"

# Tunables (seconds unless named otherwise); the env overrides let tests use tiny values.
DEFAULT_MAX_ATTEMPTS = 5  # total tries of one job before it is dead-lettered
DEFAULT_RETRY_BASE_S = 30.0  # longest first retry delay; doubles with every retry
DEFAULT_RETRY_CAP_S = 900.0  # no retry waits longer than this
BLOCK_SLICE_S = 1.0  # longest single BLMOVE; between slices other queues and retries are seen
# While jobs flow, due retries are promoted at most this often, not on every claim: it
# saves one of the four round trips per job (bench/bench_queue.py; docs/PERFORMANCE.md).
# Claims that find the queues empty always promote before they wait.
PROMOTE_INTERVAL_S = 1.0
PROMOTE_BATCH = 100  # due retries moved per promotion call
REAPER_LOCK_S = 30.0  # a reaper that dies holding the lock blocks others this long at most
ERROR_MAX_CHARS = 4000  # dead-letter error text kept (tracebacks can be huge)
# How often a worker looks for reaper dead letters of its stage: they are rare, and a
# few seconds' delay before their rows turn failed costs nothing.
UNSETTLED_CHECK_S = 5.0
UNSETTLED_BATCH = 20  # hooks run per look


class PermanentJobError(Exception):
    """Bad input that retrying cannot fix: the job goes straight to queue:failed."""


class ReapedDeadLetterError(RuntimeError):
    """The error a stage hook gets for a dead letter settled from dead:unsettled (the
    reaper's, or one whose worker died before its hook ran): the dead letter's text,
    which already says why and after how many attempts."""


def require_fields(
    payload: Mapping[str, Any], fields: Mapping[str, type | tuple[type, ...]]
) -> None:
    """Raise PermanentJobError naming every missing or wrongly-typed key."""
    problems: list[str] = []
    for name, expected in fields.items():
        if name not in payload or payload[name] is None:
            problems.append(f"missing key {name!r}")
            continue
        value = payload[name]
        types = expected if isinstance(expected, tuple) else (expected,)
        # bool is an int subclass; an id of True is a malformed payload, not 1.
        ok = False if isinstance(value, bool) and bool not in types else isinstance(value, types)
        if not ok:
            wanted = " or ".join(t.__name__ for t in types)
            problems.append(f"key {name!r} must be {wanted}, got {type(value).__name__}")
    if problems:
        raise PermanentJobError("invalid job payload: " + "; ".join(problems))


def stamped(payload: dict[str, Any], at: float | None = None) -> dict[str, Any]:
    """``payload`` with its enqueue time (now, or ``at``), as every producer pushes it."""
    return {**payload, ENQUEUED_FIELD: round(time.time() if at is None else at, 3)}


def short_job_id(raw: str) -> str:
    """A stable 8-hex id of a queue item for log lines (payloads have no id of their own)."""
    return uuid.uuid5(uuid.NAMESPACE_OID, raw).hex[:8]


def backoff_delay_s(base_s: float, cap_s: float, retries_so_far: int) -> float:
    """Capped exponential backoff: ``base_s`` before the first retry, doubling, at most
    ``cap_s``. The ceiling of ``jittered_backoff_s``."""
    return min(cap_s, base_s * 2**retries_so_far)


def jittered_backoff_s(
    base_s: float, cap_s: float, retries_so_far: int, rng: random.Random | None = None
) -> float:
    """The queue's one backoff rule: a delay drawn evenly from the upper half of the
    capped exponential backoff (``backoff_delay_s``), "equal jitter".

    Jobs retried together (one outage, one bad claim) come due spread over half their
    backoff instead of all at once, and so are not claimed together again; keeping
    the lower half fixed means no retry comes back at once, and the backoff still
    grows with each try. ``rng`` is for tests (a seeded ``random.Random``).
    """
    ceiling = backoff_delay_s(base_s, cap_s, retries_so_far)
    return (rng or random).uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class Job:
    """One claimed item. ``raw`` is the exact string in Redis (ack/retry match on it)."""

    queue: str
    raw: str
    payload: dict[str, Any] = field(hash=False)
    attempts: int = 0
    enqueued_at: float | None = None  # Unix seconds, from the producer's stamp

    def queue_wait_s(self, now: float | None = None) -> float | None:
        """Seconds from enqueue to now (never negative: hosts' clocks differ a little)."""
        if self.enqueued_at is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.enqueued_at)

    @property
    def short_id(self) -> str:
        return short_job_id(self.raw)


@dataclass(frozen=True)
class RetryPolicy(EnvSettings):
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    base_s: float = DEFAULT_RETRY_BASE_S
    cap_s: float = DEFAULT_RETRY_CAP_S

    @classmethod
    def read(cls, env: EnvReader) -> RetryPolicy:
        return cls(
            max_attempts=env.int("QUEUE_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, minimum=1),
            base_s=env.seconds("QUEUE_RETRY_BASE_S", DEFAULT_RETRY_BASE_S, allow_zero=True),
            cap_s=env.seconds("QUEUE_RETRY_CAP_S", DEFAULT_RETRY_CAP_S, allow_zero=True),
        )

    def delay_s(self, retries_so_far: int) -> float:
        """The longest a retry after ``retries_so_far`` retries waits (no jitter)."""
        return backoff_delay_s(self.base_s, self.cap_s, retries_so_far)

    def jittered_delay_s(self, retries_so_far: int, rng: random.Random | None = None) -> float:
        """What a retry after ``retries_so_far`` retries waits: see jittered_backoff_s."""
        return jittered_backoff_s(self.base_s, self.cap_s, retries_so_far, rng)


def processing_key(worker_id: str, queue: str) -> str:
    return f"{PROCESSING_PREFIX}{worker_id}{PROCESSING_SOURCE_SEP}{queue}"


def parse_processing_key(key: str) -> tuple[str, str]:
    """(worker_id, source queue) of a processing list key."""
    if not key.startswith(PROCESSING_PREFIX) or PROCESSING_SOURCE_SEP not in key:
        raise ValueError(f"not a processing list key: {key!r}")
    worker_id, source = key[len(PROCESSING_PREFIX) :].split(PROCESSING_SOURCE_SEP, 1)
    return worker_id, source


def heartbeat_key(worker_id: str) -> str:
    return f"{HEARTBEAT_PREFIX}{worker_id}"


def reap_destination(source: str) -> str:
    """Where a dead worker's item goes back to.

    Host transcribe queues go to the shared queue: the dead host may be gone, and
    any gpu worker can fetch the Opus file from S3.
    """
    if source.startswith(QUEUE_TRANSCRIBE + ":"):
        return QUEUE_TRANSCRIBE
    return source


def host_alive_key(host: str) -> str:
    return f"{HOST_ALIVE_PREFIX}{host}"


def unsettled_key(stage: str) -> str:
    return f"{UNSETTLED_PREFIX}{stage}"


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# Moves ARGV[1] out of KEYS[1] into KEYS[2] only if it is still there, so a job the
# reaper already returned is never settled twice. ARGV[2] says how it lands.
_SETTLE_LUA = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
if ARGV[2] == 'rpush' then redis.call('RPUSH', KEYS[2], ARGV[3])
elseif ARGV[2] == 'lpush' then redis.call('LPUSH', KEYS[2], ARGV[3])
elseif ARGV[2] == 'zadd' then redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
elseif ARGV[2] == 'dead' then
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('RPUSH', KEYS[3], ARGV[3])
end
return 1
"""

# Due retries back to the tail of their queues, atomically per member.
_PROMOTE_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  local entry = cjson.decode(member)
  redis.call('RPUSH', entry['queue'], entry['raw'])
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""

# A dead worker's whole processing list back to the head of a queue, oldest item
# first in line. Dying mid-job counts as a try (a job that crashes its worker every
# time, e.g. out of memory, must not loop forever): _attempts goes up by one, and a
# job out of tries becomes a dead letter instead. A graceful hand-back (release)
# does not come through here and costs no try.
# Each such dead letter is also listed for its stage's failure hook (KEYS[4]).
# KEYS: processing list, destination queue, queue:failed, dead:unsettled:{stage}
# ARGV: max attempts, attempts field, source queue, stage, worker, failed_at
_RETURN_CRASHED_LUA = """
local returned, failed = 0, 0
while true do
  local raw = redis.call('RPOP', KEYS[1])
  if not raw then break end
  local ok, payload = pcall(cjson.decode, raw)
  if ok and type(payload) == 'table' then
    local tries = (tonumber(payload[ARGV[2]]) or 0) + 1
    if tries >= tonumber(ARGV[1]) then
      local entry = cjson.encode({
        job = raw, queue = ARGV[3], stage = ARGV[4], worker = ARGV[5],
        error = 'WorkerDied: the worker died while processing this job (' .. tries .. ' times)',
        attempts = tries, failed_at = ARGV[6]})
      redis.call('RPUSH', KEYS[3], entry)
      redis.call('RPUSH', KEYS[4], entry)
      failed = failed + 1
    else
      payload[ARGV[2]] = tries
      redis.call('LPUSH', KEYS[2], cjson.encode(payload))
      returned = returned + 1
    end
  else
    -- not JSON: the claiming worker dead-letters it with the parse error
    redis.call('LPUSH', KEYS[2], raw)
    returned = returned + 1
  end
end
return {returned, failed}
"""


def return_crashed(
    script: Any, key: str, destination: str, source: str, worker_id: str, max_attempts: int
) -> tuple[int, int]:
    """Run _RETURN_CRASHED_LUA on one processing list: (returned, dead-lettered)."""
    stage = worker_id.split(":", 1)[0]
    returned, failed = script(
        keys=[key, destination, QUEUE_FAILED, unsettled_key(stage)],
        args=[max_attempts, ATTEMPTS_FIELD, source, stage, worker_id, utc_now_iso()],
    )
    if failed:
        log_event(
            log,
            "reaper.dead_lettered",
            level=logging.ERROR,
            worker=worker_id,
            source=source,
            jobs=int(failed),
        )
    return int(returned), int(failed)


# A lost host's whole transcribe queue, and every delayed retry routed to it, over to
# the shared queue in one atomic step (a retry keeps its due time). Two reapers can
# never both move an item: each item moves once, and a second run finds nothing.
# KEYS: host queue, shared queue, retry:delayed
_MOVE_HOST_LUA = """
local moved = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') do moved = moved + 1 end
local members = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
for i = 1, #members, 2 do
  local ok, entry = pcall(cjson.decode, members[i])
  if ok and type(entry) == 'table' and entry['queue'] == KEYS[1] then
    entry['queue'] = KEYS[2]
    redis.call('ZREM', KEYS[3], members[i])
    redis.call('ZADD', KEYS[3], members[i + 1], cjson.encode(entry))
    moved = moved + 1
  end
end
return moved
"""


@dataclass(frozen=True)
class ReapedDeadLetter:
    """A job the reaper dead-lettered, waiting for its stage's failure hook."""

    entry: str  # the exact item in dead:unsettled:{stage} (forget_reaped removes it)
    job: Job
    error: ReapedDeadLetterError


class JobQueue:
    """Queue operations of one worker (``worker_id``) of one ``stage``."""

    def __init__(
        self,
        redis_client: redis.Redis,
        worker_id: str,
        stage: str,
        *,
        retry_policy: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.redis = redis_client
        self.worker_id = worker_id
        self.stage = stage
        self.retry_policy = retry_policy or RetryPolicy.from_env()
        self._rng = rng  # the retry jitter's source; None: the random module's
        self._settle = redis_client.register_script(_SETTLE_LUA)
        self._promote = redis_client.register_script(_PROMOTE_LUA)
        self._return_crashed = redis_client.register_script(_RETURN_CRASHED_LUA)
        self._promoted_at = float("-inf")  # monotonic time of claim()'s last promotion
        self._unsettled_at = float("-inf")  # monotonic time of the last reaped_dead_letters look
        self._own_unsettled: dict[str, str] = {}  # job raw -> its dead:unsettled entry

    # -- producing -----------------------------------------------------------------

    def enqueue(self, queue: str, payload: dict[str, Any]) -> None:
        """RPUSH a JSON payload (FIFO; operators LPUSH by hand to jump the line)."""
        self.redis.rpush(queue, json.dumps(stamped(payload), separators=(",", ":")))

    # -- claiming ------------------------------------------------------------------

    def claim(self, queues: Sequence[str], timeout: float) -> Job | None:
        """Take one job, trying ``queues`` in priority order, waiting up to ``timeout`` s.

        Malformed items go to queue:failed at once and are never returned.
        """
        if not queues:
            raise ValueError("claim needs at least one queue")
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            promoted = time.monotonic() - self._promoted_at >= PROMOTE_INTERVAL_S
            if promoted:
                self._promote_for_claim()
            for queue in queues:
                raw = self.redis.lmove(
                    queue, processing_key(self.worker_id, queue), "LEFT", "RIGHT"
                )
                if raw is not None:
                    job = self._accept(queue, raw)
                    if job is not None:
                        return job
                    break  # a malformed item was removed; look again from the top
            else:
                if not promoted and self._promote_for_claim():
                    continue  # retries just came due: take them rather than wait
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                # Block on the highest-priority queue only; a short slice bounds how
                # late the others (and due retries) are noticed.
                wait = max(0.01, min(remaining, BLOCK_SLICE_S))
                first = queues[0]
                raw = self.redis.blmove(
                    first, processing_key(self.worker_id, first), wait, "LEFT", "RIGHT"
                )
                if raw is not None:
                    job = self._accept(first, raw)
                    if job is not None:
                        return job

    def claim_many(self, queues: Sequence[str], max_jobs: int, timeout: float) -> list[Job]:
        """Wait up to ``timeout`` for one job, then add what is ready, up to ``max_jobs``."""
        first = self.claim(queues, timeout)
        if first is None:
            return []
        jobs = [first]
        while len(jobs) < max_jobs:
            job = self.claim(queues, 0)
            if job is None:
                break
            jobs.append(job)
        return jobs

    def _accept(self, queue: str, raw: str) -> Job | None:
        try:
            payload = json.loads(raw)
        except json.JSONDecodeError as exc:
            self._dead_letter_raw(queue, raw, 0, f"malformed JSON: {exc}")
            return None
        if not isinstance(payload, dict):
            kind = type(payload).__name__
            self._dead_letter_raw(
                queue, raw, 0, f"malformed job: a JSON object is required, got {kind}"
            )
            return None
        attempts = payload.pop(ATTEMPTS_FIELD, 0)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
            attempts = 0
        enqueued_at = payload.pop(ENQUEUED_FIELD, None)
        if isinstance(enqueued_at, bool) or not isinstance(enqueued_at, int | float):
            enqueued_at = None
        return Job(
            queue=queue, raw=raw, payload=payload, attempts=attempts, enqueued_at=enqueued_at
        )

    # -- settling ------------------------------------------------------------------

    def ack(self, job: Job) -> None:
        """Forget the job; call only after its results are committed."""
        removed = self.redis.lrem(processing_key(self.worker_id, job.queue), 1, job.raw)
        if not removed:
            self._lost(job, "ack")

    def retry(self, job: Job, error: BaseException | str) -> bool:
        """Retry later with jittered, capped exponential backoff, or dead-letter when
        out of tries.

        Returns False when the job was dead-lettered instead (its final failure).
        """
        text = _error_text(error)
        policy = self.retry_policy
        if job.attempts + 1 >= policy.max_attempts:
            self.dead_letter(job, f"{text} (gave up after {job.attempts + 1} attempts)")
            return False
        delay = policy.jittered_delay_s(job.attempts, self._rng)
        due = time.time() + delay
        # Its queue wait starts when it is due again, not when it first came.
        retried = stamped(job.payload, at=due)
        retried[ATTEMPTS_FIELD] = job.attempts + 1
        member = json.dumps(
            {"queue": job.queue, "raw": json.dumps(retried), "id": uuid.uuid4().hex},
            separators=(",", ":"),
        )
        moved = self._settle(
            keys=[processing_key(self.worker_id, job.queue), DELAYED_KEY],
            args=[job.raw, "zadd", member, due],
        )
        if not moved:
            self._lost(job, "retry")
            return True
        self._log(
            "job.retry",
            job.queue,
            level=logging.WARNING,
            job=job.short_id,
            attempt=job.attempts + 1,
            delay_s=delay,
            error=text,
        )
        return True

    def dead_letter(self, job: Job, error: str) -> None:
        """Move the job to queue:failed with why, where from and by whom; it stays
        listed for its stage's hook until ``forget_dead_letter``."""
        self._dead_letter_raw(job.queue, job.raw, job.attempts + 1, error, unsettled=True)

    def forget_dead_letter(self, job: Job) -> None:
        """The stage's hook ran for a job this worker dead-lettered."""
        entry = self._own_unsettled.pop(job.raw, None)
        if entry is not None:
            # Left listed if Redis is away: the hook then runs again later (idempotent).
            with contextlib.suppress(redis.exceptions.RedisError):
                self.redis.lrem(unsettled_key(self.stage), 1, entry)

    def release(self, job: Job) -> None:
        """Hand the job back to the head of its source queue (graceful stop)."""
        moved = self._settle(
            keys=[processing_key(self.worker_id, job.queue), job.queue],
            args=[job.raw, "lpush", job.raw, 0],
        )
        if moved:
            self._log("job.released", job.queue, job=job.short_id)
        else:
            self._lost(job, "release")

    def _dead_letter_raw(
        self, queue: str, raw: str, attempts: int, error: str, *, unsettled: bool = False
    ) -> None:
        entry = {
            "job": raw,
            "queue": queue,
            "stage": self.stage,
            "worker": self.worker_id,
            "error": _error_text(error),
            "attempts": attempts,
            "failed_at": utc_now_iso(),
        }
        text = json.dumps(entry)
        keys = [processing_key(self.worker_id, queue), QUEUE_FAILED]
        if unsettled:
            keys.append(unsettled_key(self.stage))
        moved = self._settle(keys=keys, args=[raw, "dead" if unsettled else "rpush", text, 0])
        if moved and unsettled:
            self._own_unsettled[raw] = text
        if moved:
            self._log(
                "job.failed",
                queue,
                level=logging.ERROR,
                job=short_job_id(raw),
                attempts=attempts,
                error=entry["error"],
            )
        else:
            self._log("job.lost_ownership", queue, level=logging.WARNING, action="dead_letter")

    def _lost(self, job: Job, action: str) -> None:
        # The reaper returned this job while we held it (our heartbeat lapsed): someone
        # else may be running it now; idempotent writes make the overlap harmless.
        self._log(
            "job.lost_ownership", job.queue, level=logging.WARNING, job=job.short_id, action=action
        )

    def _log(self, event: str, queue: str, *, level: int = logging.INFO, **fields: Any) -> None:
        """``event`` with the fields every queue event starts with: stage, then queue."""
        log_event(log, event, level=level, stage=self.stage, queue=queue, **fields)

    # -- delayed retries -----------------------------------------------------------

    def _promote_for_claim(self) -> int:
        self._promoted_at = time.monotonic()
        return self.promote_due()

    def promote_due(self, now: float | None = None) -> int:
        """Move retries whose time has come back to their queues; returns how many."""
        return int(self._promote(keys=[DELAYED_KEY], args=[now or time.time(), PROMOTE_BATCH]))

    def pending_retries(self, queues: Sequence[str] | None = None) -> int:
        """Delayed retries waiting for ``queues`` (all queues when None)."""
        wanted = set(queues) if queues is not None else None
        count = 0
        for member in self.redis.zrange(DELAYED_KEY, 0, -1):
            if wanted is None or json.loads(member).get("queue") in wanted:
                count += 1
        return count

    # -- registry, heartbeats, reaper ----------------------------------------------

    def heartbeat(self, ttl_s: float, info: Mapping[str, Any]) -> None:
        """Refresh this worker's heartbeat hash (``info``: stage, pid, current job...)."""
        key = heartbeat_key(self.worker_id)
        fields = {k: "" if v is None else str(v) for k, v in info.items()}
        fields["beat_at"] = f"{time.time():.3f}"
        ttl_ms = max(1, int(ttl_s * 1000))
        host = fields.get("host") or _host_of(self.worker_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.sadd(WORKERS_KEY, self.worker_id)
        pipe.hset(key, mapping=fields)
        pipe.pexpire(key, ttl_ms)
        if host:
            pipe.set(host_alive_key(host), self.worker_id, px=ttl_ms)
        pipe.execute()

    def unregister(self) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.srem(WORKERS_KEY, self.worker_id)
        pipe.delete(heartbeat_key(self.worker_id))
        pipe.execute()

    def recover_own(self) -> int:
        """Return what an earlier process with this same worker id left in flight.

        A restarted worker can get its predecessor's pid (containers), so it would
        look alive to the reaper; it hands those items back itself, to their own
        source (same host, so host-local files are still here).
        """
        moved = 0
        pattern = processing_key(self.worker_id, "*")
        for key in self.redis.scan_iter(match=pattern, count=100):
            _, source = parse_processing_key(key)
            n, _ = return_crashed(
                self._return_crashed,
                key,
                source,
                source,
                self.worker_id,
                self.retry_policy.max_attempts,
            )
            if n:
                self._log("worker.recovered", source, level=logging.WARNING, jobs=n)
            moved += n
        return moved

    def reap(self) -> list[tuple[str, str, int]]:
        """Return the in-flight items of dead workers; see reap_dead_workers."""
        return reap_dead_workers(self.redis, self._return_crashed, self.retry_policy.max_attempts)

    # -- the reaper's dead letters, settled by a worker of their stage -------------

    def reaped_dead_letters(self) -> list[ReapedDeadLetter]:
        """This stage's dead letters whose hook has not run: the reaper's, those of a
        worker that died before its hook ran, and this worker's own whose hook failed.

        Another live worker's own are its to settle. Looks at most every
        UNSETTLED_CHECK_S; a Redis error reads as none (the claim meets the same outage
        and reports it). Entries stay listed until ``forget_reaped``: a worker that dies
        in the hook leaves them to the next one.
        """
        now = time.monotonic()
        if now - self._unsettled_at < UNSETTLED_CHECK_S:
            return []
        self._unsettled_at = now
        try:
            entries = self.redis.lrange(unsettled_key(self.stage), 0, UNSETTLED_BATCH - 1)
        except redis.exceptions.RedisError:
            return []
        found = []
        for entry in entries:
            try:
                letter = json.loads(entry)
                payload = json.loads(letter["job"])
                queue = str(letter["queue"])
                error = ReapedDeadLetterError(str(letter.get("error", "the worker died")))
            except (ValueError, KeyError, TypeError):
                payload = None
            if not isinstance(payload, dict):  # nothing a hook could use
                self.redis.lrem(unsettled_key(self.stage), 1, entry)
                continue
            owner = letter.get("worker")
            if owner != self.worker_id and self.redis.exists(heartbeat_key(str(owner))):
                continue  # its own worker runs the hook (or will, once its DB is back)
            payload.pop(ATTEMPTS_FIELD, None)
            payload.pop(ENQUEUED_FIELD, None)
            tries = letter.get("attempts")
            attempts = max(0, tries - 1) if isinstance(tries, int) else 0
            job = Job(queue=queue, raw=letter["job"], payload=payload, attempts=attempts)
            found.append(ReapedDeadLetter(entry, job, error))
        return found

    def forget_reaped(self, dead: ReapedDeadLetter) -> None:
        """The hook ran for this dead letter: drop it from the list."""
        self.redis.lrem(unsettled_key(self.stage), 1, dead.entry)
        self._own_unsettled.pop(dead.job.raw, None)
        self._log(
            "job.failed_settled",
            dead.job.queue,
            level=logging.WARNING,
            job=dead.job.short_id,
            error=str(dead.error),
        )


def reap_dead_workers(
    redis_client: redis.Redis, script: Any | None = None, max_attempts: int | None = None
) -> list[tuple[str, str, int]]:
    """Hand back the items of every processing list whose worker's heartbeat expired.

    Runs under a short lock so only one worker reaps at a time; returns
    (worker_id, destination queue, items returned) for each list emptied, or [] when
    another worker holds the lock. A job whose worker died while holding it costs a
    try; one out of tries goes to queue:failed instead (see _RETURN_CRASHED_LUA).
    """
    script = script or redis_client.register_script(_RETURN_CRASHED_LUA)
    if max_attempts is None:
        max_attempts = RetryPolicy.from_env().max_attempts
    lock = redis_client.lock(REAPER_LOCK_KEY, timeout=REAPER_LOCK_S, blocking=False)
    if not lock.acquire():
        return []
    reaped: list[tuple[str, str, int]] = []
    try:
        dead: set[str] = set()
        for key in redis_client.scan_iter(match=PROCESSING_PREFIX + "*", count=200):
            try:
                worker_id, source = parse_processing_key(key)
            except ValueError:
                continue
            if redis_client.exists(heartbeat_key(worker_id)):
                continue
            destination = reap_destination(source)
            n, _ = return_crashed(script, key, destination, source, worker_id, max_attempts)
            dead.add(worker_id)
            if n:
                reaped.append((worker_id, destination, n))
                log_event(
                    log,
                    "reaper.returned",
                    level=logging.WARNING,
                    worker=worker_id,
                    source=source,
                    queue=destination,
                    jobs=n,
                )
        live_hosts: set[str] = set()
        for member in redis_client.smembers(WORKERS_KEY):
            host = redis_client.hget(heartbeat_key(member), "host")
            if host is None and not redis_client.exists(heartbeat_key(member)):
                dead.add(member)
            else:
                live_hosts.add(host or _host_of(member))
        if dead:
            redis_client.srem(WORKERS_KEY, *dead)
        move_lost_hosts(redis_client, live_hosts)
    finally:
        # A lock that expired while we worked has nothing left to release.
        with contextlib.suppress(redis.exceptions.LockError):
            lock.release()
    return reaped


def _host_of(worker_id: str) -> str:
    """The host in a ``{stage}:{host}:{pid}`` worker id (for a heartbeat without one)."""
    parts = worker_id.split(":")
    return ":".join(parts[1:-1]) if len(parts) >= 3 else ""


def move_lost_hosts(redis_client: redis.Redis, live_hosts: set[str]) -> dict[str, int]:
    """Move the host queue and routed retries of every host with no live worker.

    Called by the reaper under its lock with the hosts of live worker hashes; a host
    is lost when none of them is on it and its ``host:{H}`` key has expired too (a TTL
    with no heartbeat from any of its workers). Returns {host: items moved} for the
    hosts it moved anything for. A host only slow to work keeps its queue: its
    heartbeat is what counts, not its progress.
    """
    prefix = QUEUE_TRANSCRIBE + ":"
    host_queues = {key for key in redis_client.scan_iter(match=prefix + "*", count=200)}
    for member in redis_client.zrange(DELAYED_KEY, 0, -1):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            queue = json.loads(member)["queue"]
            if isinstance(queue, str) and queue.startswith(prefix):
                host_queues.add(queue)
    script = redis_client.register_script(_MOVE_HOST_LUA)
    moved: dict[str, int] = {}
    for queue in sorted(host_queues):
        host = queue[len(prefix) :]
        if not host or host in live_hosts or redis_client.exists(host_alive_key(host)):
            continue
        n = int(script(keys=[queue, QUEUE_TRANSCRIBE, DELAYED_KEY]))
        if n:
            moved[host] = n
            log_event(
                log,
                "queue.host_lost",
                level=logging.WARNING,
                host=host,
                moved=n,
                queue=QUEUE_TRANSCRIBE,
            )
    return moved


def _error_text(error: BaseException | str) -> str:
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    if len(text) > ERROR_MAX_CHARS:
        text = text[:ERROR_MAX_CHARS] + "...(truncated)"
    return text
