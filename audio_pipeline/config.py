"""Central configuration, read from the environment.

Every setting has a local default so a developer can run a worker against the
local stack (``make stack-up``) with nothing exported. With ``APP_ENV=production``
(what the Ansible units set) the settings marked required have no default, and a
missing one stops the process at start-up with a message naming the variable,
instead of a worker quietly talking to localhost.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Self, TypeVar
from urllib.parse import quote

from audio_pipeline.logs import log_event

log = logging.getLogger(__name__)


class ConfigError(RuntimeError):
    """A setting is missing or malformed; the message names the variable."""


class Device(StrEnum):
    """Where a model runs (ASR_DEVICE, CLASSIFIER_DEVICE); AUTO takes CUDA when the
    host has a GPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


PRODUCTION = "production"  # the APP_ENV of a real fleet, which has no dev defaults


class HasAppEnv:
    """A settings class that carries APP_ENV (the pipeline's, the RA app's)."""

    app_env: str

    @property
    def production(self) -> bool:
        return self.app_env == PRODUCTION


# The local stack's development credentials (devtools/devstack.py starts services with
# them), so a process run on a developer's machine with nothing exported finds it.
# Real checks (Redis AUTH, scram passwords, S3 signatures) with values that are
# obviously not secrets; APP_ENV=production never falls back to them.
DEV_REDIS_PASSWORD = "dev-redis-password"  # noqa: S105
DEV_PIPELINE_PASSWORD = "dev-pipeline"  # noqa: S105
DEV_S3_ACCESS_KEY = "devaccess"
DEV_S3_SECRET_KEY = "devsecret-change-me"  # noqa: S105
DEV_S3_BUCKET = "audio-archives"
DEV_DB = "audio_pipeline"

# Queue names are part of the operator contract (redis-cli commands in the README).
QUEUE_UNPACK = "queue:unpack"
QUEUE_TRANSCRIBE = "queue:transcribe"
QUEUE_FAILED = "queue:failed"
# Text-only jobs (`audio-pipeline reclassify`): stored transcripts judged again, no
# audio needed, so one shared queue that any gpu worker serves after its transcribe queues.
QUEUE_CLASSIFY = "queue:classify"


def host_transcribe_queue(host: str) -> str:
    """The host-local transcribe queue: files unpacked on ``host`` live only there."""
    return f"{QUEUE_TRANSCRIBE}:{host}"


# Variables renamed so every duration ends in _S. The old name is still read, with a
# warning, for one release; remove an entry once no unit or README uses it.
RENAMED: dict[str, str] = {
    "TRANSFER_STABLE_S": "TRANSFER_STABLE_SECONDS",
    "TRANSFER_POLL_S": "TRANSFER_POLL_SECONDS",
    "TRANSFER_PROGRESS_S": "TRANSFER_PROGRESS_SECONDS",
    "TRANSFER_RETRY_BASE_S": "TRANSFER_RETRY_BASE_SECONDS",
    "RA_ASSIGNMENT_TTL_S": "RA_ASSIGNMENT_TTL",
    "RA_TIMEOUT_S": "RA_TIMEOUT",
}

E = TypeVar("E", bound=StrEnum)
N = TypeVar("N", int, float)


