"""The reference guide's "Common Operations" and "Troubleshooting" commands, run on the
converged fleet in the form docs/FLEET.md gives them ("The guide's commands on this
fleet"): as written where they work, otherwise the working form beside them.

The session's fleet (conftest.py) is shared with test_fleet.py, which runs first.
Order matters here, so the tests run in file order:
1. read-only commands, one parametrized test each (test_guide_command);
2. the commands that change the fleet, each putting back what it changed: the
   emergency stop (workers started again), the gpu worker run by hand, the scratch
   cleanup, the rollback to the commit the fleet runs (must change nothing), the
   out-of-memory batch sizes (deployed, then deployed back), setup-new-worker on a
   worker that is already set up (must change nothing);
3. the health check, which fails if any of that left the fleet less than whole.

The fleet's Ansible connection is nsenter as root, so `-b` (become) changes nothing
here; that a command needs it on a real fleet is argued in docs/FLEET.md from the
modes the roles set, not shown by this test.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from audio_pipeline import s3_utils
from tests.fleet import network
from tests.fleet.marks import NEEDS_FLEET

if TYPE_CHECKING:
    from tests.fleet.lab import Fleet, PlaybookRun

# Each command below has its own small limit besides the fleet's.
pytestmark = NEEDS_FLEET

TASK_TIMEOUT_S = 60  # per ad-hoc command (ansible --task-timeout)
WORKER_BY_HAND_TIMEOUT_S = 180  # loads the ASR model before it drains
GUNICORN_BY_HAND_TIMEOUT_S = 90
GPU = "gpu-01"
# What the read-only commands find: an archive in S3 as the guide's `test.tar`, and
# batch directories in scratch, one untouched for three days.
TEST_ARCHIVE_KEY = "archives/test.tar"
TEST_ARCHIVE_BYTES = 4 * 2**20
SCRATCH = "/data/scratch"
PROBE_OLD = f"{SCRATCH}/guide-probe-old"
PROBE_NEW = f"{SCRATCH}/guide-probe-new"
PIPELINE_ENV = "/etc/audio-pipeline/pipeline.env"
TRANSFER_ENV = "/etc/audio-pipeline/transfer.env"
AP = "/opt/audio-pipeline/venv/bin/audio-pipeline"
WITH_ENV = "systemd-run --quiet --pipe --wait --collect -p User=audio -p EnvironmentFile="
BOTO3_SNIPPET = """
import boto3
from botocore.config import Config
import os
client = boto3.client('s3',
    endpoint_url=os.environ.get('S3_ENDPOINT'),
    aws_access_key_id=os.environ.get('S3_ACCESS_KEY'),
    aws_secret_access_key=os.environ.get('S3_SECRET_KEY'),
    config=Config(signature_version='s3v4', s3={'addressing_style': 'path'}))
