"""Deploys cost nothing, and a hung job is noticed: real worker processes, real services.

The stop grace (WORKER_STOP_GRACE_S): the first SIGTERM lets the claim in hand go on
that long; then the claim is handed back to the head of its queue, untouched and in
order, at no attempt's cost, and the process exits 0. A fresh worker then does the
work once.

The watchdog: the test plays systemd's part (a unix datagram socket in NOTIFY_SOCKET,
WATCHDOG_USEC set): READY=1 after start-up, WATCHDOG=1 from the main loop while it
works or idles, none while a job hangs (the heartbeat thread never pings); then it
kills the worker as systemd would, and a new worker gets the job back through the
reaper and finishes it. The units' side (Type=notify, WatchdogSec=) is tested in the
fleet.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import signal
import socket
import threading
import time
import uuid
from contextlib import suppress
from pathlib import Path

import pytest
import redis

from audio_pipeline import s3_utils
from audio_pipeline.config import QUEUE_FAILED, QUEUE_UNPACK
from audio_pipeline.queue import WORKERS_KEY, heartbeat_key
from devtools.sample import make_speech_batch
from tests.support.workerkit.echo_worker import DONE_KEY, STARTED_KEY
from tests.support.workerkit.procs import finish, start_module, wait_for

pytestmark = pytest.mark.integration

UNPACK = "audio_pipeline.workers.unpack_worker"
ECHO = "tests.support.workerkit.echo_worker"
ECHO_QUEUE = "queue:echo"
HOST_QUEUE = "queue:transcribe:testhost"
GRACE_S = 1.0
# What the exit may take beyond the grace: unwinding, terminating ffmpeg, the
# hand-back, the heartbeat thread's join and the interpreter's exit.
EXIT_MARGIN_S = 8.0


def processing_items(r: redis.Redis) -> list[str]:
    return [item for key in r.scan_iter("processing:*") for item in r.lrange(key, 0, -1)]


def stopped_within(proc, seconds: float) -> tuple[int, str, float]:
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, timeout=seconds + 30)
    return code, out, time.monotonic() - sent


# -- the stop grace -------------------------------------------------------------------


def test_a_long_unpack_is_handed_back_when_the_grace_runs_out_and_redone_once(
    pipeline_env, settings, db_conn, redis_client, s3_client, tmp_path: Path
):
    batch = make_speech_batch(
        tmp_path / "c", "b-grace", n_files=10, seed=5, min_seconds=8, max_seconds=14
    )
    key = s3_utils.archive_key("b-grace")
    s3_utils.upload_file(s3_client, settings.s3_bucket, batch.tar_path, key)
    job = json.dumps({"batch_id": "b-grace", "s3_key": key, "file_count": 10})
    redis_client.rpush(QUEUE_UNPACK, job)
    behind = json.dumps({"batch_id": "b-behind", "s3_key": "archives/b-behind.tar"})
    redis_client.rpush(QUEUE_UNPACK, behind)
    # one ffmpeg at a time, so the batch is surely still converting when the grace ends
    proc = start_module(
        UNPACK,
        pipeline_env,
        extra_env={"UNPACK_FFMPEG_JOBS": "1", "WORKER_STOP_GRACE_S": str(GRACE_S)},
        log_path=tmp_path / "first.log",
    )

    def converting() -> bool:
        db_conn.commit()
        found = db_conn.execute(
            "SELECT count(*) AS n FROM audio_files WHERE batch_id = 'b-grace'"
        ).fetchone()
        return found["n"] == 10

    wait_for(converting, timeout=60, what="the batch's rows, converting")
    code, _, took = stopped_within(proc, GRACE_S + EXIT_MARGIN_S)
    out = (tmp_path / "first.log").read_text()
    assert code == 0, out
    assert took < GRACE_S + EXIT_MARGIN_S, out
    assert "event=worker.stop_grace_expired stage=unpack" in out
    assert "jobs_in_hand=1" in out
    # back at the head, byte for byte (no attempt counted), ahead of the job behind it
    assert redis_client.lrange(QUEUE_UNPACK, 0, -1) == [job, behind]
    assert processing_items(redis_client) == []
    assert redis_client.llen(HOST_QUEUE) == 0, "nothing is queued from a batch handed back"
    assert "event=job.retry" not in out
    scratch = settings.batch_scratch("b-grace")
    assert not (scratch / "archive.tar").exists()
    assert not (scratch / "files").exists()
    assert not [p for p in scratch.rglob(".*") if p.is_file()], "no half-written Opus left"

    redis_client.lrem(QUEUE_UNPACK, 0, behind)  # a fresh worker does b-grace alone
    code, out = finish(start_module(UNPACK, pipeline_env, ["--drain"]), timeout=120)
    assert code == 0, out
    assert "event=unpack.batch stage=unpack batch_id=b-grace files=10 converted=10" in out
    assert "attempt=1" in out  # the redo is the job's first attempt
    db_conn.commit()
    rows = db_conn.execute(
        "SELECT rel_path, status, id FROM audio_files WHERE batch_id = 'b-grace'"
    ).fetchall()
    assert sorted(r["rel_path"] for r in rows) == sorted(batch.manifest)  # each once
    assert {r["status"] for r in rows} == {"converted"}
    jobs = [json.loads(j) for j in redis_client.lrange(HOST_QUEUE, 0, -1)]
    assert sorted(j["audio_id"] for j in jobs) == sorted(r["id"] for r in rows)
    assert sorted(p.name for p in scratch.iterdir()) == ["opus"]
    assert len(list((scratch / "opus").rglob("*.opus"))) == 10
    assert redis_client.llen(QUEUE_FAILED) == 0


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text[text.rfind(")") + 2 :].split()[1] == str(pid):
            found.append(int(stat.parent.name))
    return found


def test_an_ffmpeg_stopped_with_its_worker_hands_the_batch_back_unspent(
    pipeline_env, settings, db_conn, redis_client, s3_client, tmp_path: Path
):
    """A stop signal sent to the whole process group (Ctrl-C in a terminal) reaches
    ffmpeg too: the batch cannot finish, so it goes back at once, no attempt spent."""
    batch = make_speech_batch(
        tmp_path / "c", "b-group", n_files=6, seed=7, min_seconds=8, max_seconds=14
    )
    key = s3_utils.archive_key("b-group")
    s3_utils.upload_file(s3_client, settings.s3_bucket, batch.tar_path, key)
    job = json.dumps({"batch_id": "b-group", "s3_key": key})
    redis_client.rpush(QUEUE_UNPACK, job)
    proc = start_module(
        UNPACK,
        pipeline_env,
        extra_env={"UNPACK_FFMPEG_JOBS": "1", "WORKER_STOP_GRACE_S": "60"},
        log_path=tmp_path / "worker.log",
    )
    wait_for(lambda: children_of(proc.pid), timeout=60, what="an ffmpeg at work")
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 30  # well within the grace
    while proc.poll() is None and time.monotonic() < deadline:
        for child in children_of(proc.pid):  # the terminal signals the whole group
            with suppress(ProcessLookupError):
                os.kill(child, signal.SIGINT)
        time.sleep(0.05)
    code, _ = finish(proc, timeout=5)
    out = (tmp_path / "worker.log").read_text()
    assert code == 0, out
    assert "event=worker.stop_forced stage=unpack" in out
    assert "reason=" in out
    assert redis_client.lrange(QUEUE_UNPACK, 0, -1) == [job]
    assert processing_items(redis_client) == []
    assert "event=job.retry" not in out


def test_a_batched_claim_is_handed_back_in_order_when_the_grace_runs_out(
    pipeline_env, redis_client, tmp_path: Path
):
    jobs = [json.dumps({"id": i, "sleep": 30}) for i in "abc"] + [json.dumps({"id": "d"})]
    redis_client.rpush(ECHO_QUEUE, *jobs)
    proc = start_module(
        ECHO,
        pipeline_env,
        extra_env={"ECHO_BATCH_SIZE": "3", "WORKER_STOP_GRACE_S": str(GRACE_S)},
    )
    wait_for(lambda: redis_client.llen(STARTED_KEY) == 1, what="the claim's first job")
    code, out, took = stopped_within(proc, GRACE_S + EXIT_MARGIN_S)
    assert code == 0, out
    assert took < GRACE_S + EXIT_MARGIN_S, out
    assert redis_client.lrange(ECHO_QUEUE, 0, -1) == jobs  # untouched, in order
    assert redis_client.lrange(DONE_KEY, 0, -1) == []
    assert processing_items(redis_client) == []
    assert "event=worker.stop_grace_expired stage=echo" in out
    assert "jobs_in_hand=3" in out
    assert out.count("event=job.released") == 3


def test_a_claim_that_ends_within_the_grace_is_finished(pipeline_env, redis_client):
    redis_client.rpush(ECHO_QUEUE, json.dumps({"id": "short", "sleep": 1.0}))
    proc = start_module(ECHO, pipeline_env, extra_env={"WORKER_STOP_GRACE_S": "20"})
    wait_for(lambda: redis_client.llen(STARTED_KEY) == 1, what="job start")
    code, out, _ = stopped_within(proc, 10)
    assert code == 0, out
    assert redis_client.lrange(DONE_KEY, 0, -1) == ["short"]
    assert "event=worker.stop_grace_expired" not in out
    assert "event=job.released" not in out


# -- systemd's watchdog, fed from the main loop ---------------------------------------

# Above twice the longest idle gap (a claim blocks up to queue_worker.CLAIM_TIMEOUT_S).
WATCHDOG_S = 3.0


class NotifySocket:
    """What systemd listens on: a unix datagram socket (abstract namespace, as '@...'
    in NOTIFY_SOCKET), every message kept with the time it came."""

    def __init__(self) -> None:
        self.name = f"@audio-pipeline-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def times(self, line: str, since: float = 0.0) -> list[float]:
        return [t for t, m in list(self.messages) if m == line and t >= since]

    def has(self, prefix: str) -> bool:
        return any(m.startswith(prefix) for _, m in list(self.messages))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify_socket():
    listener = NotifySocket()
    yield listener
    listener.close()


@pytest.fixture
def no_core_files():
    """Children inherit no core limit: the SIGABRT a test sends writes no core file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    yield
    resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


