"""playbooks/apply-policies.yml run for real (local connection) against the real PostgreSQL.

The playbook is the one site.yml imports; only where it puts the files and which
``audio-pipeline`` it runs are pointed at this test's directories and virtualenv.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.ansible_run import VENV_BIN, ansible_playbook

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def run_playbook(
    tmp_path: Path, env: dict[str, str], policies: Path
) -> subprocess.CompletedProcess:
    (tmp_path / "inventory.yml").write_text(
        "orchestrator:\n  hosts:\n    orch-01:\n      ansible_connection: local\n"
    )
    extra = {
        "policies_dir": str(policies),
        "policies_host_dir": str(tmp_path / "host-policies"),
        "policies_command": str(VENV_BIN / "audio-pipeline"),
        "ansible_become": False,  # the test runs as whoever runs pytest
        "ansible_python_interpreter": sys.executable,
    }
    return ansible_playbook(
        tmp_path,
        "-i",
        str(tmp_path / "inventory.yml"),
        "-e",
        json.dumps(extra),
        str(REPO / "playbooks" / "apply-policies.yml"),
        env=env,
        timeout=300,
    )


def changed(proc: subprocess.CompletedProcess) -> int:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return int(re.search(r"orch-01\s+: ok=\d+\s+changed=(\d+)", proc.stdout).group(1))


@pytest.mark.slow  # four playbook runs
def test_playbook_applies_then_changes_nothing_then_versions_a_rewording(
    pipeline_env, db_conn, tmp_path
):
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    assert changed(run_playbook(tmp_path, pipeline_env, policies)) > 0
    assert changed(run_playbook(tmp_path, pipeline_env, policies)) == 0  # idempotent

    example = policies / "harassment-threats.yml"
    example.write_text(example.read_text().replace("  - stab you\n", "  - stab you\n  - cut you\n"))
    (policies / "stale.yml").write_text("name: stale\ntext: Old.\n")
    proc = run_playbook(tmp_path, pipeline_env, policies)
    assert changed(proc) > 0
    (policies / "stale.yml").unlink()
    assert changed(run_playbook(tmp_path, pipeline_env, policies)) > 0  # the copy goes
    assert not (tmp_path / "host-policies" / "stale.yml").exists()

    rows = db_conn.execute(
        "SELECT name, version, active FROM policies ORDER BY name, version"
    ).fetchall()
    assert [(r["name"], r["version"], r["active"]) for r in rows] == [
        ("harassment-threats", 1, False),
        ("harassment-threats", 2, True),
        ("stale", 1, True),  # a removed file retires nothing: `active: false` does
    ]


def test_a_bad_file_fails_the_play_naming_it(pipeline_env, db_conn, tmp_path):
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    (policies / "broken.yml").write_text("name: broken\nlexicon: [a]\n")
    proc = run_playbook(tmp_path, pipeline_env, policies)
    assert proc.returncode != 0
    assert "broken.yml: missing key(s): text" in proc.stdout
    assert db_conn.execute("SELECT count(*) AS n FROM policies").fetchone()["n"] == 0
