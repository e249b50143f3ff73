"""The worker runtime, split by job.

- ``service``: the process every worker runs as: the loop, run modes (--once,
  --drain), two-stage SIGTERM with a stop grace, ``interruptible()`` work.
- ``heartbeat``: its side thread: the heartbeat hash and the reaper.
- ``queue_worker``: a service that consumes Redis queues: claim, look-ahead
  (``look_ahead``), settle (ack, retry, dead letter). The unpack and gpu workers
  are queue workers; the transfer worker is a polling service built on ``service``.
- ``command``: the command line every worker shares (``run_worker``).
- ``systemd_notify``: READY, STOPPING and the watchdog's pings to systemd.
- ``outage``: Redis / PostgreSQL availability, the backoff while one is away.
- ``look_ahead``, ``claim_size``, ``out_of_memory``: the claim prepared ahead, the
  claim size in force after a GPU out-of-memory, and telling one from other errors.
"""