print(client.list_objects_v2(Bucket=os.environ.get('S3_BUCKET'), MaxKeys=1))
"""
GUNICORN = "/opt/ra-app/venv/bin/gunicorn --config /opt/ra-app/src/ra_app/gunicorn.conf.py"
RA_APP_UNIT_ENV = (
    "-p User=audio -p WorkingDirectory=/opt/ra-app -p EnvironmentFile=/etc/ra-app/ra-app.env"
)
ARCHIVES_COUNT = r"[1-9]\d* object\(s\), \d+ bytes under s3://fleet-[0-9a-f]+/archives/"


@dataclass(frozen=True)
class Command:
    """One working form: ``ansible PATTERN ARGS...``; every regex in ``expect`` must
    be found in its output, none in ``absent``."""

    pattern: str
    args: tuple[str, ...]
    expect: tuple[str, ...]
    absent: tuple[str, ...] = ()
    timeout_s: int = TASK_TIMEOUT_S
    after: Command | None = None  # the guide's next step, run and checked in turn


# Keyed by the guide's section and what the command checks; docs/FLEET.md has the
# same rows, with the guide's command as written and why it changed.
# fmt: off
READ_ONLY: dict[str, Command] = {
    # -- Daily Health Check ------------------------------------------------------
    "daily-llen-unpack": Command(
        "orchestrator", ("-a", "redis-cli LLEN queue:unpack"), (r"(?m)^\d+$",)
    ),
    "daily-llen-host-queue": Command(
        "orchestrator", ("-a", f"redis-cli LLEN queue:transcribe:{GPU}"), (r"(?m)^\d+$",)
    ),
    "daily-status-every-queue": Command(
        "orchestrator", ("-a", "audio-pipeline status"),
        (r"QUEUES", r"queue:transcribe\s+\d+", rf"gpu:{GPU}:\d+", rf"unpack:{GPU}:\d+",
         r"transfer:transfer-01:\d+"),
    ),
    "daily-s3-count-transfer": Command(
        "transfer", ("-b", "-a", f"{AP} s3 ls archives/ --count --env-file {TRANSFER_ENV}"),
        (ARCHIVES_COUNT,),
    ),
    "daily-s3-count-orchestrator": Command(
        "orchestrator", ("-a", "audio-pipeline s3 ls archives/ --count"), (ARCHIVES_COUNT,)
    ),
    "daily-s3-list": Command(
        "transfer", ("-b", "-a", f"{AP} s3 ls archives/ --env-file {TRANSFER_ENV}"),
        (rf"(?m)^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d +{TEST_ARCHIVE_BYTES} {TEST_ARCHIVE_KEY}$",),
    ),
    "daily-scratch-usage": Command(
        "gpu_workers", ("-b", "-a", f"du -h --max-depth=1 {SCRATCH}"),
        (rf"(?m)\s{PROBE_OLD}$", rf"(?m)\s{SCRATCH}$"),
    ),
    "daily-flagged-count": Command(
        "orchestrator", ("-a", 'psql -d audio_pipeline -c "SELECT COUNT(*) FROM ra_queue"'),
        (r"(?m)^\s*count\s*$", r"\(1 row\)"),
    ),
    # -- GPU Worker Won't Start ----------------------------------------------------
    "gpu-journal": Command(
        GPU, ("-b", "-a", "journalctl -u gpu-worker -n 100 --no-pager"),
        (r"gpu-worker\[\d+\]: level=\w+ logger=",),
    ),
    "gpu-ssh-venv-cuda": Command(
        GPU, ("-m", "shell", "-a", "cd /opt/audio-pipeline && . venv/bin/activate && "
              "python -c 'import ctranslate2; print(ctranslate2.get_cuda_device_count())'"),
        (r"(?m)^\d+$",),
    ),
    "gpu-import": Command(
        GPU, ("-a", "/opt/audio-pipeline/venv/bin/python -c "
              "'import audio_pipeline.workers.gpu_worker as w; print(w.__file__)'"),
        (r"/opt/audio-pipeline/venv/lib/python3\.11/site-packages/audio_pipeline/workers/"
         r"gpu_worker\.py",),
    ),
    "gpu-models": Command(
        GPU, ("-b", "-a", "ls -la /data/models/"),
        (r"(?m)^drwxr-x---\s+\d+\s+root\s+audio\s.*\s\.$",
         r"(?m)^drwxr-x---\s+\d+\s+root\s+audio\s.*\swhisper$"),
    ),
    # -- S3 Connection Issues ----------------------------------------------------
    "s3-transfer-check-connections": Command(
        "transfer", ("-b", "-a", f"{WITH_ENV}{TRANSFER_ENV} {AP} check-connections"),
        (r"(?m)^redis\s+ok\s", r"(?m)^postgres\s+ok\s.*SELECT 1 as pipeline",
         r"(?m)^s3\s+ok\s.*HeadBucket"),
    ),
    "s3-transfer-s3-utils": Command(
        "transfer", ("-b", "-a", f"{WITH_ENV}{TRANSFER_ENV} /opt/audio-pipeline/venv/bin/python "
                     "-c 'from audio_pipeline.s3_utils import get_s3_client; "
                     "print(get_s3_client().list_buckets())'"),
        (r"'Name': 'fleet-[0-9a-f]+'",),
    ),
    "s3-gpu-boto3": Command(
        GPU, ("-b", "-a", f'{WITH_ENV}{PIPELINE_ENV} /usr/bin/python3 -c "{BOTO3_SNIPPET}"'),
        (r"'HTTPStatusCode': 200", r"'KeyCount': 1"),
    ),
    # -- Queue Building Up -------------------------------------------------------
    "queue-s3-download-speed": Command(
        GPU,
        ("-b", "-a", f"{AP} s3 get {TEST_ARCHIVE_KEY} /tmp/test.tar --env-file {PIPELINE_ENV}"),
        (rf"{TEST_ARCHIVE_KEY} -> /tmp/test\.tar: {TEST_ARCHIVE_BYTES} bytes in [\d.]+ s "
         r"\([\d.]+ MB/s\), sha256 verified",),
        # rm fails unless the download left exactly that file
        after=Command(GPU, ("-b", "-a", "rm /tmp/test.tar"), (rf"{GPU} \| CHANGED \| rc=0",)),
    ),
    "queue-llen-failed": Command(
        "orchestrator", ("-a", "redis-cli LLEN queue:failed"), (r"(?m)^\d+$",)
    ),
    "queue-failed-list": Command(
        "orchestrator", ("-a", "audio-pipeline failed"),
        (r"queue:failed is empty|dead letters shown",),
    ),
    # -- Scratch Space Full ------------------------------------------------------
    "scratch-df": Command("gpu_workers", ("-a", "df -h /data"), (r"(?m)\s/data$",)),
    "scratch-du-largest": Command(
        "gpu_workers",
        ("-b", "-m", "shell", "-a", f"du -sh {SCRATCH}/* 2>/dev/null | sort -rh | head -20"),
        (rf"(?m)^\S+\s+{PROBE_OLD}$",),
    ),
    "scratch-stuck-batches": Command(
        "gpu_workers", ("-b", "-a", f"find {SCRATCH} -mindepth 1 -maxdepth 1 -type d -mtime +1"),
        (rf"(?m)^{PROBE_OLD}$",),
        # scratch itself is three days old too (the fixture), and must not be listed
        absent=(rf"(?m)^{SCRATCH}$", rf"(?m)^{PROBE_NEW}$"),
    ),
    # -- Database Connection Issues ----------------------------------------------
    "db-check-connections": Command(
        GPU, ("-b", "-a", f"{WITH_ENV}{PIPELINE_ENV} {AP} check-connections"),
        (r"(?m)^postgres\s+ok\s.*SELECT 1 as pipeline",),
    ),
    "db-pg-hba": Command(
        "orchestrator", ("-b", "-a", "cat /etc/postgresql/15/main/pg_hba.conf"),
        (r"scram-sha-256", re.escape(network.FLEET_CIDR)),
    ),
    "db-listening": Command(
        "orchestrator", ("-b", "-m", "shell", "-a", "ss -tlnp | grep 5432"),
        (r"127\.0\.0\.1:5432", re.escape(f"{network.ADDRESSES['orch']}:5432"), r'"postgres"'),
    ),
    # -- RA App Not Loading ------------------------------------------------------
    "ra-status": Command(
        "orchestrator", ("-a", "systemctl status ra-app"), (r"Active: active \(running\)",)
    ),
    "ra-error-log": Command(
        "orchestrator", ("-b", "-a", "tail -50 /opt/ra-app/logs/error.log"),
        (r"\[\d+\] \[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\] ",),
    ),
    "ra-journal": Command(
        "orchestrator", ("-b", "-a", "journalctl -u ra-app -n 50 --no-pager"),
        (r"ra-app\[\d+\]: ",),
    ),
    "ra-ssh-venv": Command(
        "orchestrator",
        ("-m", "shell", "-a", "cd /opt/ra-app && . venv/bin/activate && command -v gunicorn"),
        (r"(?m)^/opt/ra-app/venv/bin/gunicorn$",),
    ),
    "ra-gunicorn-config": Command(
        "orchestrator",
        ("-b", "-a", f"systemd-run --quiet --pipe --wait --collect {RA_APP_UNIT_ENV} "
         f"{GUNICORN} --print-config 'ra_app:create_app()'"),
        (r"(?m)^worker_class\s+= gthread$", r"(?m)^bind\s+= \['127\.0\.0\.1:8000'\]$"),
    ),
    "ra-gunicorn-by-hand": Command(
        "orchestrator",
        ("-b", "-m", "shell", "-a",
         f"systemd-run --quiet --collect --unit=ra-app-manual {RA_APP_UNIT_ENV} {GUNICORN} "
         "--bind 127.0.0.1:8001 --workers 1 'ra_app:create_app()' && "
         "curl -sS --retry 30 --retry-connrefused --retry-delay 1 -f "
         "http://127.0.0.1:8001/healthz && systemctl stop ra-app-manual "
         "|| { systemctl stop ra-app-manual; false; }"),
        (r'"database":\s*"ok"',),
        timeout_s=GUNICORN_BY_HAND_TIMEOUT_S,
    ),
}
# fmt: on


def adhoc(fleet: Fleet, command: Command) -> PlaybookRun:
    return fleet.adhoc(command.pattern, *command.args, "--task-timeout", str(command.timeout_s))


def check(run: PlaybookRun, command: Command) -> None:
    assert run.returncode == 0, run.describe()
    for pattern in command.expect:
        assert re.search(pattern, run.output), f"{pattern!r} not found\n{run.describe()}"
    for pattern in command.absent:
        assert not re.search(pattern, run.output), f"{pattern!r} found\n{run.describe()}"


def on(fleet: Fleet, host: str, script: str) -> str:
    """A setup or inspection step (not a guide command), as root in ``host``."""
    return fleet.machines[host].exec(["sh", "-ec", script]).stdout


def unit_states(fleet: Fleet, host: str, *units: str) -> list[str]:
    proc = fleet.machines[host].exec(["systemctl", "is-active", *units], check=False)
    return proc.stdout.split()


def inventory_var(fleet: Fleet, host: str, name: str) -> str:
    assert fleet.inventory is not None
    inventory = yaml.safe_load(fleet.inventory.read_text())
    for group in inventory["all"]["children"].values():
        if host in (group.get("hosts") or {}):
            return str(group["hosts"][host][name])
    raise KeyError(f"{host} is not in {fleet.inventory}")


def systemd(fleet: Fleet, pattern: str, unit: str, state: str) -> PlaybookRun:
    """The guide's emergency-stop form: ``ansible PATTERN -m systemd -a "name=UNIT
    state=STATE" --become``."""
    return fleet.adhoc(
        pattern,
        "-m",
        "systemd",
        "-a",
        f"name={unit} state={state}",
        "--become",
        "--task-timeout",
        str(TASK_TIMEOUT_S),
    )


