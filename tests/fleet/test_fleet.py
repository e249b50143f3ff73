"""The fleet converged for real: site.yml on systemd-nspawn machines with their own
addresses and firewalls (see conftest.py and lab.py).

One session-scoped fleet; the tests below judge it in order: convergence and
idempotence, the services and their sandboxes, what an outsider can reach, the
credentials, the guide's operator commands, then the human journey: a batch from
the collection host through the workers, an RA reviewing it in Chromium over
HTTPS through nginx, the researcher exporting, and the login limit.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import http.cookiejar
import json
import re
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from devtools import sample
from tests.fleet import network, prometheus
from tests.fleet.marks import NEEDS_FLEET
from tests.support.browser_kit import (
    CHROMIUM,
    CHROMIUM_ARGS,
    download_export_as_admin,
    login_by_keyboard,
)

if TYPE_CHECKING:
    from tests.fleet.lab import Fleet


pytestmark = NEEDS_FLEET

MONITORING = [
    "prometheus",
    "prometheus-alertmanager",
    "prometheus-redis-exporter",
    "prometheus-postgres-exporter",
]
SERVICES = {
    "orch": [
        *("redis-server", "postgresql@15-main", "ra-app", "nginx", "nftables", "ssh"),
        *MONITORING,
        "prometheus-node-exporter",
    ],
    "gpu-01": ["unpack-worker", "gpu-worker", "nftables", "ssh", "prometheus-node-exporter"],
    "transfer-01": ["transfer-worker", "nftables", "ssh", "prometheus-node-exporter"],
}
# What the host, standing outside the fleet, may reach on each machine.
OPEN_FROM_OUTSIDE = {"orch": {22, 80, 443}, "gpu-01": {22}, "transfer-01": {22}}
# Prometheus, Alertmanager, the exporters and the workers' /metrics among them.
PROBED_PORTS = {22, 80, 443, 5432, 6379, 8000, 9090, 9093, 9100, 9121, 9187, 9301, 9302, 9303}
# What Prometheus on the orchestrator scrapes: (job, instance).
SCRAPED = {
    ("prometheus", "127.0.0.1:9090"),
    ("node", "orch"),
    ("node", "gpu-01"),
    ("node", "transfer-01"),
    ("gpu-worker", "gpu-01"),
    ("unpack-worker", "gpu-01"),
    ("transfer-worker", "transfer-01"),
    ("redis", "orch"),
    ("postgres", "orch"),
    ("ra-app", "orch"),
}
CONNECT_TIMEOUT_S = 3
BATCH_ID = "fleet-batch-001"
BATCH_FILES = 4
BATCH_TIMEOUT_S = 420
RA_PASSWORD = "ra-fleet-password-1"
ADMIN_PASSWORD = "admin-fleet-password-1"
LOGIN_ATTEMPTS = 20


def test_site_converges(fleet_build: Fleet) -> None:
    run = fleet_build.first_run
    assert run is not None
    assert run.returncode == 0, run.describe()
    assert set(run.recap) == set(SERVICES), run.recap
    assert all(r["failed"] == 0 and r["unreachable"] == 0 for r in run.recap.values())


def test_second_run_changes_nothing(fleet_build: Fleet) -> None:
    run = fleet_build.second_run
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
        assert (active, enabled) == ("active", "enabled"), (unit, fleet.journal(host, unit))


@pytest.mark.parametrize(
    ("host", "unit"),
    [
        ("gpu-01", "gpu-worker"),
        ("gpu-01", "unpack-worker"),
        ("transfer-01", "transfer-worker"),
        ("orch", "ra-app"),
    ],
)
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


# What an outsider reaches ------------------------------------------------------
def _reachable(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(CONNECT_TIMEOUT_S)
        return s.connect_ex((address, port)) == 0


@pytest.mark.parametrize("host", sorted(OPEN_FROM_OUTSIDE))
def test_outsider_reaches_only_the_front_door_and_ssh(fleet: Fleet, host: str) -> None:
    address = fleet.address(host)
    # At once: a port the firewall drops costs the whole connect timeout.
    ports = sorted(PROBED_PORTS)
    with ThreadPoolExecutor(len(ports)) as pool:
        reached = pool.map(partial(_reachable, address), ports)
        answers = dict(zip(ports, reached, strict=True))
    assert {port for port, open_ in answers.items() if open_} == OPEN_FROM_OUTSIDE[host]


def test_fleet_members_reach_redis_and_postgres_but_not_gunicorn(fleet: Fleet) -> None:
    """The ports closed to the host are closed by the firewall and bind addresses,
    not because nothing listens: a worker host reaches Redis and PostgreSQL, and
    nobody but the orchestrator itself reaches gunicorn."""
    reached = fleet.probe(
        "gpu-01",
        "ports",
        address=fleet.address("orch"),
        ports=[6379, 5432, 8000],
        timeout_s=CONNECT_TIMEOUT_S,
    )
    assert reached == {"6379": True, "5432": True, "8000": False}
    listening = fleet.machines["orch"].exec(["ss", "-Htln", "sport = :8000"]).stdout
    assert "127.0.0.1:8000" in listening, listening
    assert "0.0.0.0:8000" not in listening, listening
    assert "*:8000" not in listening, listening


# Monitoring --------------------------------------------------------------------
def test_only_the_orchestrator_reads_the_metrics(fleet: Fleet) -> None:
    """The workers' /metrics and node_exporter answer the orchestrator's Prometheus
    and no other fleet member; Prometheus and Alertmanager listen on loopback."""
    from_orch = {
        host: fleet.probe(
            "orch", "ports", address=fleet.address(host), ports=ports, timeout_s=CONNECT_TIMEOUT_S
        )
        for host, ports in (("gpu-01", [9100, 9301, 9302]), ("transfer-01", [9100, 9303]))
    }
    assert from_orch == {
        "gpu-01": {"9100": True, "9301": True, "9302": True},
        "transfer-01": {"9100": True, "9303": True},
    }
    from_transfer = fleet.probe(
        "transfer-01",
        "ports",
        address=fleet.address("gpu-01"),
        ports=[9100, 9301, 9302],
        timeout_s=CONNECT_TIMEOUT_S,
    )
    assert from_transfer == {"9100": False, "9301": False, "9302": False}
    listening = fleet.machines["orch"].exec(["ss", "-Htln"]).stdout
    for port in (9090, 9093, 9121, 9187):
        bound = {line.split()[3] for line in listening.splitlines() if f":{port}" in line}
        assert bound == {f"127.0.0.1:{port}"}, (port, listening)


def _wait_for(what: str, check: Any, timeout_s: float, poll_s: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found or time.monotonic() > deadline:
            assert found, f"{what}: not within {timeout_s:.0f} s"
            return found
        time.sleep(poll_s)


def test_prometheus_scrapes_every_target(fleet: Fleet) -> None:
    """Every worker, every host's node_exporter and the Redis and PostgreSQL
    exporters are scraped and up, and the pipeline's own series arrive."""
    _wait_for("every target up", lambda: prometheus.targets_up(fleet) == SCRAPED, 90)
    assert {(j, i) for j, i, _ in prometheus.active_targets(fleet)} == SCRAPED

    backends = prometheus.query(fleet, 'audio_pipeline_backend_up{host="gpu-01",stage="gpu"} == 1')
    assert {r["metric"]["backend"] for r in backends} == {"redis", "postgres"}, backends
    assert prometheus.query(fleet, "audio_pipeline_policies_active"), (
        "postgres_exporter's own queries"
    )
    # Queue depths come from redis_exporter's key checks (a key exists while it holds
    # something): a queue no worker reads, filled for the occasion.
    redis_cli = ["/usr/local/bin/redis-cli", "--no-auth-warning"]
    fleet.machines["orch"].exec([*redis_cli, "RPUSH", "queue:monitoring-probe", "a", "b"])
    try:
        _wait_for(
            "the probe queue's depth in Prometheus",
            lambda: prometheus.query(fleet, 'redis_key_size{key="queue:monitoring-probe"} == 2'),
            timeout_s=60,
        )
    finally:
        fleet.machines["orch"].exec([*redis_cli, "DEL", "queue:monitoring-probe"])


