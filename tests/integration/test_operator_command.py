"""The orchestrator's /usr/local/bin/audio-pipeline as the role renders it, on the real stack.

Ansible renders the operator env file (common's env template, with the variables
operator_tools.yml includes it with) and the wrapper from the roles' own templates
and defaults (only the fleet-wide values are the local stack's); the
wrapper then runs the pipeline's command with exactly those settings.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.ansible_run import VENV_BIN, ansible_playbook

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "roles" / "orchestrator"
COMMON = REPO / "roles" / "common"


def operator_env_include() -> dict:
    """operator_tools.yml's include of common's env.yml: the variables it writes with."""
    tasks = yaml.safe_load((ROLE / "tasks" / "operator_tools.yml").read_text())
    [task] = [
        t for t in tasks if t.get("ansible.builtin.include_role", {}).get("tasks_from") == "env"
    ]
    return task["vars"]


@pytest.fixture
def operator_command(tmp_path: Path, pipeline_env: dict[str, str]) -> Path:
    """The rendered wrapper; its virtualenv is this test run's."""
    root = tmp_path / "opt"
    root.mkdir()
    (root / "venv").symlink_to(VENV_BIN.parent)
    env_file = tmp_path / "fleet-operators" / "audio-pipeline.env"
    env_file.parent.mkdir()
    wrapper = tmp_path / "audio-pipeline"
    group_vars = {
        "app_env": "production",
        "redis_port": int(pipeline_env["REDIS_PORT"]),
        "redis_password": pipeline_env["REDIS_PASSWORD"],
        "postgres_port": int(pipeline_env["POSTGRES_PORT"]),
        "postgres_db": pipeline_env["POSTGRES_DB"],
        "postgres_user": pipeline_env["POSTGRES_USER"],
        "postgres_password": pipeline_env["POSTGRES_PASSWORD"],
        "s3_endpoint": pipeline_env["S3_ENDPOINT"],
        "s3_bucket": pipeline_env["S3_BUCKET"],
        "s3_access_key": pipeline_env["S3_ACCESS_KEY"],
        "s3_secret_key": pipeline_env["S3_SECRET_KEY"],
        "scratch_root": "/data/scratch",
        "models_root": "/data/models",
        "orchestrator_operator_code_root": str(root),
        "orchestrator_operator_env_file": str(env_file),
    }
    include_vars = tmp_path / "include.yml"
    include_vars.write_text(yaml.safe_dump(operator_env_include()))
    play = [
        {
            "name": "Render the operator command",
            "hosts": "localhost",
            "gather_facts": False,
            # The include's vars outrank both roles' defaults, as at an include_role.
            "vars_files": [
                str(COMMON / "defaults" / "main.yml"),
                str(ROLE / "defaults" / "main.yml"),
                str(include_vars),
            ],
            "tasks": [
                {
                    "name": "Env file",
                    "ansible.builtin.template": {
                        "src": str(COMMON / "templates" / "env.j2"),
                        "dest": str(env_file),
                        "mode": "0640",
                    },
                },
                {
                    "name": "Wrapper",
                    "ansible.builtin.template": {
                        "src": str(ROLE / "templates" / "audio-pipeline.py.j2"),
                        "dest": str(wrapper),
                        "mode": "0755",
                    },
                },
            ],
        }
    ]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    (tmp_path / "vars.json").write_text(json.dumps(group_vars))
    proc = ansible_playbook(
        tmp_path, "-i", "localhost,", "-c", "local", "-e", f"@{tmp_path / 'vars.json'}", "play.yml"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return wrapper


def run(wrapper: Path, *args: str, env: dict[str, str] | None = None):
    # An operator's login shell: nothing of the pipeline's settings in it.
    base = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(
        [str(wrapper), *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_operator_command_runs_with_the_rendered_settings(operator_command, db_conn):
    checked = run(operator_command, "check-connections", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["ok"] is True

    applied = run(operator_command, "policy", "apply", "--json", str(REPO / "policies"))
    assert applied.returncode == 0, applied.stderr
    assert json.loads(applied.stdout)["changed"] is True
    active = db_conn.execute("SELECT count(*) AS n FROM policies WHERE active").fetchone()
    assert active["n"] >= 1

    status = run(operator_command, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert "queue:failed" in json.loads(status.stdout)["queues"]
    assert run(operator_command, "init-db").returncode == 0


def test_the_files_settings_win_over_the_shell(operator_command):
    # A stray variable in the operator's shell must not point the tools elsewhere.
    result = run(operator_command, "check-connections", "--json", env={"REDIS_PORT": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
