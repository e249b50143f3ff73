"""The monitoring role's alert rules, as Ansible renders them, under promtool.

``promtool check`` proves the rendered rules and scrape configuration load;
``promtool test rules`` (alert_rules/alerts_test.yml) feeds each alert the series a
fault produces and checks it fires when it should, with its labels and annotations,
and stays quiet before. promtool comes from Debian's prometheus package (the
Makefile's .make/bin/promtool).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.support.ansible_render import HostConfig

# ansible_render is imported where it is used, not here: importing Ansible patches
# sys.intern, and torch's dynamo, imported later by another module's collection
# (test_cope_a_merge.py), then refuses to load.
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

PROMTOOL = REPO / ".make" / "bin" / "promtool"
INVENTORY = REPO / "inventory" / "production.yml"
VAULT = REPO / "group_vars" / "vault.example.yml"
RULES_DEST = "/etc/prometheus/rules/audio-pipeline.yml"
TARGETS_DIR = "/etc/prometheus/targets"
PLAY = """
- name: Monitoring
  hosts: all
  roles: [monitoring]
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, HostConfig]:
    from tests.support.ansible_render import render_site

    play = tmp_path_factory.mktemp("play") / "monitoring.yml"
    play.write_text(PLAY)
    return render_site(INVENTORY, VAULT, playbook=play)


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL.exists(), "promtool is missing: `make deps` unpacks it"
    return subprocess.run(
        [str(PROMTOOL), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_the_orchestrator_alone_runs_prometheus_and_every_host_a_node_exporter(
    fleet: dict[str, HostConfig],
) -> None:
    orchestrators = [h for h, c in fleet.items() if RULES_DEST in c.files]
    assert orchestrators == ["orch-01"]
    for host, config in fleet.items():
        assert "/etc/default/prometheus-node-exporter" in config.copied, host
        assert not config.argument_errors, (host, config.argument_errors)


def test_prometheus_scrapes_every_worker_on_its_fleet_address(
    fleet: dict[str, HostConfig], tmp_path: Path
) -> None:
    config = fleet["orch-01"].files["/etc/prometheus/prometheus.yml"].text
    path = tmp_path / "prometheus.yml"
    path.write_text(config)
    checked = promtool("check", "config", "--syntax-only", path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Each host registers its own targets (file_sd), in the files Prometheus watches.
    scraped = {
        (PurePosixPath(dest).parent.name, target["labels"]["instance"], address)
        for config_ in fleet.values()
        for dest, f in config_.files.items()
        if dest.startswith(TARGETS_DIR)
        for target in json.loads(f.text)
        for address in target["targets"]
    }
    assert {
        ("gpu-worker", "gpu-01", "10.0.1.1:9301"),
        ("unpack-worker", "gpu-01", "10.0.1.1:9302"),
        ("gpu-worker", "gpu-03", "10.0.1.3:9301"),
        ("transfer-worker", "transfer-01", "10.0.1.20:9303"),
        ("node", "orch-01", "10.0.1.10:9100"),  # the orchestrator's own node exporter
    } <= scraped, scraped
    assert {(job, host) for job, host, _ in scraped if job == "node"} == {
        ("node", host) for host in fleet
    }
    assert not {s for s in scraped if s[0] == "transfer-worker" and s[1].startswith("gpu")}
    for job in ("node", "gpu-worker", "unpack-worker", "transfer-worker"):
        assert f'files: ["{TARGETS_DIR}/{job}/*.json"]' in config, job
    # The RA app's gunicorn, on loopback where the orchestrator role binds it.
    assert '"127.0.0.1:8000"' in config
    assert "job_name: ra-app" in config


def test_alerts_fire_when_they_should_and_not_before(
    fleet: dict[str, HostConfig], tmp_path: Path
) -> None:
    rules = tmp_path / "audio-pipeline.yml"
    rules.write_text(fleet["orch-01"].files[RULES_DEST].text)
    assert "{{ $labels.instance }}" in rules.read_text()  # Prometheus's templates kept
    checked = promtool("check", "rules", rules)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    shutil.copy(Path(__file__).parent / "alert_rules" / "alerts_test.yml", tmp_path)
    tested = promtool("test", "rules", tmp_path / "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