@pytest.fixture(scope="module")
def probes(fleet: Fleet) -> Iterator[None]:
    """What the read-only commands look at: the guide's test.tar in the bucket, and
    in scratch a batch directory three days old beside a fresh one, scratch itself
    three days old (so the guide's own find would list it)."""
    client = s3_utils.client_from_env(fleet.s3_env())
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "test.tar"
        archive.write_bytes(os.urandom(TEST_ARCHIVE_BYTES))
        s3_utils.upload_file(client, fleet.bucket, archive, TEST_ARCHIVE_KEY)
    on(
        fleet,
        GPU,
        f"""
        mkdir -p {PROBE_OLD} {PROBE_NEW}
        head -c 1048576 /dev/zero > {PROBE_OLD}/audio.opus
        chown -R audio:audio {PROBE_OLD} {PROBE_NEW}
        touch -d '3 days ago' {PROBE_OLD}/audio.opus {PROBE_OLD} {SCRATCH}
    """,
    )
    yield
    on(fleet, GPU, f"rm -rf {PROBE_OLD} {PROBE_NEW} /tmp/test.tar")
    client.delete_object(Bucket=fleet.bucket, Key=TEST_ARCHIVE_KEY)


# 1. Read-only ------------------------------------------------------------------
@pytest.mark.usefixtures("probes")
@pytest.mark.parametrize("name", list(READ_ONLY))
def test_guide_command(fleet: Fleet, name: str) -> None:
    command = READ_ONLY[name]
    if name == "ra-gunicorn-by-hand":
        # a unit left over from an interrupted run would block the name
        fleet.machines["orch"].exec(["systemctl", "stop", "ra-app-manual"], check=False)
    run = adhoc(fleet, command)
    if name == "ra-gunicorn-by-hand" and run.returncode != 0:
        print(fleet.journal("orch", "ra-app-manual", 40))
    check(run, command)
    if command.after is not None:
        check(adhoc(fleet, command.after), command.after)


