"""The worker runtime, split by job.

- ``service``: the process every worker runs as: the loop, run modes (--once,
  --drain), two-stage SIGTERM, ``interruptible()`` work.
- ``heartbeat``: its side thread: the heartbeat hash and the reaper.
- ``queue_worker``: a service that consumes Redis queues: claim, look-ahead
  (``look_ahead``), settle (ack, retry, dead letter). The unpack and gpu workers
  are queue workers; the transfer worker is a polling service built on ``service``.
- ``command``: the command line every worker shares (``run_worker``).
"""