class EnvReader:
    """The one reader of environment variables: typed values, every problem collected.

    A process makes one reader at start-up, hands it to each settings class it needs
    (their ``read(env)`` classmethods never raise), then calls ``raise_if_errors`` once,
    so an operator sees every missing or malformed variable in a single message.

    ``required=True`` means the variable has no default anywhere; ``production=True``
    means only APP_ENV=production lacks a default (the local stack's values are
    development defaults, never a fallback for a real fleet).
    """

    def __init__(
        self, environ: Mapping[str, str] | None = None, production: bool | None = None
    ) -> None:
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        self.app_env = self.environ.get("APP_ENV", "").strip() or "development"
        self.production = self.app_env == PRODUCTION if production is None else production
        self.errors: list[str] = []

    def raw(self, name: str) -> str:
        """The stripped value of ``name`` (or of its pre-rename alias), '' if unset."""
        value = self.environ.get(name, "").strip()
        old = RENAMED.get(name)
        if not value and old:
            value = self.environ.get(old, "").strip()
            if value:
                log_event(log, "config.renamed", level=logging.WARNING, old=old, new=name)
        return value

    def _missing(self, name: str, required: bool, production: bool) -> None:
        if required:
            self.errors.append(f"{name} must be set")
        elif production and self.production:
            self.errors.append(f"{name} must be set (APP_ENV=production has no default)")

    def str(
        self, name: str, default: str = "", *, required: bool = False, production: bool = False
    ) -> str:
        value = self.raw(name)
        if value:
            return value
        self._missing(name, required, production)
        return default

    def path(
        self, name: str, default: Path | str, *, required: bool = False, production: bool = False
    ) -> Path:
        return Path(self.str(name, str(default), required=required, production=production))

    def int(
        self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        return self._number(name, default, int, "an integer", minimum, maximum)

    def float(
        self,
        name: str,
        default: float,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        above: float | None = None,
    ) -> float:
        """A number; ``minimum``/``maximum`` are inclusive, ``above`` exclusive."""
        return self._number(name, default, float, "a number", minimum, maximum, above)

    def _number(
        self,
        name: str,
        default: N,
        parse: Callable[[str], N],
        kind: str,
        minimum: float | None,
        maximum: float | None,
        above: float | None = None,
    ) -> N:
        raw = self.raw(name)
        if not raw:
            return default
        try:
            value = parse(raw)
        except ValueError:
            self.errors.append(f"{name}={raw!r} is not {kind}")
            return default
        self._check_range(name, value, minimum, maximum)
        if above is not None and value <= above:
            self.errors.append(f"{name}={raw} must be above {above}")
        return value

    def seconds(self, name: str, default: float, *, allow_zero: bool = False) -> float:
        """A duration in seconds; its name ends in _S (see RENAMED for older names)."""
        if allow_zero:
            return self.float(name, default, minimum=0)
        return self.float(name, default, above=0)

    def bool(self, name: str, default: bool) -> bool:
        raw = self.raw(name).lower()
        if not raw:
            return default
        if raw in {"1", "true", "yes", "on"}:
            return True
        if raw in {"0", "false", "no", "off"}:
            return False
        self.errors.append(f"{name}={raw!r} is not a boolean (use true/false)")
        return default

    def choice(self, name: str, enum: type[E], default: E) -> E:
        raw = self.raw(name).lower()
        if not raw:
            return default
        try:
            return enum(raw)
        except ValueError:
            allowed = ", ".join(member.value for member in enum)
            self.errors.append(f"{name}={raw!r} is not one of: {allowed}")
            return default

    def error(self, message: str) -> None:
        """Record a problem a settings class found beyond one variable's type."""
        self.errors.append(message)

    def _check_range(
        self, name: str, value: float, minimum: float | None, maximum: float | None
    ) -> None:
        if minimum is not None and value < minimum:
            self.errors.append(f"{name}={value} is below the minimum {minimum}")
        if maximum is not None and value > maximum:
            self.errors.append(f"{name}={value} is above the maximum {maximum}")

    def raise_if_errors(self) -> None:
        """Stop with every problem found so far, each naming its variable."""
        if self.errors:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(self.errors))


class EnvSettings:
    """Base of a settings class: ``read(env)`` collects its problems in ``env``;
    ``from_env`` reads it alone and raises them (for tests and tools; a process reads
    all of its settings from one reader, see runtime.service.read_service_config)."""

    @classmethod
    def read(cls, env: EnvReader) -> Self:
        raise NotImplementedError

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        return read_all(cls.read, environ)