# 2. Commands that change the fleet, each restoring it ----------------------------
WORKER_UNITS = (
    ("gpu_workers", "gpu-worker"),
    ("gpu_workers", "unpack-worker"),
    ("transfer", "transfer-worker"),
)


def test_emergency_stop_then_start_again(fleet: Fleet) -> None:
    """The guide's three stops, as written; then the same with state=started."""
    try:
        for pattern, unit in WORKER_UNITS:
            run = systemd(fleet, pattern, unit, "stopped")
            assert run.returncode == 0, run.describe()
            assert re.search(r"state['\"]?:\s*['\"]?stopped", run.output), run.describe()
        assert unit_states(fleet, GPU, "gpu-worker", "unpack-worker") == ["inactive"] * 2
        assert unit_states(fleet, "transfer-01", "transfer-worker") == ["inactive"]
    finally:
        started = [systemd(fleet, pattern, unit, "started") for pattern, unit in WORKER_UNITS]
    for run in started:
        assert run.returncode == 0, run.describe()
    assert unit_states(fleet, GPU, "gpu-worker", "unpack-worker") == ["active"] * 2
    assert unit_states(fleet, "transfer-01", "transfer-worker") == ["active"]


def test_gpu_worker_by_hand_while_its_unit_is_stopped(fleet: Fleet) -> None:
    """GPU Worker Won't Start, debugging by hand: the unit stopped, the worker run in
    the foreground by its module path with the unit's user and settings, until its
    queues are empty (--drain); then the unit started again."""
    stopped = systemd(fleet, GPU, "gpu-worker", "stopped")
    assert stopped.returncode == 0, stopped.describe()
    try:
        command = Command(
            GPU,
            (
                "-b",
                "-a",
                f"{WITH_ENV}{PIPELINE_ENV} /opt/audio-pipeline/venv/bin/python "
                "-m audio_pipeline.workers.gpu_worker --drain",
            ),
            (r"event=worker\.started stage=gpu", r"event=worker\.stopped .*exit_code=0"),
            timeout_s=WORKER_BY_HAND_TIMEOUT_S,
        )
        check(adhoc(fleet, command), command)
    finally:
        started = systemd(fleet, GPU, "gpu-worker", "started")
    assert started.returncode == 0, started.describe()
    assert unit_states(fleet, GPU, "gpu-worker") == ["active"]


