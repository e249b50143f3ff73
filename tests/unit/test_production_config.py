"""The production configuration, proven without machines: code and Ansible cannot drift.

Everything site.yml writes on each host of inventory/production.yml is rendered by
ansible-core itself (tests/support/ansible_render.py): group_vars, role defaults and
group_vars/vault.example.yml as the vault, whose placeholder secrets are fine here.
Each process the roles install (systemd units, the operators' python wrappers) then
gets the environment systemd or its wrapper would give it, and its settings are
loaded by the calls the process itself makes at start (APP_ENV=production, as
rendered): the workers' read_service_config, the gunicorn command line with the release's
gunicorn.conf.py and the RA app it preloads, the flask and audio-pipeline commands.
Then: the models the gpu workers open are the ones models.yml syncs; every Redis and
PostgreSQL client passes the server's firewall, listen address, pg_hba and Redis
auth as rendered; units name rendered env files and installed programs.

Relaxed, because only a host has them (everything else is checked as on a host):
- Model directories, nltk data and ffmpeg are not looked for: the backends open
  them in the workers' setup(), on the host. Instead every model path a process
  will open must be one that roles/gpu_worker/tasks/models.yml syncs.
- The collection host's key and known_hosts are not read (SshSettings does not
  read them either); they must be files the transfer role writes.
- Nothing connects anywhere: credentials are checked against the rendered
  redis.conf (requirepass, ACL users) and pg_hba.conf instead of servers, and
  PostgreSQL passwords not at all (the role sets them from the same variables).
- The PostgreSQL major version in pg_hba.conf's path is set on the host
  (ansible_render.HOST_FACTS).
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import os
import re
import shlex
import sys
import tomllib
from argparse import Namespace
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points
from ipaddress import ip_address, ip_network
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import redis
from psycopg.conninfo import conninfo_to_dict

from audio_pipeline import model_cli
from audio_pipeline.asr import AsrBackend, AsrSettings
from audio_pipeline.classify import ClassifierBackend, ClassifierSettings
from audio_pipeline.cli import build_parser
from audio_pipeline.config import Settings, load_settings
from audio_pipeline.envfile import parse_env_file
from audio_pipeline.redis_conn import get_redis
from audio_pipeline.runtime.service import Service, read_service_config
from audio_pipeline.ssh_source import REMOTE_HASH_TIMEOUT_S, SshSettings
from audio_pipeline.workers.gpu_worker import GpuSettings, GpuWorker
from audio_pipeline.workers.transfer_worker import TransferSettings, TransferWorker
from audio_pipeline.workers.unpack_worker import UnpackWorker
from ra_app.config import RASettings, load_ra_settings
from tests.support.ansible_render import REPO, HostConfig, render_site

INVENTORY = REPO / "inventory" / "production.yml"
VAULT = REPO / "group_vars" / "vault.example.yml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
# systemd's PATH for services; what the units add comes from Environment=.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
UNIT_DIR = PurePosixPath("/etc/systemd/system")
WRAPPER_DIR = PurePosixPath("/usr/local/bin")


@pytest.fixture(scope="module")
def fleet() -> dict[str, HostConfig]:
    return render_site(INVENTORY, VAULT)


@pytest.fixture(scope="module")
def procs(fleet: dict[str, HostConfig]) -> list[Process]:
    return processes(fleet)


@pytest.fixture(scope="module")
def started(
    procs: list[Process], tmp_path_factory: pytest.TempPathFactory
) -> dict[Process, dict[str, Any] | Exception]:
    """What each process loads at start, or why it cannot start (loaded once: the RA
    app's start takes seconds)."""
    tmp_path = tmp_path_factory.mktemp("hosts")
    results: dict[Process, dict[str, Any] | Exception] = {}
    for p in procs:
        if p.program in PROGRAM_LOADERS:
            try:
                results[p] = load(p, tmp_path)
            except Exception as exc:  # reported by test_every_process_loads_...
                results[p] = exc
    return results


def loaded(started: dict[Process, dict[str, Any] | Exception], p: Process) -> dict[str, Any]:
    result = started[p]
    if isinstance(result, Exception):
        pytest.fail(f"{p} cannot start (see test_every_process_loads_its_settings_in_production)")
    return result


# -- processes as the roles install them ------------------------------------------------


@dataclass(frozen=True, eq=False)
class Process:
    host: HostConfig
    name: str  # the unit or wrapper file, as installed
    argv: tuple[str, ...]
    environ: dict[str, str]
    env_files: tuple[str, ...]
    service: dict[str, list[str]]  # a unit's [Service] section; {} for a wrapper

    @property
    def program(self) -> str:
        return PurePosixPath(self.argv[0]).name

    def __str__(self) -> str:
        return f"{self.host.name}:{self.name}"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert current is not None, f"a unit file line before any [section]: {raw!r}"
        assert sep, f"not a unit file line: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_process(host: HostConfig, dest: str) -> Process:
    service = parse_unit(host.files[dest].text)["Service"]
    (exec_start,) = service["ExecStart"]
    env_files = tuple(f.removeprefix("-") for f in service.get("EnvironmentFile", []))
    environ = {"PATH": SYSTEMD_PATH}
    for assignments in service.get("Environment", []):
        environ.update(a.split("=", 1) for a in shlex.split(assignments))
    # As systemd does: the files override Environment=, later files earlier ones.
    for env_file in env_files:
        if env_file in host.files:
            environ.update(parse_env_file(host.files[env_file].text, env_file))
    argv = tuple(shlex.split(exec_start.lstrip("-@:+!")))
    return Process(host, dest, argv, environ, env_files, service)


def wrapper_process(host: HostConfig, dest: str) -> Process:
    """A python wrapper: loads ENV_FILE over the caller's environment, then execv()s."""
    tree = ast.parse(host.files[dest].text, dest)
    env_file = program = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "ENV_FILE":
            env_file = ast.literal_eval(node.value.args[0])  # type: ignore[attr-defined]
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "os.execv":
            program = ast.literal_eval(node.args[0])
    assert env_file, f"{host.name}:{dest}: no ENV_FILE found"
    assert program, f"{host.name}:{dest}: no os.execv found"
    environ = {"PATH": SYSTEMD_PATH}
    if env_file in host.files:
        environ.update(parse_env_file(host.files[env_file].text, env_file))
    return Process(host, dest, (program,), environ, (env_file,), {})


# Units that run a Debian program with fixed arguments and no settings of ours (the
# audit log's prune is one psql statement as the database superuser); judged by
# test_system_tool_units_are_sandboxed_oneshots instead.
SYSTEM_TOOL_PROGRAMS = {"/usr/bin/psql"}


def system_tool_units(fleet: dict[str, HostConfig]) -> list[Process]:
    return [
        unit_process(host, dest)
        for host in fleet.values()
        for dest in sorted(host.files)
        if PurePosixPath(dest).parent == UNIT_DIR
        and dest.endswith(".service")
        and unit_process(host, dest).argv[0] in SYSTEM_TOOL_PROGRAMS
    ]


def processes(fleet: dict[str, HostConfig]) -> list[Process]:
    found = []
    for host in fleet.values():
        for dest, f in sorted(host.files.items()):
            path = PurePosixPath(dest)
            if path.parent == UNIT_DIR and path.suffix == ".service":
                unit = unit_process(host, dest)
                if unit.argv[0] not in SYSTEM_TOOL_PROGRAMS:
                    found.append(unit)
            elif path.parent == WRAPPER_DIR and "python" in f.text.partition("\n")[0]:
                found.append(wrapper_process(host, dest))
    return found


def on_disk(host: HostConfig, path: str, tmp_path: Path) -> Path | None:
    """Where a file the process opens is here: rendered by a role, or in the release."""
    if path in host.files:
        local = tmp_path / host.name / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(host.files[path].text)
        return local
    for root in host.code_roots:
        # src -> releases/<sha>, a `git archive` of this repository (common/tasks/code.yml)
        if path.startswith(f"{root}/src/"):
            return REPO / path.removeprefix(f"{root}/src/")
    return None


def program_problem(host: HostConfig, executable: str) -> str | None:
    """None when ``executable`` is a program the host's virtualenvs install."""
    path = PurePosixPath(executable)
    venv = path.parent.parent
    if path.parent.name != "bin" or venv.name != "venv":
        return f"{executable} is not in a virtualenv the roles deploy"
    if str(venv.parent) not in host.code_roots:
        return f"{executable}: no role deploys a virtualenv at {venv}"
    name = path.name
    if name == "python" or name in SCRIPTS:
        return None
    # Another package's command (gunicorn, flask): installed only with its extra.
    extras = host.code_roots[str(venv.parent)]
    wanted = PYPROJECT["project"]["dependencies"] + [
        r for e in extras for r in PYPROJECT["project"]["optional-dependencies"][e]
    ]
    installed = {canonical(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) for r in wanted}
    providers = {canonical(ep.dist.name) for ep in entry_points(group="console_scripts", name=name)}
    if not providers & installed:
        return f"{executable}: no package installed there (extras {extras}) provides {name}"
    return None


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@contextmanager
def running_as(process: Process, environ: dict[str, str] | None = None) -> Iterator[None]:
    """The process's environment, argv and import path, restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            mp.delenv(key)
        for key, value in (process.environ if environ is None else environ).items():
            mp.setenv(key, value)
        mp.setattr(sys, "argv", list(process.argv))
        mp.setattr(sys, "path", list(sys.path))  # gunicorn and flask prepend to it
        mp.chdir(Path.cwd())
        yield


# -- what each program loads at start ---------------------------------------------------


# The worker each console script runs; run_worker reads its whole configuration with
# runtime.service.read_service_config, the function called here.
WORKERS: dict[str, type[Service]] = {
    "unpack-worker": UnpackWorker,
    "gpu-worker": GpuWorker,
    "transfer-worker": TransferWorker,
}


def load_worker(process: Process, tmp_path: Path) -> dict[str, Any]:
    # The constructors themselves cannot run here (the unpack worker creates
    # SCRATCH_ROOT and wants ffmpeg); what they are given is what is read here.
    config = read_service_config(WORKERS[process.program])
    loaded: dict[str, Any] = {
        "settings": config.settings,
        "stage": config.stage,
        "timings": config.timings,
    }
    if isinstance(config.stage, GpuSettings):
        loaded |= {"asr": config.stage.asr, "classifier": config.stage.classifier}
    if isinstance(config.stage, TransferSettings):
        loaded["ssh"] = config.stage.collection
    return loaded


def load_gunicorn(process: Process, tmp_path: Path) -> dict[str, Any]:
    from gunicorn.app.wsgiapp import WSGIApplication

    argv = list(process.argv)
    option = next(o for o in ("--config", "-c") if o in argv)
    config = on_disk(process.host, argv[argv.index(option) + 1], tmp_path)
    assert config is not None, f"{process}: no role writes gunicorn's config {argv}"
    argv[argv.index(option) + 1] = str(config)
    sys.argv = ["gunicorn", *argv[1:]]
    app = WSGIApplication("%(prog)s [OPTIONS] [APP_MODULE]", prog="gunicorn")
    # preload_app: the master builds the app before forking, so a bad setting stops the start
    wsgi = app.load()
    return {
        "gunicorn": app.cfg,
        "config": process.argv[argv.index(option) + 1],  # as the host names it
        "config_file": config,  # here
        **ra_app_loaded(wsgi, load_ra_settings()),
    }


def ra_app_loaded(app: Any, settings: Any) -> dict[str, Any]:
    # the limiter's storage as this app built it (the Limiter object is shared)
    return {"app": app, "ra": settings, "limiter": next(iter(app.extensions["limiter"])).storage}


def load_flask(process: Process, tmp_path: Path) -> dict[str, Any]:
    from flask.cli import ScriptInfo

    # `flask --app ra_app ...`: the CLI finds and calls the create_app factory
    return ra_app_loaded(ScriptInfo(app_import_path="ra_app").load_app(), load_ra_settings())


def load_pipeline_cli(process: Process, tmp_path: Path) -> dict[str, Any]:
    return {"settings": load_settings()}  # audio_pipeline.cli.main


PROGRAM_LOADERS: dict[str, Callable[[Process, Path], dict[str, Any]]] = {
    **dict.fromkeys(WORKERS, load_worker),
    "gunicorn": load_gunicorn,
    "flask": load_flask,
    "audio-pipeline": load_pipeline_cli,
}


def load(process: Process, tmp_path: Path) -> dict[str, Any]:
    with running_as(process):
        return PROGRAM_LOADERS[process.program](process, tmp_path)


# -- the tests --------------------------------------------------------------------------


def test_site_renders_every_role_template_for_production(fleet: dict[str, HostConfig]) -> None:
    rendered = {f.src for host in fleet.values() for f in host.files.values()}
    templates = set((REPO / "roles").glob("*/templates/**/*.j2"))
    assert templates - rendered == set(), "role templates no production host gets"
    assert {"common", "orchestrator", "gpu_worker", "transfer"} <= {
        r for host in fleet.values() for r in host.roles
    }
    errors = [f"{h.name}: {e}" for h in fleet.values() for e in h.argument_errors]
    assert not errors, "\n".join(
        ["the roles' argument specs reject production's variables:", *errors]
    )


def test_system_tool_units_are_sandboxed_oneshots(fleet: dict[str, HostConfig]) -> None:
    units = system_tool_units(fleet)
    assert [(u.host.name, u.name) for u in units] == [
        ("orch-01", "/etc/systemd/system/ra-audit-prune.service")
    ]
    for unit in units:
        assert unit.service["Type"] == ["oneshot"]
        for setting in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
            assert unit.service[setting] == ["yes"], (unit, setting)
        assert unit.service["ProtectSystem"] == ["strict"]
    argv = units[0].argv
    commands = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "-c"]
    # as the pruner role, never the superuser itself; at least a day kept
    assert commands[0] == "SET SESSION AUTHORIZATION ra_audit_pruner", argv
    assert re.fullmatch(r"SELECT ra_audit_log_prune\([1-9]\d*, '[\w.-]+'\)", commands[1]), argv


def test_units_and_wrappers_name_rendered_files_and_installed_programs(
    procs: list[Process],
) -> None:
    assert {p.program for p in procs} >= {
        "unpack-worker",
        "gpu-worker",
        "transfer-worker",
        "gunicorn",
    }
    problems = []
    for p in procs:
        if p.program not in PROGRAM_LOADERS:
            problems.append(f"{p}: runs {p.program}, which this test does not know how to load")
        if not p.env_files:
            problems.append(f"{p}: reads no environment file")
        problems += [
            f"{p}: {f} is not a file a role renders on {p.host.name}"
            for f in p.env_files
            if f not in p.host.files
        ]
        problems += filter(None, [program_problem(p.host, p.argv[0])])
        if p.service:
            problems += sandbox_problems(p)
        else:  # a wrapper: its interpreter is a deployed virtualenv's too
            shebang = p.host.files[p.name].text.partition("\n")[0].removeprefix("#!")
            problems += filter(None, [program_problem(p.host, shebang.strip())])
        if p.program in SCRIPTS:
            module, _, function = SCRIPTS[p.program].partition(":")
            if not callable(getattr(import_module(module), function, None)):
                problems.append(f"{p}: {SCRIPTS[p.program]} is not callable")
        text = p.host.files[p.name].text
        for root in p.host.code_roots:
            for rel in re.findall(re.escape(f"{root}/src/") + r"([^\s\"']+)", text):
                if not (REPO / rel).exists():
                    problems.append(f"{p}: {root}/src/{rel} is not in the release")
    assert not problems, "\n".join(["", *problems])


def sandbox_problems(p: Process) -> list[str]:
    """What a unit under ProtectSystem=strict writes must lie under its ReadWritePaths."""
    if p.service.get("ProtectSystem") != ["strict"]:
        return []
    writable = [PurePosixPath(w) for ws in p.service.get("ReadWritePaths", []) for w in ws.split()]
    writes: list[str] = []
    if p.program in WORKERS:
        writes.append(p.environ.get("SCRATCH_ROOT", "<unset SCRATCH_ROOT>"))
    if p.program == "gunicorn" and p.environ.get("RA_ERROR_LOG_FILE"):
        writes.append(p.environ["RA_ERROR_LOG_FILE"])
    return [
        f"{p}: writes {w}, outside ReadWritePaths {[str(x) for x in writable]}"
        for w in writes
        if not any(PurePosixPath(w).is_relative_to(x) for x in writable)
    ]


def test_every_process_loads_its_settings_in_production(
    procs: list[Process], started: dict[Process, dict[str, Any] | Exception]
) -> None:
    problems = []
    for p, result in started.items():
        if p.environ.get("APP_ENV") != "production":
            problems.append(f"{p}: APP_ENV={p.environ.get('APP_ENV')!r}, not production")
        if isinstance(result, Exception):
            problems.append(f"{p}: {p.program} fails to start: {type(result).__name__}: {result}")
            continue
        problems += [
            f"{p}: loaded {name} for {value.app_env}, not production"
            for name, value in result.items()
            if isinstance(value, Settings | RASettings) and not value.production
        ]
        if "ssh" in result:
            ssh: SshSettings = result["ssh"]
            written = p.host.files.keys() | p.host.copied
            problems += [
                f"{p}: {path} is not a file the transfer role writes"
                for path in (str(ssh.key_path), str(ssh.known_hosts))
                if path not in written
            ]
    assert len(started) == len([p for p in procs if p.program in PROGRAM_LOADERS])
    assert not problems, "\n".join(["", *problems])


def test_each_worker_script_runs_the_worker_checked_here() -> None:
    for program, worker_cls in WORKERS.items():
        module, _, _ = SCRIPTS[program].partition(":")
        assert worker_cls.__module__ == module, f"{program} runs {module}, not {worker_cls}"


# What a worker needs after its stop grace to hand its claim back and exit.
MIN_HANDBACK_S = 15


def test_worker_units_hand_the_claim_back_before_systemd_kills_them(
    procs: list[Process], started: dict[Process, dict[str, Any] | Exception]
) -> None:
    workers = [p for p in procs if p.program in WORKERS]
    assert {p.program for p in workers} == set(WORKERS)
    problems = []
    for p in workers:
        (stop_timeout,) = p.service["TimeoutStopSec"]
        grace = loaded(started, p)["timings"].stop_grace_s
        if p.service.get("KillMode") != ["mixed"]:
            problems.append(f"{p}: KillMode is not mixed: ffmpeg would die at the first SIGTERM")
        if not 0 < grace <= float(stop_timeout) - MIN_HANDBACK_S:
            problems.append(
                f"{p}: stop grace {grace} s leaves under {MIN_HANDBACK_S} s of "
                f"TimeoutStopSec={stop_timeout} to hand the claim back"
            )
    assert not problems, "\n".join(["", *problems])


def longest_silent_step(program: str, stage: Any) -> tuple[str, float]:
    """The longest step of a worker that reports no progress, as the process sets it."""
    if program == "unpack-worker":
        return "one ffmpeg (UNPACK_FFMPEG_TIMEOUT_S)", stage.audio.timeout_s
    if program == "transfer-worker":
        return "the remote sha256sum (REMOTE_HASH_TIMEOUT_S)", REMOTE_HASH_TIMEOUT_S
    return "zero", 0.0


def test_worker_units_are_watched_by_systemd_from_their_main_loop(
    procs: list[Process], started: dict[Process, dict[str, Any] | Exception]
) -> None:
    """Type=notify with a watchdog, longer than the longest step that reports no
    progress (a setting the process loads, so the two cannot drift apart)."""
    problems = []
    for p in procs:
        if p.program not in WORKERS:
            continue
        s = p.service
        wanted = {"Type": ["notify"], "NotifyAccess": ["main"], "LimitCORE": ["0"]}
        problems += [
            f"{p}: {key}={s.get(key)}, not {value}"
            for key, value in wanted.items()
            if s.get(key) != value
        ]
        (watchdog,) = s.get("WatchdogSec", ["0"])
        (start,) = s.get("TimeoutStartSec", ["0"])
        if not float(start) > 0:
            problems.append(f"{p}: no TimeoutStartSec")
        what, seconds = longest_silent_step(p.program, loaded(started, p)["stage"])
        if not float(watchdog) > seconds:
            problems.append(f"{p}: WatchdogSec={watchdog} is not above {what}: {seconds} s")
    assert not problems, "\n".join(["", *problems])


def test_ra_app_runs_the_one_gunicorn_config_on_loopback_behind_nginx(
    procs: list[Process], started: dict[Process, dict[str, Any] | Exception]
) -> None:
    (ra,) = [p for p in procs if p.program == "gunicorn"]
    result = loaded(started, ra)
    cfg = result["gunicorn"]
    problems = []
    if result["config_file"] != REPO / "ra_app" / "gunicorn.conf.py":
        problems.append(f"runs {result['config']}, not the release's (benchmarked) config")
    if [host for host, _ in cfg.address] != ["127.0.0.1"]:
        problems.append(f"gunicorn binds {cfg.bind}: only nginx, on this host, may reach it")
    if cfg.worker_class_str != "gthread":
        problems.append(f"worker_class {cfg.worker_class_str}, benchmarked with gthread")
    for setting in ("workers", "threads"):
        name = f"orchestrator_ra_app_{setting}"
        if name in ra.host.role_variables["orchestrator"]:
            if getattr(cfg, setting) != int(wanted := ra.host.var("orchestrator", name)):
                problems.append(f"{getattr(cfg, setting)} {setting}, but {name} is {wanted}")
        else:
            problems.append(f"no role variable sets gunicorn's {setting} ({name})")
    if not cfg.preload_app:
        problems.append("no preload_app: a broken setting would fail each request, not the start")
    if cfg.graceful_timeout >= float(ra.service["TimeoutStopSec"][0]):
        problems.append("graceful_timeout is not below TimeoutStopSec: systemd kills mid-request")
    sites = [f.text for d, f in ra.host.files.items() if d.startswith("/etc/nginx/")]
    upstreams = [re.findall(r"upstream\s+\w+\s*\{[^}]*?\bserver\s+([^\s;]+)", t) for t in sites]
    if cfg.bind != [u for found in upstreams for u in found]:
        problems.append(f"nginx proxies to {upstreams}, gunicorn binds {cfg.bind}")
    assert not problems, "\n".join(["", *problems])


@dataclass(frozen=True)
class RedisConf:
    bind: tuple[str, ...]
    port: int
    requirepass: str | None
    users: dict[str, tuple[str, ...]]  # ACL rules by user name

    @classmethod
    def parse(cls, text: str) -> RedisConf:
        bind: tuple[str, ...] = ("127.0.0.1",)
        port, requirepass, users = 6379, None, {}
        for line in text.splitlines():
            if line.lstrip().startswith("#"):
                continue  # only whole lines are comments: "#<sha256>" is an ACL password
            # redis.conf's "..." strings take backslash escapes, as a POSIX shell's do
            match shlex.split(line):
                case ["bind", *addresses]:
                    bind = tuple(addresses)
                case ["port", value]:
                    port = int(value)
                case ["requirepass", value]:
                    requirepass = value
                case ["user", name, *rules]:
                    users[name] = tuple(rules)
        return cls(bind, port, requirepass, users)

    def refuses(self, username: str | None, password: str | None, key: str) -> str | None:
        """Why this client cannot write ``key``; None when it can."""
        if not username or username == "default":
            if self.requirepass is None or password == self.requirepass:
                return None
            return "wrong requirepass" if password else "no password, but requirepass is set"
        rules = self.users.get(username)
        if rules is None:
            return f"no ACL user {username!r}"
        digest = "#" + hashlib.sha256((password or "").encode()).hexdigest()
        if "on" not in rules or not {digest, f">{password}", "nopass"} & set(rules):
            return f"ACL user {username!r} does not take this password"
        patterns = [r[1:] for r in rules if r.startswith("~")] + [
            "*" for r in rules if r == "allkeys"
        ]
        if not any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns):
            return f"ACL user {username!r} may not touch {key!r} (keys {patterns})"
        return None


def pg_listens(text: str) -> tuple[set[str], int]:
    addresses = re.search(r"^listen_addresses\s*=\s*'([^']*)'", text, re.M)
    port = re.search(r"^port\s*=\s*(\d+)", text, re.M)
    listen = {a.strip() for a in (addresses.group(1) if addresses else "localhost").split(",")}
    return {"127.0.0.1" if a == "localhost" else a for a in listen}, int(
        port.group(1) if port else 5432
    )


def pg_hba_refuses(text: str, db: str, user: str, client: str) -> str | None:
    """pg_hba.conf's verdict on a TCP connection: its first matching line decides."""
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 5 or words[0] not in {"host", "hostssl"}:
            continue
        dbs, users, address, method = words[1:5]
        if (
            {"all", db} & set(dbs.split(","))
            and {"all", user} & set(users.split(","))
            and ip_address(client) in ip_network(address, strict=False)
        ):
            return "pg_hba rejects it" if method == "reject" else None
    return f"no pg_hba line lets {user}@{client} into {db}"


def firewall_refuses(host: HostConfig, client: str, port: int) -> str | None:
    """The host's nftables input chain (policy drop) on a TCP connection from ``client``."""
    ruleset = host.files.get("/etc/nftables.conf")
    if ruleset is None:
        return None  # no firewall on this host
    if ip_address(client).is_loopback:
        return None if re.search(r'iifname "lo" accept', ruleset.text) else "loopback is dropped"
    for source, dport in re.findall(r"\bsaddr (\S+) tcp dport (\d+) accept", ruleset.text):
        if int(dport) == port and ip_address(client) in ip_network(source, strict=False):
            return None
    return f"the firewall drops {client} -> port {port}"


def fleet_address(host: HostConfig) -> str:
    return str(host.var(host.roles[0], "fleet_address"))


def connections(result: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Where a started process connects, with what its client libraries were given."""
    if "settings" in result:
        settings: Settings = result["settings"]
        redis_kwargs = get_redis(settings).connection_pool.connection_kwargs
        yield "redis", {**redis_kwargs, "key": "queue:unpack"}
        yield "postgresql", conninfo_to_dict(settings.database_url)
    if "limiter" in result:
        storage = result["limiter"]
        redis_kwargs = storage.storage.connection_pool.connection_kwargs
        yield "redis", {**redis_kwargs, "key": f"{storage.key_prefix}:login"}
        yield "postgresql", conninfo_to_dict(result["ra"].database_url)
        ra: RASettings = result["ra"]
        # The operator page: the queues through its own ACL user, the pipeline's rows.
        if ra.operator_redis_url:
            operator = redis.Redis.from_url(ra.operator_redis_url).connection_pool
            yield "redis", {**operator.connection_kwargs, "key": "queue:failed"}
        if ra.operator_database_url:
            yield "postgresql", conninfo_to_dict(ra.operator_database_url)


def connection_problems(
    fleet: dict[str, HostConfig], p: Process, service: str, conn: dict[str, Any]
) -> list[str]:
    address, port = str(conn["host"]), int(conn["port"])
    loopback = ip_address(address).is_loopback
    servers = [p.host] if loopback else [h for h in fleet.values() if fleet_address(h) == address]
    if not servers:
        return [f"{p}: {service} at {address}: no host of the fleet has that address"]
    server = servers[0]
    client = "127.0.0.1" if loopback else fleet_address(p.host)
    where = f"{p}: {service} on {server.name}:{port}"
    problems = [f"{where}: {why}" for why in [firewall_refuses(server, client, port)] if why]
    if service == "redis":
        confs = [
            RedisConf.parse(f.text) for d, f in server.files.items() if d.startswith("/etc/redis/")
        ]
        if not confs:
            return [*problems, f"{where}: no Redis there"]
        if address not in confs[0].bind or port != confs[0].port:
            problems.append(f"{where}: Redis listens on {confs[0].bind} port {confs[0].port}")
        if why := confs[0].refuses(conn.get("username"), conn.get("password"), conn["key"]):
            problems.append(f"{where}: Redis refuses it: {why}")
    else:
        pg = {
            PurePosixPath(d).name: f.text
            for d, f in server.files.items()
            if d.startswith("/etc/postgresql/")
        }
        if "pg_hba.conf" not in pg:
            return [*problems, f"{where}: no PostgreSQL there"]
        listen, pg_port = pg_listens("\n".join(t for n, t in pg.items() if n.endswith(".conf")))
        if address not in listen or port != pg_port:
            problems.append(f"{where}: PostgreSQL listens on {sorted(listen)} port {pg_port}")
        if why := pg_hba_refuses(pg["pg_hba.conf"], conn["dbname"], conn["user"], client):
            problems.append(f"{where}: {why}")
    return problems


def test_every_process_reaches_redis_and_postgresql_and_is_let_in(
    fleet: dict[str, HostConfig],
    procs: list[Process],
    started: dict[Process, dict[str, Any] | Exception],
) -> None:
    problems = []
    checked = 0
    for p in procs:
        result = started.get(p)
        if isinstance(result, dict):
            for service, conn in connections(result):
                checked += 1
                problems += connection_problems(fleet, p, service, conn)
    assert checked >= 10
    assert not problems, "\n".join(["", *problems])


def gpu_workers(procs: list[Process]) -> list[Process]:
    found = [p for p in procs if p.program == "gpu-worker"]
    assert found, "no host runs a gpu-worker"
    return found


def test_every_model_a_gpu_worker_opens_is_one_its_host_syncs(
    procs: list[Process], started: dict[Process, dict[str, Any] | Exception]
) -> None:
    problems = []
    for p in gpu_workers(procs):
        result = loaded(started, p)
        root = result["settings"].models_root
        asr: AsrSettings = result["asr"]
        classifier: ClassifierSettings = result["classifier"]
        opened = {f"ASR_MODEL={asr.model}": root / asr.model}
        if asr.backend is AsrBackend.WHISPERX:
            opened[f"ASR_ALIGN_MODEL={asr.align_model}"] = root / asr.align_model
            nltk_data = [d for d in p.environ.get("NLTK_DATA", "").split(os.pathsep) if d]
            if not nltk_data:
                problems.append(f"{p}: whisperx needs nltk's punkt_tab, and NLTK_DATA is unset")
            opened |= {f"NLTK_DATA={d}": Path(d) for d in nltk_data}
        if classifier.backend is ClassifierBackend.COPE_A:
            opened[f"CLASSIFIER_MODEL={classifier.model}"] = root / classifier.model
        models_root = Path(p.host.var("gpu_worker", "models_root"))
        synced = {models_root / name for name in p.host.var("gpu_worker", "gpu_worker_models")}
        problems += [
            f"{p}: opens {path} ({setting}), but models.yml syncs only "
            f"{sorted(str(s) for s in synced)}"
            for setting, path in opened.items()
            if Path(os.path.normpath(path)) not in synced
        ]
    assert not problems, "\n".join(["", *problems])


def test_models_yml_syncs_gpu_worker_models_with_the_workers_settings(
    procs: list[Process], tmp_path: Path
) -> None:
    for p in gpu_workers(procs):
        host = p.host
        syncs = [c for c in host.commands if c.argv[1:3] == ("models", "sync")]
        assert len(syncs) == 1, f"{host.name}: models.yml runs no `audio-pipeline models sync`"
        (sync,) = syncs
        assert sync.runs is True, f"{host.name}: the model sync is skipped"
        assert program_problem(host, sync.argv[0]) is None
        args = build_parser().parse_args(sync.argv[1:])
        assert args.names == list(host.var("gpu_worker", "gpu_worker_models"))
        assert args.dest == Path(p.environ["MODELS_ROOT"]), "synced elsewhere than MODELS_ROOT"
        assert str(args.env_file) in p.env_files, "the sync reads another env file than the workers"
        # Ansible's command runs with root's login environment, no APP_ENV there; the
        # settings come from the env file, over it (model_cli).
        with running_as(p, environ={"PATH": SYSTEMD_PATH}):
            env_file = on_disk(host, str(args.env_file), tmp_path)
            settings = model_cli.settings_for(Namespace(env_file=env_file), load_settings())
        assert settings.production
        assert settings.s3_bucket == p.environ["S3_BUCKET"]
