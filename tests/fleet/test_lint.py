"""Static checks of the Ansible tree: ansible-lint (production profile) and a
syntax check of every playbook. Fast, no machines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PLAYBOOKS = sorted((REPO / "playbooks").glob("*.yml"))
GUIDE_PLAYBOOKS = {
    "site.yml",
    "deploy-pipeline.yml",
    "deploy-ra-app.yml",
    "health-check.yml",
    "setup-new-worker.yml",
    "sync-models.yml",
}


def _env() -> dict[str, str]:
    return {
        "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(Path.home()),
        "LANG": "C.UTF-8",
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "NO_COLOR": "1",
    }


def _ansible(tool: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run an Ansible tool from the repository root, as an operator would."""
    return subprocess.run(
        [str(VENV_BIN / tool), *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_guides_playbooks_exist() -> None:
    assert {p.name for p in PLAYBOOKS} >= GUIDE_PLAYBOOKS


def test_ansible_lint_production_profile_is_clean() -> None:
    proc = _ansible("ansible-lint", "--profile", "production", "--offline", "--nocolor")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("inventory", ["inventory/production.yml", "inventory/staging.yml"])
def test_every_playbook_passes_the_syntax_check(inventory: str) -> None:
    proc = _ansible("ansible-playbook", "--syntax-check", "-i", inventory, *map(str, PLAYBOOKS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for playbook in PLAYBOOKS:
        assert f"playbook: {playbook}" in proc.stdout


def test_inventories_have_the_guides_groups_and_hosts() -> None:
    proc = _ansible("ansible-inventory", "-i", "inventory/production.yml", "--list", timeout=120)
    assert proc.returncode == 0, proc.stderr

    inv = json.loads(proc.stdout)
    for group in ("orchestrator", "gpu_workers", "transfer"):
        assert inv[group]["hosts"], group
    assert "gpu-01" in inv["gpu_workers"]["hosts"]
    # group_vars/ at the top level reach the inventory (inventory/group_vars link).
    gpu01 = inv["_meta"]["hostvars"]["gpu-01"]
    assert gpu01["gpu_worker_batch_size"] > 0
    assert gpu01["app_user"] == "audio"


def test_vault_example_names_every_secret_and_holds_none() -> None:
    import yaml

    example = yaml.safe_load((REPO / "group_vars" / "vault.example.yml").read_text())
    for name in (
        "vault_postgres_password",
        "vault_ra_app_secret_key",
        "vault_s3_access_key",
        "vault_s3_secret_key",
        "vault_redis_password",
    ):
        assert name in example
        assert "change-me" in example[name] or "replace" in example[name]
    # Where the inventory finds it: encrypted whole, or value by value (encrypt_string).
    vault = REPO / "group_vars" / "all" / "vault.yml"
    if vault.exists() and not vault.read_text().startswith("$ANSIBLE_VAULT"):
        loader = type("VaultLoader", (yaml.SafeLoader,), {})
        loader.add_constructor("!vault", lambda _loader, _node: "<encrypted>")
        values = yaml.load(vault.read_text(), Loader=loader) or {}  # noqa: S506
        plain = [name for name, value in values.items() if value != "<encrypted>"]
        assert not plain, f"group_vars/all/vault.yml: not ansible-vault encrypted: {plain}"