def test_scratch_cleanup_keeps_scratch_and_fresh_batches(fleet: Fleet) -> None:
    """The cleanup's working form (only direct children of scratch), then
    cleanup-scratch.yml: old batch directories go; scratch and new ones stay."""
    old, old2, new = (f"{SCRATCH}/guide-cleanup-{n}" for n in ("old", "old2", "new"))
    setup = f"""
        mkdir -p {old}/nested {old2} {new}
        chown -R audio:audio {old} {old2} {new}
        touch -d '3 days ago' {old}/nested {old} {old2} {SCRATCH}
    """
    try:
        on(fleet, GPU, setup)
        command = Command(
            "gpu_workers",
            (
                "-b",
                "-a",
                f"find {SCRATCH} -mindepth 1 -maxdepth 1 -type d -mtime +1 -exec rm -rf {{}} +",
            ),
            (),
        )
        check(adhoc(fleet, command), command)
        left = on(fleet, GPU, f"ls -a {SCRATCH}; stat -c '%U:%G %a' {SCRATCH}").split()
        assert "guide-cleanup-old" not in left, left
        assert "guide-cleanup-old2" not in left, left
        assert "guide-cleanup-new" in left, left
        assert left[-2:] == ["audio:audio", "750"], "scratch itself must stay as the role made it"

        on(fleet, GPU, setup)
        run = fleet.playbook("cleanup-scratch.yml")
        assert run.returncode == 0, run.describe()
        assert re.search(r"guide-cleanup-old\b", run.output), run.describe()
        left = on(fleet, GPU, f"ls -a {SCRATCH}").split()
        assert "guide-cleanup-old" not in left, left
        assert "guide-cleanup-old2" not in left, left
        assert "guide-cleanup-new" in left, left
    finally:
        on(fleet, GPU, f"rm -rf {old} {old2} {new}")