# Credentials -----------------------------------------------------------------
def test_redis_requires_its_password_and_the_ra_app_user_is_fenced(fleet: Fleet) -> None:
    found = fleet.probe(
        "gpu-01",
        "redis_access",
        address=fleet.address("orch"),
        password=fleet.secrets["vault_redis_password"],
        ra_user="ra-app",
        ra_password=fleet.secrets["vault_ra_app_redis_password"],
    )
    assert found == {
        "anonymous": "refused",
        "wrong": "refused",
        "pipeline": True,
        "appendonly": "yes",
        "ra_ping": True,
        "ra_limits_key": True,
        "LLEN": "denied",
        "KEYS": "denied",
        "FLUSHALL": "denied",
    }


def test_postgres_credentials_and_ownership(fleet: Fleet) -> None:
    """scram passwords, no superuser over the network, the pipeline owns its
    tables, the RA app reads them and cannot write them."""
    found = fleet.probe(
        "gpu-01",
        "postgres_access",
        address=fleet.address("orch"),
        pipeline_password=fleet.secrets["vault_postgres_password"],
        ra_password=fleet.secrets["vault_ra_app_db_password"],
    )
    assert "password authentication failed" in found["wrong"]
    # the superuser has no network entry in pg_hba at all: refused before any password
    assert re.search(r'no pg_hba\.conf entry .* user "postgres"', found["superuser"]), found
    assert found["method"] == "scram-sha-256"
    assert found["owners"]["audio_files"] == "pipeline"
    assert found["owners"].get("ra_users") == "ra_app", "the RA app's migrations own its tables"
    assert found["ra_insert"] == "denied"


