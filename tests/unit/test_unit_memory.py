"""Every long-running unit site.yml installs has a memory cap systemd accepts.

The units are rendered from the production inventory with ansible-core's own
loader (tests/support/ansible_render.py); the memory lines are then parsed by systemd
itself (systemd-analyze verify), so a value systemd would ignore fails here.
"""

from __future__ import annotations

import shutil
import subprocess

import jinja2
import pytest

from tests.support.ansible_render import REPO, HostConfig, render_site

INVENTORY = REPO / "inventory" / "production.yml"
VAULT = REPO / "group_vars" / "vault.example.yml"
UNITS = {
    # host -> unit -> (MemoryMax, MemoryHigh) as the role defaults set them
    "gpu-01": {"unpack-worker.service": ("8G", None), "gpu-worker.service": ("90%", None)},
    "transfer-01": {"transfer-worker.service": ("2G", None)},
    "orch-01": {"ra-app.service": ("4G", None)},
}
MEMORY_KEYS = ("MemoryMax", "MemoryHigh", "MemorySwapMax", "OOMPolicy")


@pytest.fixture(scope="module")
def fleet() -> dict[str, HostConfig]:
    return render_site(INVENTORY, VAULT)


def service_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.parametrize(
    ("host", "unit"), [(h, u) for h, units in UNITS.items() for u in sorted(units)]
)
def test_unit_has_the_role_default_memory_cap(fleet, host, unit):
    rendered = fleet[host].files[f"/etc/systemd/system/{unit}"].text
    service = service_settings(rendered)
    memory_max, memory_high = UNITS[host][unit]
    assert service["MemoryMax"] == [memory_max]
    assert service["MemorySwapMax"] == ["0"]
    assert service.get("MemoryHigh", [None]) == [memory_high]
    if unit == "ra-app.service":
        # gunicorn's master replaces an OOM-killed worker; the unit keeps serving
        assert service["OOMPolicy"] == ["continue"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("host", sorted(UNITS))
def test_systemd_accepts_the_memory_settings(fleet, host, tmp_path):
    for unit in UNITS[host]:
        service = service_settings(fleet[host].files[f"/etc/systemd/system/{unit}"].text)
        lines = [f"{k}={v}" for k in MEMORY_KEYS for v in service.get(k, [])]
        path = tmp_path / unit
        path.write_text("[Service]\nExecStart=/bin/true\n" + "\n".join(lines) + "\n")
        done = subprocess.run(
            ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
        )
        assert done.stderr.strip() == "", f"{host}:{unit}: {done.stderr}"


TEMPLATES = {
    "roles/gpu_worker/templates/worker.service.j2": lambda high: {
        "item": {
            "name": "gpu-worker",
            "memory_max": "40G",
            "memory_high": high,
            "stop_timeout": 300,
            "start_timeout": 900,
            "watchdog_s": 3600,
        },
        "gpu_worker_stop_handback_s": 30,
    },
    "roles/transfer/templates/transfer-worker.service.j2": lambda high: {
        "transfer_memory_max": "1G",
        "transfer_memory_high": high,
        "transfer_stop_timeout": 120,
        "transfer_stop_handback_s": 30,
        "transfer_start_timeout": 300,
        "transfer_watchdog_s": 5400,
    },
    "roles/orchestrator/templates/ra-app.service.j2": lambda high: {
        "orchestrator_ra_app_memory_max": "6G",
        "orchestrator_ra_app_memory_high": high,
    },
}


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_memory_high_is_rendered_only_when_set(template):
    # a systemd unit, not HTML: nothing to escape
    env = jinja2.Environment(trim_blocks=True, undefined=jinja2.ChainableUndefined)  # noqa: S701
    env.filters["bool"] = bool
    unit = env.from_string((REPO / template).read_text())
    assert service_settings(unit.render(**TEMPLATES[template]("3G")))["MemoryHigh"] == ["3G"]
    assert "MemoryHigh" not in service_settings(unit.render(**TEMPLATES[template]("")))


def test_role_defaults_document_every_memory_variable():
    for role, names in {
        "gpu_worker": [
            "gpu_worker_memory_max",
            "gpu_worker_unpack_memory_max",
            "gpu_worker_memory_high",
            "gpu_worker_unpack_memory_high",
        ],
        "transfer": ["transfer_memory_max", "transfer_memory_high"],
        "orchestrator": ["orchestrator_ra_app_memory_max", "orchestrator_ra_app_memory_high"],
    }.items():
        defaults = (REPO / "roles" / role / "defaults" / "main.yml").read_text()
        specs = (REPO / "roles" / role / "meta" / "argument_specs.yml").read_text()
        for name in names:
            assert f"\n{name}:" in defaults, (role, name)
            assert f"      {name}:" in specs, (role, name)
