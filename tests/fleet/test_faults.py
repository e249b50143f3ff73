"""Faults a fleet meets, on the converged fleet (issue 12): a second GPU host joins
the way the guide adds one, a deploy lands in the middle of a batch, a hung worker
meets systemd's watchdog, and a GPU host is lost mid-batch.

These run after every other fleet test (conftest.py orders this module last) and in
file order: the join first (the deploy then restarts two GPU hosts a host at a time),
the watchdog's kill next (the unit comes back by itself), the lost host last, since
nothing brings gpu-01 back.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
from typing import TYPE_CHECKING

from devtools import sample
from tests.fleet import lab, prometheus
from tests.fleet.marks import NEEDS_FLEET

if TYPE_CHECKING:
    from tests.fleet.lab import Fleet

pytestmark = NEEDS_FLEET

OLD_GPU = "gpu-01"
NEW_GPU = "gpu-02"
GPU_UNITS = ("unpack-worker", "gpu-worker")
WORKER_UNITS = {OLD_GPU: GPU_UNITS, NEW_GPU: GPU_UNITS, "transfer-01": ("transfer-worker",)}
JOINED_TIMEOUT_S = 240  # the new host's workers beating (the gpu worker loads its model)
# Enough speech that gpu-01's gpu worker is still at it when the deploy restarts it,
# a few seconds after the deploy started it (three claims of 8); enough files that
# gpu-01 still has some queued when it is lost.
DEPLOY_BATCH_FILES = 24
DEPLOY_FILE_SECONDS = (8.0, 20.0)
LOST_BATCH_FILES = 16
LOST_FILE_SECONDS = (2.0, 6.0)
BATCH_TIMEOUT_S = 600
POLL_S = 0.3
# What a job that paid an attempt leaves in a worker's journal.
RETRY_EVENTS = ("job.retry", "reaper.returned", "reaper.dead_lettered", "worker.recovered")
EVENT = re.compile(r"\bevent=(?P<event>\S+)")
TIMESPAN_PART = re.compile(r"(\d+(?:\.\d+)?)(h|min|ms|us|s)\b")
IN_HAND = re.compile(r"\bjobs_in_hand=[1-9]")
LATER_ATTEMPT = re.compile(r"\battempt=(?!1\b)\d+")


# Looking at the fleet ------------------------------------------------------------
def redis_cli(fleet: Fleet, *args: str) -> str:
    """The operators' redis-cli on the orchestrator (it carries the password)."""
    return fleet.machines["orch"].exec(["redis-cli", "--no-auth-warning", *args]).stdout.strip()


def unit_props(fleet: Fleet, host: str, unit: str, *names: str) -> dict[str, str]:
    shown = fleet.machines[host].exec(["systemctl", "show", unit, "-p", ",".join(names)]).stdout
    return dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)