# The front door ------------------------------------------------------------------
def _tls_context(fleet: Fleet) -> ssl.SSLContext:
    """What an RA's machine does: trust RA_APP_CA, check the name, nothing else."""
    return ssl.create_default_context(cafile=str(fleet.ra_app_ca))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_https_front_door(fleet: Fleet) -> None:
    with urllib.request.urlopen(  # noqa: S310
        f"{fleet.ra_app_url}/healthz", timeout=10, context=_tls_context(fleet)
    ) as r:
        assert r.status == 200
        assert json.loads(r.read())["status"] == "ok"
        hsts = r.headers["Strict-Transport-Security"]
    assert hsts
    assert int(hsts.split("max-age=")[1].split(";")[0]) >= 180 * 86400
    # plain HTTP only redirects to HTTPS, for any path
    opener = urllib.request.build_opener(_NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as redirect:
        opener.open(f"http://{fleet.address('orch')}/login?next=%2F", timeout=10)
    assert redirect.value.code == 301
    assert redirect.value.headers["Location"] == f"{fleet.ra_app_url}/login?next=%2F"
    # no protocol older than TLS 1.2
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(str(fleet.ra_app_ca))
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with (
        socket.create_connection((fleet.address("orch"), 443), timeout=10) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
    ):
        old.wrap_socket(raw, server_hostname=fleet.address("orch"))
    log = fleet.machines["orch"].exec(["cat", "/opt/ra-app/logs/error.log"]).stdout
    assert "Booting worker" in log or "Listening at" in log


def test_operator_tools_on_the_orchestrator(fleet: Fleet) -> None:
    """audio-pipeline runs on the orchestrator with the pipeline's own settings,
    for root and fleet-operators only; init-db works from the deployed wheel; the
    repository's policies arrived with site.yml."""
    status = fleet.adhoc("orchestrator", "-a", "audio-pipeline status --json")
    assert status.returncode == 0, status.describe()
    assert "queue:unpack" in status.output, status.describe()
    init = fleet.adhoc("orchestrator", "-a", "audio-pipeline init-db")
    assert init.returncode == 0, init.describe()
    policies = fleet.adhoc("orchestrator", "-a", "audio-pipeline policy list --json")
    assert policies.returncode == 0, policies.describe()
    assert "harassment-threats" in policies.output, policies.describe()
    stranger = fleet.machines["orch"].exec(
        ["runuser", "-u", "nobody", "--", "/usr/local/bin/audio-pipeline", "status"], check=False
    )
    assert stranger.returncode != 0
    assert "cannot read" in stranger.stderr + stranger.stdout


# The human journey -------------------------------------------------------------
def _spki_pin(cert: Path) -> str:
    """The base64 SHA-256 of the certificate's public key, as Chromium pins it."""
    der = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-pubkey", "-noout"],
        check=True,
        capture_output=True,
    ).stdout
    spki = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "der"],
        input=der,
        check=True,
        capture_output=True,
    ).stdout
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def test_human_journey(fleet: Fleet, tmp_path: Path) -> None:
    """An admin creates an RA; the operator's policy is in place; a batch dropped
    on the collection host flows through; the RA reviews every flagged item by
    keyboard in Chromium over HTTPS (audio through nginx as 206 ranges); the
    labels land in ra_labels; the admin exports them as CSV."""
    from tests.fleet import lab

    lab.create_ra_user(fleet, "ann", RA_PASSWORD, "ra")
    lab.create_ra_user(fleet, "boss", ADMIN_PASSWORD, "admin")
    # The operator's policy arrives by the playbook.
    applied = lab.apply_policy(fleet, *lab.DEMO_POLICY)
    assert "result: added" in applied.output, applied.describe()
    name = lab.DEMO_POLICY[0]
    active = fleet.sql(f"SELECT version FROM policies WHERE name = '{name}' AND active")
    assert active == [["1"]]
    batch = sample.make_speech_batch(
        fleet.work / "outgoing",
        BATCH_ID,
        n_files=BATCH_FILES,
        seed=5,
        min_seconds=2.0,
        max_seconds=6.0,
    )
    lab.drop_on_collection_host(fleet, batch.tar_path)
    fleet.wait_for_batch(batch.batch_id, BATCH_FILES, BATCH_TIMEOUT_S)
    flagged = int(fleet.sql("SELECT count(*) FROM ra_queue")[0][0])
    assert flagged >= 1, "the lexicon policy flagged nothing"
    # The queue holds the flagged items and the audit sample of unflagged ones.
    classified = int(fleet.sql("SELECT count(*) FROM classifications")[0][0])

    from playwright.sync_api import sync_playwright

    url = fleet.ra_app_url
    ranges: list[int] = []
    args = [*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={_spki_pin(fleet.ra_app_ca)}"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 900}, accept_downloads=True)
        page.on(
            "response",
            lambda r: ranges.append(r.status) if "/audio/" in r.url else None,
        )
        login_by_keyboard(page, url, "ann", RA_PASSWORD)
        page.wait_for_function("document.activeElement.id === 'next-item'")
        page.keyboard.press("Enter")
        page.wait_for_url("**/review/*")
        reviewed = 0
        while "Nothing left to review" not in page.content():
            page.wait_for_selector("#label-form")
            here = page.url
            page.wait_for_function("document.getElementById('player').readyState >= 1")
            page.keyboard.press(" ")  # play
            page.wait_for_function("!document.getElementById('player').paused")
            page.keyboard.press(" ")  # pause
            page.keyboard.press("y")
            page.keyboard.press("Enter")
            page.wait_for_load_state("load")
            page.wait_for_url(lambda u, last=here: u != last)
            reviewed += 1
            assert reviewed <= classified, "the queue handed out more items than exist"
        queued = int(fleet.sql("SELECT count(*) FROM ra_items")[0][0])
        assert reviewed == queued >= flagged, (reviewed, queued, flagged)
        export = download_export_as_admin(
            page, url, "boss", ADMIN_PASSWORD, tmp_path / "export.csv"
        )
        browser.close()

    assert 206 in ranges, f"audio responses seen: {ranges}"
    labels = fleet.sql(
        "SELECT u.username, l.answer->>'violates' FROM ra_labels l "
        "JOIN ra_assignments a ON a.id = l.assignment_id JOIN ra_users u ON u.id = a.user_id",
    )
    assert labels == [["ann", "yes"]] * reviewed
    rows = list(csv.DictReader(export.open(encoding="utf-8")))
    assert len(rows) == reviewed
    assert {r["coder"] for r in rows} == {"ann"}
    assert all(r["answer_violates"] == "yes" and r["transcript"] for r in rows)


def test_the_review_left_an_append_only_audit_trail(fleet: Fleet) -> None:
    """The journey is in ra_audit_log with the RA's own address (the host's, through
    nginx): logins, one view, one play and one label per item reviewed, the export.
    The app's database role reads the log and can change or remove nothing; the
    prune runs from its unit as ra_audit_pruner and logs itself."""
    labels = int(fleet.sql("SELECT count(*) FROM ra_labels")[0][0])
    assert labels >= 1, "run after test_human_journey"
    rows = fleet.sql(
        "SELECT actor_username, action, coalesce(client_addr, ''), count(*) FROM ra_audit_log "
        "GROUP BY 1, 2, 3"
    )
    counts = {(who, action, addr): int(n) for who, action, addr, n in rows}
    host = network.HOST_ADDRESS
    assert counts[("ann", "login", host)] >= 1, counts
    assert counts[("ann", "item.view", host)] >= labels, counts
    # however many Range requests the player made: one play per item in the session
    assert counts[("ann", "audio.play", host)] == labels, counts
    assert counts[("ann", "label", host)] == labels, counts
    assert counts[("boss", "export", host)] == 1, counts
    assert {addr for (_, _, addr) in counts} <= {host, ""}, counts  # never nginx's own
    owner = fleet.sql("SELECT tableowner FROM pg_tables WHERE tablename = 'ra_audit_log'")
    assert owner == [["ra_audit_owner"]]
    access = fleet.probe(
        "gpu-01",
        "ra_audit_log_access",
        address=fleet.address("orch"),
        ra_password=fleet.secrets["vault_ra_app_db_password"],
    )
    assert access == {
        "select": "allowed",
        **dict.fromkeys(("update", "delete", "truncate", "disable_guard", "prune"), "denied"),
    }
    timer = fleet.machines["orch"].exec(["systemctl", "is-enabled", "ra-audit-prune.timer"])
    assert timer.stdout.strip() == "enabled"
    fleet.machines["orch"].exec(["systemctl", "start", "ra-audit-prune.service"])
    [[action, details]] = fleet.sql(
        "SELECT action, details FROM ra_audit_log ORDER BY id DESC LIMIT 1"
    )
    assert action == "audit_log.prune"
    assert json.loads(details)["database_role"] == "ra_audit_pruner", details


def test_the_review_is_in_the_ra_app_metrics_and_only_prometheus_reads_them(
    fleet: Fleet,
) -> None:
    """Prometheus scrapes gunicorn's workers as one (multiprocess mode): the labels it
    counts are the labels in ra_labels, the logins are there, and the items waiting
    come from PostgreSQL. An RA's machine asking nginx for /metrics gets 404."""
    labels = int(fleet.sql("SELECT count(*) FROM ra_labels")[0][0])
    assert labels >= 1, "run after test_human_journey"

    def counted() -> float | None:
        found = prometheus.query(fleet, "sum(ra_app_labels_recorded_total)")
        return float(found[0]["value"][1]) if found else None

    def logged_in() -> set[str]:
        logins = prometheus.query(fleet, 'sum by (role) (ra_app_logins_total{instance="orch"})')
        return {r["metric"]["role"] for r in logins}

    # The admin's login came last in the journey: a scrape after it has everything.
    _wait_for(
        "the labels and both logins in Prometheus",
        lambda: counted() == labels and logged_in() >= {"ra", "admin"},
        timeout_s=90,
    )
    review = prometheus.query(fleet, "sum(ra_app_item_review_seconds_count)")
    assert review, "no ra_app_item_review_seconds"
    assert float(review[0]["value"][1]) == labels, review
    statuses = prometheus.query(fleet, "sum by (status) (ra_app_request_duration_seconds_count)")
    assert "200" in {r["metric"]["status"] for r in statuses}, statuses
    assert prometheus.query(fleet, "ra_app_items_waiting"), "the scrape's own count of ra_items"
    # From outside, through the front door: nginx refuses the path, however spelled.
    for path in ("/metrics", "//metrics", "/%6detrics"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(  # noqa: S310
                f"{fleet.ra_app_url}{path}", timeout=10, context=_tls_context(fleet)
            )
        assert refused.value.code == 404, path


def test_a_new_policy_version_is_applied_to_the_finished_batch_without_asr(fleet: Fleet) -> None:
    """The researcher rewords the policy; the operator re-classifies the finished
    batch from the stored transcripts: a verdict of the new version for every file,
    the first version's kept, and the gpu worker ran no speech recognition."""
    from tests.fleet import lab

    name, text, lexicon = lab.DEMO_POLICY
    applied = lab.apply_policy(fleet, name, text + " Threats count too.", [*lexicon, "threat"])
    assert "result: new version" in applied.output, applied.describe()
    [[v2]] = fleet.sql(f"SELECT id FROM policies WHERE name = '{name}' AND version = 2")
    transcripts = fleet.sql("SELECT count(*) FROM transcripts")
    asr_before = fleet.journal("gpu-01", "gpu-worker", 2000).count("event=gpu.file_done")
    queued = fleet.adhoc(
        "orchestrator", "-a", f"audio-pipeline reclassify --policy {name} --batch {BATCH_ID}"
    )
    assert queued.returncode == 0, queued.describe()

    new_verdicts = (
        "SELECT count(*) FROM classifications c JOIN audio_files a ON a.id = c.audio_id "
        f"WHERE c.policy_id = {v2} AND a.batch_id = '{BATCH_ID}'"
    )

    def judged() -> bool:
        return fleet.sql(new_verdicts) == [[str(BATCH_FILES)]]

    _wait_for("a version-2 verdict for every file", judged, timeout_s=300)
    versions = fleet.sql(
        "SELECT p.version, count(*) FROM classifications c JOIN policies p ON p.id = c.policy_id "
        f"WHERE p.name = '{name}' GROUP BY 1 ORDER BY 1"
    )
    assert versions == [["1", str(BATCH_FILES)], ["2", str(BATCH_FILES)]]
    assert fleet.sql("SELECT count(*) FROM transcripts") == transcripts
    journal = fleet.journal("gpu-01", "gpu-worker", 2000)
    assert journal.count("event=gpu.file_done") == asr_before  # no file transcribed again
    assert journal.count("event=gpu.reclassified") >= BATCH_FILES
    status = fleet.adhoc("orchestrator", "-a", "audio-pipeline status --json")
    assert '"reclassify"' in status.output, status.describe()


def test_the_operator_page_requeues_and_purges_over_https(fleet: Fleet) -> None:
    """The admin opens the operator page in Chromium from outside the fleet: queues
    with their trend from Prometheus, the live workers of both hosts, the dead letters
    with their errors. Requeue reopens the job's rows as the page's own database role
    and sends the job back to queue:unpack through its own Redis user, where the worker
    finds the batch finished; purge deletes a job no worker can take. Both actions
    are in the audit log with the admin's address."""
    redis_cli = ["/usr/local/bin/redis-cli", "--no-auth-warning"]
    orch = fleet.machines["orch"]
    # The finished batch's unpack job, as if it had failed for good once: requeueing it
    # runs the row update (nothing to reopen, the batch is done) and the worker skips it.
    requeued = {
        "job": json.dumps({"batch_id": BATCH_ID, "s3_key": f"incoming/{BATCH_ID}.tar"}),
        "queue": "queue:unpack",
        "stage": "unpack",
        "worker": "unpack:gpu-01:probe",
        "error": "probe: S3 was unreachable",
        "attempts": 5,
        "failed_at": "2026-01-01T00:00:00Z",
    }
    orch.exec([*redis_cli, "RPUSH", "queue:failed", json.dumps(requeued)])
    # A job the unpack worker refuses at once: a real dead letter, for the purge.
    bad_job = json.dumps({"batch_id": "not a batch!", "s3_key": "incoming/none.tar"})
    orch.exec([*redis_cli, "RPUSH", "queue:unpack", bad_job])

    def dead_letters() -> int:
        return int(orch.exec([*redis_cli, "LLEN", "queue:failed"]).stdout.strip())

    _wait_for("the bad job dead-lettered", lambda: dead_letters() == 2, timeout_s=60)

    from playwright.sync_api import sync_playwright

    url = fleet.ra_app_url
    args = [*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={_spki_pin(fleet.ra_app_ca)}"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        login_by_keyboard(page, url, "boss", ADMIN_PASSWORD)
        page.click("nav >> text=Operator")
        page.wait_for_url("**/admin/operator/")
        queues = page.locator("#queues").inner_text()
        assert "Last " in queues, queues  # the trend column: Prometheus answered
        assert page.locator('tr[data-queue="queue:unpack"]').count() == 1
        workers = page.locator("#workers").inner_text()
        for host, stage in (("gpu-01", "gpu"), ("gpu-01", "unpack"), ("transfer-01", "transfer")):
            assert re.search(rf"\b{stage}\s+{host}\b", workers), (stage, host, workers)
        letters = page.locator("#dead-letters").inner_text()
        assert "invalid batch_id" in letters, letters
        assert page.locator("#requeue-off").count() == 0, letters
        page.locator("tr.dead-letter", has_text="S3 was unreachable").locator(
            "button.requeue"
        ).click()
        page.wait_for_load_state("load")
        page.wait_for_selector("text=1 job(s) requeued")
        assert page.locator("tr.dead-letter").count() == 1
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#purge")
        page.wait_for_selector("text=Deleted 1 dead letter(s).")
        browser.close()
    assert dead_letters() == 0

    def skipped() -> bool:
        journal = fleet.journal("gpu-01", "unpack-worker", 500).splitlines()
        return any("event=unpack.skipped" in line and BATCH_ID in line for line in journal)

    _wait_for("the unpack worker took the requeued job, its batch done", skipped, 60)
    assert fleet.sql(f"SELECT status FROM batches WHERE batch_id = '{BATCH_ID}'") == [["done"]]
    rows = fleet.sql(
        "SELECT action, client_addr, details FROM ra_audit_log "
        "WHERE actor_username = 'boss' AND action LIKE 'dead_letter.%' ORDER BY id"
    )
    assert [(action, addr) for action, addr, _ in rows] == [
        ("dead_letter.requeue", network.HOST_ADDRESS),
        ("dead_letter.purge", network.HOST_ADDRESS),
    ], rows
    assert json.loads(rows[0][2])["requeued"] == 1, rows
    assert json.loads(rows[1][2])["deleted"] == 1, rows


def test_health_check_passes_on_the_working_fleet(fleet: Fleet) -> None:
    health = fleet.playbook("health-check.yml")
    assert health.returncode == 0, health.describe()
    assert "FLEET HEALTH" in health.output
    assert "queue:unpack" in health.output
    assert "flagged (ra_queue)" in health.output


def test_health_check_fails_and_names_what_is_wrong(fleet: Fleet) -> None:
    """A stopped worker, a dead letter and a worker host whose Redis password is
    wrong each make the health check fail, naming host and cause."""
    dead_letter = json.dumps(
        {
            "job": {"batch_id": "health-probe"},
            "queue": "queue:unpack",
            "stage": "unpack",
            "worker": "test",
            "error": "probe",
            "attempts": 1,
            "failed_at": "2026-01-01T00:00:00Z",
        }
    )
    pushed = fleet.adhoc("orchestrator", "-a", f"redis-cli RPUSH queue:failed '{dead_letter}'")
    assert pushed.returncode == 0, pushed.describe()
    stopped = fleet.adhoc("transfer", "-a", "systemctl stop transfer-worker")
    assert stopped.returncode == 0, stopped.describe()
    # The running workers keep the settings they started with; only what reads the
    # file from now on (health-check's check-connections) sees the wrong password.
    env_file = fleet.machines["gpu-01"].root / "etc/audio-pipeline/pipeline.env"
    good_env = env_file.read_text()
    env_file.write_text(
        re.sub(r"^REDIS_PASSWORD=.*$", 'REDIS_PASSWORD="wrong"', good_env, flags=re.MULTILINE)
    )
    try:
        health = fleet.playbook("health-check.yml")
        assert health.returncode != 0, health.describe()
        assert "transfer-01: transfer-worker is inactive" in health.output, health.describe()
        assert "1 failed job(s) in queue:failed" in health.output, health.describe()
        assert "gpu-01: cannot reach redis" in health.output, health.describe()
        assert "AuthenticationError" in health.output, health.describe()
        # Prometheus noticed too: the stopped worker's alert fires, and the health
        # check names it with its runbook.
        _wait_for(
            "WorkerDown firing for transfer-01",
            lambda: [
                a
                for a in prometheus.firing(fleet)
                if a["labels"]["alertname"] == "WorkerDown"
                and a["labels"]["instance"] == "transfer-01"
            ],
            timeout_s=120,
        )
        alerted = fleet.playbook("health-check.yml")
        assert alerted.returncode != 0, alerted.describe()
        assert "orch: alert WorkerDown firing: transfer-worker on transfer-01" in alerted.output
        assert "docs/FLEET.md, Monitoring: WorkerDown" in alerted.output
    finally:
        env_file.write_text(good_env)
        fleet.adhoc("transfer", "-a", "systemctl start transfer-worker")
        fleet.adhoc("orchestrator", "-a", "redis-cli DEL queue:failed")
    # Alerts resolve at the first evaluation after a good scrape.
    _wait_for("no alert firing", lambda: not prometheus.firing(fleet), timeout_s=120)
    healthy = fleet.playbook("health-check.yml")
    assert healthy.returncode == 0, healthy.describe()


def test_login_limit_holds_across_gunicorn_workers(fleet: Fleet) -> None:
    """Wrong passwords from one address get 429 within LOGIN_ATTEMPTS tries,
    whichever gunicorn worker answers: the counter lives in Redis, under the
    client's own address as nginx states it (ProxyFix), not nginx's. Last in the
    file: it locks the host's address out of logging in for a while."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=_tls_context(fleet)),
        urllib.request.HTTPCookieProcessor(jar),
    )
    # Over HTTPS Flask-WTF also checks that the form was posted from this site, as
    # a browser says in its Referer header.
    opener.addheaders = [("Referer", f"{fleet.ra_app_url}/login")]
    statuses = []
    for _ in range(LOGIN_ATTEMPTS):
        with opener.open(f"{fleet.ra_app_url}/login", timeout=10) as r:
            token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', r.read().decode())
        assert token, "no CSRF token on the login form"
        body = urllib.parse.urlencode(
            {"csrf_token": token[1], "username": "ann", "password": "wrong-password"}
        ).encode()
        try:
            with opener.open(f"{fleet.ra_app_url}/login", data=body, timeout=10) as r:
                statuses.append(r.status)
        except urllib.error.HTTPError as e:
            statuses.append(e.code)
    assert 429 in statuses, statuses
    assert 500 not in statuses, statuses
    assert 400 not in statuses, statuses
    keys = "\n".join(
        fleet.probe(
            "gpu-01",
            "limiter_keys",
            address=fleet.address("orch"),
            password=fleet.secrets["vault_redis_password"],
        )
    )
    assert network.HOST_ADDRESS in keys, keys
    assert "127.0.0.1" not in keys, keys
