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
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from devtools import sample
from tests.fleet import network
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

SERVICES = {
    "orch": ["redis-server", "postgresql@15-main", "ra-app", "nginx", "nftables", "ssh"],
    "gpu-01": ["unpack-worker", "gpu-worker", "nftables", "ssh"],
    "transfer-01": ["transfer-worker", "nftables", "ssh"],
}
# What the host, standing outside the fleet, may reach on each machine.
OPEN_FROM_OUTSIDE = {"orch": {22, 80, 443}, "gpu-01": {22}, "transfer-01": {22}}
PROBED_PORTS = {22, 80, 443, 5432, 6379, 8000}
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
    reached = {port for port in sorted(PROBED_PORTS) if _reachable(address, port)}
    assert reached == OPEN_FROM_OUTSIDE[host]


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
    finally:
        env_file.write_text(good_env)
        fleet.adhoc("transfer", "-a", "systemctl start transfer-worker")
        fleet.adhoc("orchestrator", "-a", "redis-cli DEL queue:failed")
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