def journal_since(fleet: Fleet, host: str, unit: str, since: float) -> list[tuple[float, str]]:
    """(time, message) of each line ``unit`` logged since ``since`` (epoch seconds).
    A powered-off machine's journal is read from its disk."""
    args = ["-u", unit, "--since", f"@{since:.0f}", "-o", "short-unix", "--no-pager", "-q"]
    machine = fleet.machines[host]
    if machine.pid1 is None:
        out = subprocess.run(
            ["journalctl", f"--directory={machine.root / 'var/log/journal'}", *args],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    else:
        out = machine.exec(["journalctl", *args], check=False).stdout
    lines = []
    for line in out.splitlines():
        stamp, _, message = line.partition(" ")
        try:
            lines.append((float(stamp), message))
        except ValueError:
            continue
    return lines


def timespan_s(shown: str) -> float:
    """Seconds in a span as `systemctl show` prints it ("1min 30s", "500ms")."""
    units = {"h": 3600.0, "min": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    return sum(float(n) * units[u] for n, u in TIMESPAN_PART.findall(shown))


def events(lines: list[tuple[float, str]], name: str) -> list[tuple[float, str]]:
    return [(t, m) for t, m in lines if (e := EVENT.search(m)) and e["event"] == name]


def beating_workers(fleet: Fleet, host: str) -> set[str]:
    """The stages of ``host`` whose workers have a live heartbeat hash."""
    shown = fleet.machines["orch"].exec(["/usr/local/bin/audio-pipeline", "status", "--json"])
    status = json.loads(shown.stdout)
    return {
        w["stage"]
        for w in status["workers"]
        if w["host"] == host and w["heartbeat_age_s"] is not None
    }


def batch_row(fleet: Fleet, batch_id: str) -> dict[str, str]:
    rows = fleet.sql(
        "SELECT status, coalesce(unpack_host, ''), "
        "extract(epoch FROM created_at), extract(epoch FROM coalesce(completed_at, now())) "
        f"FROM batches WHERE batch_id = '{batch_id}'"
    )
    if not rows:
        return {}
    status, host, created, completed = rows[0]
    return {"status": status, "unpack_host": host, "created": created, "completed": completed}


def submit(
    fleet: Fleet, batch_id: str, files: int, seed: int, seconds: tuple[float, float]
) -> None:
    """A batch dropped on the collection host, as the journeys drop theirs."""
    batch = sample.make_speech_batch(
        fleet.work / "outgoing",
        batch_id,
        n_files=files,
        seed=seed,
        min_seconds=seconds[0],
        max_seconds=seconds[1],
    )
    lab.drop_on_collection_host(fleet, batch.tar_path)


def submit_unpacked_on_gpu_01(
    fleet: Fleet, batch_id: str, files: int, seed: int, seconds: tuple[float, float]
) -> None:
    """A batch whose unpack gpu-01 claims: gpu-02's unpack worker sits out until then,
    so gpu-01 holds the batch's files (the unpack queues them on its own host)."""
    new = fleet.machines[NEW_GPU]
    new.exec(["systemctl", "stop", "unpack-worker"])
    try:
        submit(fleet, batch_id, files, seed, seconds)
        wait_until(
            f"{batch_id} unpacking on {OLD_GPU}",
            lambda: batch_row(fleet, batch_id).get("unpack_host") == OLD_GPU,
            BATCH_TIMEOUT_S,
            poll_s=1,
        )
    finally:
        new.exec(["systemctl", "start", "unpack-worker"])


def wait_until(what: str, check: object, timeout_s: float, poll_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(poll_s)


def wait_batch_done(fleet: Fleet, batch_id: str, files: int) -> None:
    fleet.wait_for_batch(batch_id, files, BATCH_TIMEOUT_S)
    wait_until(
        f"{batch_id} marked done",
        lambda: batch_row(fleet, batch_id).get("status") == "done",
        60,
    )


def assert_every_file_done_once(fleet: Fleet, batch_id: str, files: int) -> None:
    """Every row done, one transcript each, no classification twice, nothing left in
    a queue, a processing list or the dead letters."""
    by_status = fleet.sql(
        f"SELECT status, count(*) FROM audio_files WHERE batch_id = '{batch_id}' GROUP BY status"
    )
    assert by_status == [["done", str(files)]], by_status
    transcripts = fleet.sql(
        "SELECT count(*), count(DISTINCT t.audio_id) FROM transcripts t "
        f"JOIN audio_files a ON a.id = t.audio_id WHERE a.batch_id = '{batch_id}'"
    )
    assert transcripts == [[str(files), str(files)]], transcripts
    doubled = fleet.sql(
        "SELECT c.audio_id, c.policy_id FROM classifications c "
        f"JOIN audio_files a ON a.id = c.audio_id WHERE a.batch_id = '{batch_id}' "
        "GROUP BY c.audio_id, c.policy_id HAVING count(*) > 1"
    )
    assert doubled == [], doubled
    assert fleet.sql(f"SELECT status, files_failed FROM batches WHERE batch_id = '{batch_id}'") == [
        ["done", "0"]
    ]
    assert redis_cli(fleet, "LLEN", "queue:failed") == "0"
    leftovers = redis_cli(fleet, "--scan", "--pattern", "processing:*")
    nonempty = [k for k in leftovers.split() if redis_cli(fleet, "LLEN", k) != "0"]
    assert nonempty == [], nonempty
    for queue in (
        "queue:unpack",
        "queue:transcribe",
        *(f"queue:transcribe:{h}" for h in WORKER_UNITS),
    ):
        assert redis_cli(fleet, "LLEN", queue) == "0", queue


# 1. A GPU host joins ------------------------------------------------------------
def test_a_gpu_host_joins_with_setup_new_worker(fleet: Fleet) -> None:
    """The guide's scaling up: the inventory gains gpu-02, then
    `setup-new-worker.yml --limit gpu-02` takes it from a bare OS to beating
    workers, touching no other host (the last test's health check counts it in).
    The new host registered its targets itself: Prometheus scrapes its node_exporter
    and both workers with no run on the orchestrator."""
    if NEW_GPU not in fleet.machines:
        lab.join_gpu_host(fleet, NEW_GPU)
    run = fleet.playbook("setup-new-worker.yml", "--limit", NEW_GPU)
    assert run.returncode == 0, run.describe()
    assert set(run.recap) == {NEW_GPU}, run.describe()
    assert run.recap[NEW_GPU]["failed"] == 0, run.describe()
    machine = fleet.machines[NEW_GPU]
    for unit in GPU_UNITS:
        state = machine.exec(["systemctl", "is-active", unit], check=False).stdout.strip()
        assert state == "active", (unit, fleet.journal(NEW_GPU, unit))
    wait_until(
        f"{NEW_GPU}'s workers beating",
        lambda: beating_workers(fleet, NEW_GPU) == {"unpack", "gpu"},
        JOINED_TIMEOUT_S,
        poll_s=5,
    )
    wanted = {(job, NEW_GPU) for job in ("node", "gpu-worker", "unpack-worker")}
    wait_until(
        f"Prometheus scraping {NEW_GPU}",
        lambda: wanted <= prometheus.targets_up(fleet),
        JOINED_TIMEOUT_S,
        poll_s=5,
    )


# 2. A deploy costs nothing -------------------------------------------------------
def test_a_deploy_during_a_batch_retries_nothing(fleet: Fleet) -> None:
    """deploy-pipeline.yml while a batch is in flight (a setting changed, so every
    worker restarts, the GPU hosts one at a time): the batch completes, every job
    ran on its first attempt, and nothing was dead-lettered, though gpu-01's gpu
    worker was restarted with a claim in hand."""
    batch_id = "fleet-deploy-" + secrets.token_hex(3)
    since = time.time()
    # The restart must meet work in hand, however fast this machine transcribes
    # compared with how long the deploy takes to reach gpu-01's handlers. So gpu-01's
    # gpu worker sits out until the deploy starts it (its play's "Start the workers"
    # waits for the model to load), with the whole batch queued for it; the play's
    # handlers restart it seconds later, in the middle of its first claims.
    held = fleet.machines[OLD_GPU]
    held.exec(["systemctl", "stop", "gpu-worker"])
    try:
        submit_unpacked_on_gpu_01(
            fleet, batch_id, DEPLOY_BATCH_FILES, seed=11, seconds=DEPLOY_FILE_SECONDS
        )
        wait_until(
            f"{batch_id}'s files queued for {OLD_GPU}",
            lambda: (
                redis_cli(fleet, "LLEN", f"queue:transcribe:{OLD_GPU}") == str(DEPLOY_BATCH_FILES)
            ),
            BATCH_TIMEOUT_S,
            poll_s=1,
        )
    except BaseException:
        held.exec(["systemctl", "start", "gpu-worker"])
        raise
    # A setting only this deploy carries: every worker's environment changes, so the
    # deploy restarts each of them, as a release does.
    mark = {"FLEET_DEPLOY_MARK": secrets.token_hex(4)}
    run = fleet.playbook(
        "deploy-pipeline.yml",
        "-e",
        json.dumps({"gpu_worker_extra_env": mark, "transfer_extra_env": mark}),
    )
    assert run.returncode == 0, run.describe()
    wait_batch_done(fleet, batch_id, DEPLOY_BATCH_FILES)
    assert_every_file_done_once(fleet, batch_id, DEPLOY_BATCH_FILES)

    row = batch_row(fleet, batch_id)
    stops_in_flight = []
    for host, units in WORKER_UNITS.items():
        for unit in units:
            lines = journal_since(fleet, host, unit, since)
            stops = events(lines, "worker.stop_requested")
            assert stops, f"the deploy did not restart {host} {unit}"
            stops_in_flight += [
                (host, unit, m)
                for t, m in stops
                if float(row["created"]) <= t <= float(row["completed"])
            ]
            for name in RETRY_EVENTS:
                assert events(lines, name) == [], (host, unit, name, events(lines, name))
            # queue workers say which attempt a job is on (the transfer worker has none)
            later = [m for _, m in events(lines, "job.started") if LATER_ATTEMPT.search(m)]
            assert later == [], (host, unit, later)
    print(f"restarts while {batch_id} was in flight:", *stops_in_flight, sep="\n  ")
    in_hand = [s for s in stops_in_flight if s[0] == OLD_GPU and IN_HAND.search(s[2])]
    assert in_hand, "the deploy restarted no gpu-01 worker while it held the batch's work"


# 3. A hung worker is restarted by systemd's watchdog -----------------------------
def test_a_frozen_gpu_worker_is_restarted_by_its_watchdog(fleet: Fleet) -> None:
    """gpu-worker's main process frozen (SIGSTOP): it stops feeding the watchdog,
    systemd kills it and starts a new one."""
    props = unit_props(fleet, OLD_GPU, "gpu-worker", "WatchdogUSec", "MainPID", "NRestarts")
    assert props.get("WatchdogUSec", "0") not in {"0", "infinity", ""}, "no WatchdogSec"
    assert timespan_s(props["WatchdogUSec"]) == lab.GPU_WORKER_WATCHDOG_S, props
    frozen, restarts = props["MainPID"], int(props["NRestarts"])
    assert frozen != "0", props
    since = time.time()
    fleet.machines[OLD_GPU].exec(["kill", "-STOP", frozen])

    def restarted() -> bool:
        now = unit_props(fleet, OLD_GPU, "gpu-worker", "MainPID", "NRestarts", "ActiveState")
        return (
            int(now["NRestarts"]) > restarts
            and now["MainPID"] not in {"0", frozen}
            and now["ActiveState"] == "active"
        )

    # the watchdog's limit, systemd's RestartSec and the new worker's start
    wait_until(
        "gpu-worker restarted by its watchdog", restarted, 4 * lab.GPU_WORKER_WATCHDOG_S + 60
    )
    lines = [m for _, m in journal_since(fleet, OLD_GPU, "gpu-worker", since)]
    assert any("watchdog" in m.lower() for m in lines), "\n".join(lines[-40:])
    wait_until(
        "the restarted gpu-worker beating",
        lambda: "gpu" in beating_workers(fleet, OLD_GPU),
        JOINED_TIMEOUT_S,
        poll_s=5,
    )


# 4. A lost GPU host --------------------------------------------------------------
def test_a_lost_gpu_host_s_batch_completes_on_the_other(fleet: Fleet) -> None:
    """gpu-01 is powered off while its files wait in queue:transcribe:gpu-01: the
    reaper hands its claim back and, once no worker of gpu-01 has beaten for the
    TTL, moves its host queue to the shared one; gpu-02 fetches the Opus files from
    S3 and finishes the batch. The health check then fails, naming gpu-01."""
    batch_id = "fleet-lost-" + secrets.token_hex(3)
    submit_unpacked_on_gpu_01(fleet, batch_id, LOST_BATCH_FILES, seed=13, seconds=LOST_FILE_SECONDS)
    wait_until(
        f"files queued on queue:transcribe:{OLD_GPU}",
        lambda: redis_cli(fleet, "LLEN", f"queue:transcribe:{OLD_GPU}") not in {"0", ""},
        BATCH_TIMEOUT_S,
        poll_s=POLL_S,
    )
    lost_at = time.time()
    lab.power_off(fleet, OLD_GPU)
    done_before = {
        r[0]
        for r in fleet.sql(
            "SELECT a.id FROM audio_files a JOIN transcripts t ON t.audio_id = a.id "
            f"WHERE a.batch_id = '{batch_id}'"
        )
    }
    assert len(done_before) < LOST_BATCH_FILES

    wait_batch_done(fleet, batch_id, LOST_BATCH_FILES)
    assert_every_file_done_once(fleet, batch_id, LOST_BATCH_FILES)
    hosts = dict(fleet.sql(f"SELECT id::text, host FROM audio_files WHERE batch_id = '{batch_id}'"))
    assert {h for i, h in hosts.items() if i not in done_before} == {NEW_GPU}, hosts
    # The reaper's moves, logged by whichever live worker ran it.
    reaper_lines = [
        m
        for host, units in WORKER_UNITS.items()
        if host != OLD_GPU
        for unit in units
        for _, m in journal_since(fleet, host, unit, lost_at)
    ]
    assert any("event=queue.host_lost" in m and f"host={OLD_GPU}" in m for m in reaper_lines), (
        "\n".join(reaper_lines[-40:])
    )
    print(*(m for m in reaper_lines if "event=reaper." in m or "event=queue." in m), sep="\n")
    unpacked_again = [
        m
        for _, m in events(journal_since(fleet, NEW_GPU, "unpack-worker", lost_at), "job.started")
        if f"batch_id={batch_id}" in m
    ]
    if unpacked_again:
        # Lost before its unpack job was settled: the reaper gave it to gpu-02's
        # unpack worker, which queued only what was not yet transcribed.
        assert any(
            "event=reaper.returned" in m and "queue=queue:unpack" in m for m in reaper_lines
        ), "\n".join(reaper_lines[-40:])

    health = fleet.playbook("health-check.yml")
    assert health.returncode != 0, health.describe()
    assert f"{OLD_GPU}: unreachable, not checked" in health.output, health.describe()
    assert f"{OLD_GPU}: no heartbeat from any of its workers" in health.output, health.describe()
    assert f"{NEW_GPU}: " not in health.output.split("Everything healthy", 1)[-1], health.describe()