@dataclass(frozen=True)
class Settings(EnvSettings, HasAppEnv):
    """Everything a pipeline process needs, resolved once at start-up."""

    app_env: str
    worker_host: str

    redis_host: str
    redis_port: int
    redis_db: int
    redis_password: str | None

    postgres_host: str
    postgres_port: int
    postgres_db: str
    postgres_user: str
    postgres_password: str | None

    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_bucket: str
    s3_region: str

    scratch_root: Path
    models_root: Path

    @property
    def database_url(self) -> str:
        """A libpq URL from the POSTGRES_* variables.

        DATABASE_URL is deliberately not read here: it is the RA app's setting and
        names the ra_app role, which may read but never write pipeline tables.
        """
        auth = quote(self.postgres_user, safe="")
        if self.postgres_password:
            auth += ":" + quote(self.postgres_password, safe="")
        return (
            f"postgresql://{auth}@{self.postgres_host}:{self.postgres_port}/"
            f"{quote(self.postgres_db, safe='')}"
        )

    @property
    def host_queue(self) -> str:
        return host_transcribe_queue(self.worker_host)

    def batch_scratch(self, batch_id: str) -> Path:
        return self.scratch_root / batch_id

    @classmethod
    def read(cls, env: EnvReader) -> Settings:
        """The connection and path settings every pipeline process shares."""
        return cls(
            app_env=env.app_env,
            worker_host=env.str("WORKER_HOST", socket.gethostname()),
            redis_host=env.str("REDIS_HOST", "127.0.0.1", production=True),
            redis_port=env.int("REDIS_PORT", 16379, minimum=1),
            redis_db=env.int("REDIS_DB", 0, minimum=0),
            redis_password=env.str("REDIS_PASSWORD", DEV_REDIS_PASSWORD, production=True) or None,
            postgres_host=env.str("POSTGRES_HOST", "127.0.0.1", production=True),
            postgres_port=env.int("POSTGRES_PORT", 15432, minimum=1),
            postgres_db=env.str("POSTGRES_DB", DEV_DB),
            postgres_user=env.str("POSTGRES_USER", "pipeline"),
            postgres_password=env.str("POSTGRES_PASSWORD", DEV_PIPELINE_PASSWORD, production=True)
            or None,
            s3_endpoint=env.str("S3_ENDPOINT", "http://127.0.0.1:18333", production=True),
            s3_access_key=env.str("S3_ACCESS_KEY", DEV_S3_ACCESS_KEY, production=True),
            s3_secret_key=env.str("S3_SECRET_KEY", DEV_S3_SECRET_KEY, production=True),
            s3_bucket=env.str("S3_BUCKET", DEV_S3_BUCKET),
            s3_region=env.str("S3_REGION", "us-east-1"),
            # The guide's local defaults; production sets /data/scratch and /data/models.
            scratch_root=env.path("SCRATCH_ROOT", "/tmp/scratch", production=True),  # noqa: S108
            models_root=env.path("MODELS_ROOT", "/tmp/models", production=True),  # noqa: S108
        )


T = TypeVar("T")


def read_all(read: Callable[[EnvReader], T], environ: Mapping[str, str] | None = None) -> T:
    """``read(env)`` on a fresh reader of ``environ``, raising every problem at once.

    For one settings class (tests, tools). A process that needs several reads them all
    from one reader so that a single ConfigError lists everything wrong.
    """
    env = EnvReader(environ)
    value = read(env)
    env.raise_if_errors()
    return value


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from ``environ`` (default: the process environment).

    Raises ConfigError listing every missing or malformed variable at once, so an
    operator fixes a unit file in one pass rather than one restart per variable.
    """
    return Settings.from_env(environ)


def settings_with_env_file(env_file: Path | None, current: Settings) -> Settings:
    """``current``, or the settings a host's units run with when an operator command
    names their environment file (``--env-file``): the file's values win over the
    process environment, as they do for the unit."""
    if env_file is None:
        return current
    from audio_pipeline.envfile import read_env_file

    try:
        values = read_env_file(env_file)
    except OSError as exc:
        raise ConfigError(f"cannot read environment file {env_file}: {exc}") from None
    return load_settings({**os.environ, **values})