def test_rollback_to_the_running_commit_changes_nothing(fleet: Fleet) -> None:
    """The guide's rollback, `-e pipeline_version=abc123def`, with the (abbreviated)
    commit the fleet already runs: nothing is reinstalled or restarted anywhere."""
    commit = inventory_var(fleet, GPU, "pipeline_version")
    run = fleet.playbook("deploy-pipeline.yml", "-e", f"pipeline_version={commit[:9]}")
    assert run.returncode == 0, run.describe()
    assert set(run.recap) == {"orch", GPU, "transfer-01"}, run.describe()
    assert {h: r["changed"] for h, r in run.recap.items()} == dict.fromkeys(run.recap, 0), (
        run.describe()
    )
    src = on(fleet, GPU, "readlink /opt/audio-pipeline/src").strip()
    assert src.endswith(commit), src


def _batch_sizes(fleet: Fleet) -> dict[str, str]:
    """ASR_BATCH_SIZE and CLASSIFIER_BATCH_SIZE as the running gpu-worker has them."""
    environ = on(
        fleet,
        GPU,
        "tr '\\0' '\\n' < /proc/$(systemctl show -p MainPID --value gpu-worker)/environ",
    )
    pairs = (line.split("=", 1) for line in environ.splitlines() if "=" in line)
    return {k: v for k, v in pairs if k in {"ASR_BATCH_SIZE", "CLASSIFIER_BATCH_SIZE"}}


def test_cuda_out_of_memory_batch_sizes_reach_the_gpu_worker(fleet: Fleet) -> None:
    """CUDA out of memory: lower gpu_worker_asr_batch_size and
    gpu_worker_classifier_batch_size and deploy; the restarted gpu-worker runs with
    them. Then deployed back to the inventory's values."""
    before = _batch_sizes(fleet)
    assert set(before) == {"ASR_BATCH_SIZE", "CLASSIFIER_BATCH_SIZE"}, before
    lowered = '{"gpu_worker_asr_batch_size": 2, "gpu_worker_classifier_batch_size": 1}'
    try:
        run = fleet.playbook("deploy-pipeline.yml", "--limit", GPU, "-e", lowered)
        assert run.returncode == 0, run.describe()
        assert run.recap[GPU]["changed"] >= 1, run.describe()
        rendered = fleet.adhoc(
            GPU,
            "-b",
            "-a",
            f"grep -E '^(ASR|CLASSIFIER)_BATCH_SIZE=' {PIPELINE_ENV}",
            "--task-timeout",
            str(TASK_TIMEOUT_S),
        )
        assert 'ASR_BATCH_SIZE="2"' in rendered.output, rendered.describe()
        assert 'CLASSIFIER_BATCH_SIZE="1"' in rendered.output, rendered.describe()
        assert _batch_sizes(fleet) == {"ASR_BATCH_SIZE": "2", "CLASSIFIER_BATCH_SIZE": "1"}
    finally:
        restored = fleet.playbook("deploy-pipeline.yml", "--limit", GPU)
    assert restored.returncode == 0, restored.describe()
    assert _batch_sizes(fleet) == before
    assert unit_states(fleet, GPU, "gpu-worker", "unpack-worker") == ["active"] * 2


def test_setup_new_worker_on_a_configured_worker_changes_nothing(fleet: Fleet) -> None:
    """Scaling up: setup-new-worker.yml --limit HOST. On a worker that is already
    set up it must change nothing (its volume is never formatted again)."""
    run = fleet.playbook("setup-new-worker.yml", "--limit", GPU)
    assert run.returncode == 0, run.describe()
    assert run.recap == {
        GPU: {"ok": run.recap[GPU]["ok"], "changed": 0, "unreachable": 0, "failed": 0}
    }, run.describe()


# 3. The fleet is whole again -----------------------------------------------------
def test_health_check_after_the_guides_commands(fleet: Fleet) -> None:
    run = fleet.playbook("health-check.yml")
    assert run.returncode == 0, run.describe()
    assert "No problems found." in run.output, run.describe()
