"""The fleet converged for real: site.yml on three systemd-nspawn machines.

One session-scoped fleet (see conftest.py); the tests below judge it in order:
convergence and idempotence, the services and their security, the guide's
operator commands, then a batch from the collection host to rows in PostgreSQL
through the converged workers, as the health-check playbook reports it.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import TYPE_CHECKING

import psycopg
import pytest
import redis

from audio_pipeline import sample

if TYPE_CHECKING:
    from conftest import Fleet


# The fixture converges three machines from bare Debian (cold: ~9 min for the
# first run, pip installs included), beyond the suite's default 600 s timeout.
pytestmark = [
    pytest.mark.fleet,
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.timeout(1800),
]

SERVICES = {
    "orch": ["redis-server", "postgresql@15-main", "ra-app"],
    "gpu-01": ["unpack-worker", "gpu-worker"],
    "transfer-01": ["transfer-worker"],
}
BATCH_FILES = 4
BATCH_TIMEOUT_S = 420


def test_site_converges(fleet: Fleet) -> None:
    run = fleet.first_run
    assert run is not None
    assert run.returncode == 0, run.describe()
    assert set(run.recap) == set(SERVICES), run.recap
    assert all(r["failed"] == 0 and r["unreachable"] == 0 for r in run.recap.values())


def test_second_run_changes_nothing(fleet: Fleet) -> None:
    run = fleet.second_run
    assert run is not None, "the first run failed"
    assert run.returncode == 0, run.describe()
    changed = {host: r["changed"] for host, r in run.recap.items()}
    assert changed == dict.fromkeys(SERVICES, 0), run.describe()


@pytest.mark.parametrize("host", sorted(SERVICES))
def test_services_active_and_enabled(fleet: Fleet, host: str) -> None:
    machine = fleet.machines[host]
    for unit in SERVICES[host]:
        active = machine.exec(["systemctl", "is-active", unit], check=False).stdout.strip()
        enabled = machine.exec(["systemctl", "is-enabled", unit], check=False).stdout.strip()
        assert (active, enabled) == ("active", "enabled"), (
            unit,
            machine.exec(["journalctl", "-u", unit, "-n", "40", "--no-pager"], check=False).stdout,
        )


@pytest.mark.parametrize(
    ("host", "unit"),
    [("gpu-01", "gpu-worker"), ("gpu-01", "unpack-worker"), ("transfer-01", "transfer-worker"),
     ("orch", "ra-app")],
)  # fmt: skip
def test_units_are_sandboxed_and_restart_on_failure(fleet: Fleet, host: str, unit: str) -> None:
    wanted = "NoNewPrivileges,ProtectSystem,PrivateTmp,Restart,TimeoutStopUSec,User,"
    wanted += "ReadWritePaths,KillSignal"
    shown = fleet.machines[host].exec(["systemctl", "show", unit, "-p", wanted]).stdout
    props = dict(line.split("=", 1) for line in shown.splitlines())
    assert props["NoNewPrivileges"] == "yes"
    assert props["ProtectSystem"] == "strict"
    assert props["PrivateTmp"] == "yes"
    assert props["Restart"] == "on-failure"
    assert props["User"] == "audio"
    assert props["KillSignal"] == "15"
    assert props["TimeoutStopUSec"] not in {"", "0"}
    if unit != "ra-app":
        assert props["ReadWritePaths"] == "/data/scratch"


def test_redis_requires_its_password(fleet: Fleet) -> None:
    anonymous = redis.Redis(host="127.0.0.1", port=fleet.redis_port, socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(
            host="127.0.0.1", port=fleet.redis_port, password="wrong", socket_timeout=5
        ).ping()
    authed = redis.Redis(
        host="127.0.0.1", port=fleet.redis_port, socket_timeout=5,
        password=fleet.secrets["vault_redis_password"],
    )  # fmt: skip
    assert authed.ping()
    assert authed.config_get("appendonly")["appendonly"] == "yes"


def test_postgres_refuses_a_wrong_password(fleet: Fleet) -> None:
    base = f"host=127.0.0.1 port={fleet.postgres_port} dbname=audio_pipeline connect_timeout=5"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(f"{base} user=pipeline password=wrong")
    # the superuser has no network entry in pg_hba at all: refused before any password
    with pytest.raises(psycopg.OperationalError, match=r'no pg_hba\.conf entry .* user "postgres"'):
        psycopg.connect(f"{base} user=postgres password=wrong")
    with psycopg.connect(
        f"{base} user=pipeline password={fleet.secrets['vault_postgres_password']}"
    ) as conn:
        method = conn.execute("SHOW password_encryption").fetchone()
        assert method == ("scram-sha-256",)


def test_ownership_model(fleet: Fleet) -> None:
    """The pipeline owns its tables; the RA app reads them and cannot write them."""
    base = f"host=127.0.0.1 port={fleet.postgres_port} dbname=audio_pipeline"
    with psycopg.connect(
        f"{base} user=pipeline password={fleet.secrets['vault_postgres_password']}"
    ) as c:
        owners = dict(
            c.execute(
                "SELECT tablename, tableowner FROM pg_tables WHERE schemaname='public'"
            ).fetchall()
        )
    assert owners["audio_files"] == "pipeline"
    assert owners.get("ra_users") == "ra_app", "the RA app's migrations own its tables"
    with psycopg.connect(
        f"{base} user=ra_app password={fleet.secrets['vault_ra_app_db_password']}"
    ) as c:
        c.execute("SELECT count(*) FROM ra_queue").fetchone()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("INSERT INTO policies (name, version, text) VALUES ('x', 1, 'x')")


def test_ra_app_answers_healthz(fleet: Fleet) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{fleet.ra_app_port}/healthz", timeout=10) as r:
        assert r.status == 200
        json.loads(r.read())
    log = fleet.machines["orch"].exec(["cat", "/opt/ra-app/logs/error.log"]).stdout
    assert "Booting worker" in log or "Listening at" in log


def test_guides_operator_commands(fleet: Fleet) -> None:
    """Ad-hoc commands from the guide, as written, through the fleet's inventory."""
    llen = fleet.adhoc("orchestrator", "-a", "redis-cli LLEN queue:unpack")
    assert llen.returncode == 0, llen.describe()
    assert llen.output.strip().splitlines()[-1].strip().isdigit(), llen.describe()
    flagged = fleet.adhoc(
        "orchestrator", "-a", 'psql -d audio_pipeline -c "SELECT COUNT(*) FROM ra_queue"'
    )
    assert flagged.returncode == 0, flagged.describe()
    assert "count" in flagged.output, flagged.describe()
    df = fleet.adhoc("gpu_workers", "-a", "df -h /data")
    assert df.returncode == 0, df.describe()
    assert "/data" in df.output, df.describe()
    status = fleet.adhoc("gpu_workers", "-a", "systemctl status gpu-worker")
    assert status.returncode == 0, status.describe()
    boto = fleet.adhoc("gpu_workers", "-a", "python3 -c \"import boto3; print('S3 OK')\"")
    assert boto.returncode == 0, boto.describe()
    assert "S3 OK" in boto.output, boto.describe()
    logs = fleet.adhoc("gpu-01", "-a", "journalctl -u gpu-worker -n 50 --no-pager")
    assert logs.returncode == 0, logs.describe()