def systemd_env(notify: NotifySocket) -> dict[str, str]:
    return {"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": str(int(WATCHDOG_S * 1_000_000))}


def largest_gap(times: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def test_a_hung_job_stops_the_watchdog_pings_and_comes_back_after_the_kill(
    pipeline_env, redis_client, notify_socket, no_core_files, tmp_path: Path
):
    proc = start_module(
        ECHO, pipeline_env, extra_env=systemd_env(notify_socket), log_path=tmp_path / "hung.log"
    )
    wait_for(lambda: notify_socket.times("READY=1"), what="READY=1")
    (ready,) = notify_socket.times("READY=1")
    assert not [t for t in notify_socket.times("WATCHDOG=1") if t < ready], "pinged before ready"

    # working: short jobs, each turn of the loop pings
    working = time.monotonic()
    redis_client.rpush(ECHO_QUEUE, *[json.dumps({"id": f"w{n}", "sleep": 0.2}) for n in range(15)])
    wait_for(lambda: redis_client.llen(DONE_KEY) == 15, what="the short jobs")
    pings = notify_socket.times("WATCHDOG=1", since=working)
    assert len(pings) >= 5
    assert largest_gap([working, *pings]) < WATCHDOG_S / 2

    # a job that hangs (no alive() inside): the pings stop for longer than the interval
    redis_client.rpush(ECHO_QUEUE, json.dumps({"id": "hung", "sleep": 2 * WATCHDOG_S}))
    wait_for(lambda: "hung" in redis_client.lrange(STARTED_KEY, 0, -1), what="the hung job")
    hung_at = time.monotonic()
    time.sleep(WATCHDOG_S * 1.5)
    late = notify_socket.times("WATCHDOG=1", since=hung_at + 0.5)
    assert late == [], "the heartbeat thread must not feed the watchdog"
    assert time.monotonic() - max(notify_socket.times("WATCHDOG=1")) > WATCHDOG_S
    assert redis_client.lrange(DONE_KEY, 0, -1)[-1] != "hung"

    # what systemd does then (WatchdogSignal=SIGABRT), and the restart
    [worker_id] = redis_client.smembers(WORKERS_KEY)
    proc.send_signal(signal.SIGABRT)
    assert proc.wait(timeout=10) == -signal.SIGABRT
    # the heartbeat lapses (1.5 s in tests): the next worker's reaper returns the job
    wait_for(lambda: not redis_client.exists(heartbeat_key(worker_id)), 5, "heartbeat expiry")
    out = (tmp_path / "hung.log").read_text()
    assert "Fatal Python error: Aborted" in out  # faulthandler: where the main thread was
    assert "echo_worker.py" in out
    code, out = finish(start_module(ECHO, pipeline_env, ["--drain"]), timeout=60)
    assert code == 0, out
    assert "event=reaper.returned" in out
    assert redis_client.lrange(DONE_KEY, 0, -1)[-1] == "hung"
    assert redis_client.lrange(STARTED_KEY, 0, -1).count("hung") == 2
    assert redis_client.llen(ECHO_QUEUE) == 0
    assert processing_items(redis_client) == []


def test_a_stop_says_stopping_and_an_idle_worker_keeps_pinging(
    pipeline_env, notify_socket, tmp_path: Path
):
    proc = start_module(ECHO, pipeline_env, extra_env=systemd_env(notify_socket))
    wait_for(lambda: notify_socket.times("READY=1"), what="READY=1")
    idle = time.monotonic()
    time.sleep(3 * WATCHDOG_S)  # idle: blocked in claims, one after the other
    assert largest_gap([idle, *notify_socket.times("WATCHDOG=1", since=idle)]) < WATCHDOG_S / 2
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, timeout=10)
    assert code == 0, out
    wait_for(lambda: notify_socket.has("STOPPING=1"), 2, "STOPPING=1")


def test_start_up_waiting_out_an_outage_extends_the_start_and_is_not_ready(
    pipeline_env, notify_socket
):
    # Redis on a port nothing listens on: start-up waits for it
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    proc = start_module(
        ECHO, {**pipeline_env, "REDIS_PORT": str(port)}, extra_env=systemd_env(notify_socket)
    )
    try:
        wait_for(lambda: notify_socket.has("EXTEND_TIMEOUT_USEC="), 15, "EXTEND_TIMEOUT_USEC")
        assert not notify_socket.times("READY=1")
        assert not notify_socket.times("WATCHDOG=1")
    finally:
        proc.kill()
        proc.wait()