def test_batch_flows_through_the_fleet(fleet: Fleet) -> None:
    """A batch dropped on the collection host ends as transcripts and classifications."""
    base = f"host=127.0.0.1 port={fleet.postgres_port} dbname=audio_pipeline"
    pipeline_dsn = f"{base} user=pipeline password={fleet.secrets['vault_postgres_password']}"
    with psycopg.connect(pipeline_dsn) as conn:
        # An operator's policy (what `audio-pipeline policy add` does): terms the
        # test speech contains, so the lexicon classifier flags something.
        conn.execute(
            "INSERT INTO policies (name, version, text, lexicon) VALUES "
            "('fleet-test', 1, 'Mentions of rain or weather.', ARRAY['raining', 'rain']) "
            "ON CONFLICT DO NOTHING"
        )
    batch = sample.make_speech_batch(
        fleet.work / "outgoing", "fleet-batch-001", n_files=BATCH_FILES, seed=5,
        min_seconds=2.0, max_seconds=6.0,
    )  # fmt: skip
    (fleet.collection_dir / batch.tar_path.name).write_bytes(batch.tar_path.read_bytes())

    deadline = time.monotonic() + BATCH_TIMEOUT_S
    done = 0
    while time.monotonic() < deadline:
        with psycopg.connect(pipeline_dsn) as conn:
            done = conn.execute(
                "SELECT count(*) FROM transcripts t JOIN audio_files a ON a.id = t.audio_id "
                "WHERE a.batch_id = %s",
                (batch.batch_id,),
            ).fetchone()[0]
        if done >= BATCH_FILES:
            break
        time.sleep(5)
    assert done == BATCH_FILES, _pipeline_logs(fleet)
    with psycopg.connect(pipeline_dsn) as conn:
        classified = conn.execute(
            "SELECT count(*) FROM classifications c JOIN audio_files a ON a.id = c.audio_id "
            "WHERE a.batch_id = %s",
            (batch.batch_id,),
        ).fetchone()[0]
    assert classified >= BATCH_FILES

    health = fleet.playbook("health-check.yml")
    assert health.returncode == 0, health.describe()
    assert "FLEET HEALTH" in health.output
    assert "queue:unpack" in health.output
    assert "flagged (ra_queue)" in health.output


def _pipeline_logs(fleet: Fleet) -> str:
    out = []
    for host, units in (
        ("transfer-01", ["transfer-worker"]),
        ("gpu-01", ["unpack-worker", "gpu-worker"]),
    ):
        for unit in units:
            out.append(f"--- {host} {unit}")
            out.append(
                fleet.machines[host]
                .exec(["journalctl", "-u", unit, "-n", "30", "--no-pager"], check=False)
                .stdout
            )
    return "\n".join(out)


def test_health_check_fails_and_names_what_is_wrong(fleet: Fleet) -> None:
    """A stopped worker and a dead letter each make the health check fail, by name."""
    dead_letter = json.dumps(
        {"job": {"batch_id": "health-probe"}, "queue": "queue:unpack", "stage": "unpack",
         "worker": "test", "error": "probe", "attempts": 1, "failed_at": "2026-01-01T00:00:00Z"}
    )  # fmt: skip
    pushed = fleet.adhoc("orchestrator", "-a", f"redis-cli RPUSH queue:failed '{dead_letter}'")
    assert pushed.returncode == 0, pushed.describe()
    stopped = fleet.adhoc("transfer", "-a", "systemctl stop transfer-worker")
    assert stopped.returncode == 0, stopped.describe()
    try:
        health = fleet.playbook("health-check.yml")
        assert health.returncode != 0, health.describe()
        assert "transfer-01: transfer-worker is inactive" in health.output, health.describe()
        assert "1 failed job(s) in queue:failed" in health.output, health.describe()
    finally:
        fleet.adhoc("transfer", "-a", "systemctl start transfer-worker")
        fleet.adhoc("orchestrator", "-a", "redis-cli DEL queue:failed")
    healthy = fleet.playbook("health-check.yml")
    assert healthy.returncode == 0, healthy.describe()
