"""Central configuration, read from the environment.

Every setting has a local default so a developer can run a worker against the
local stack (``make stack-up``) with nothing exported. With ``APP_ENV=production``
(what the Ansible units set) the settings marked required have no default, and a
missing one stops the process at start-up with a message naming the variable,
instead of a worker quietly talking to localhost.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote


class ConfigError(RuntimeError):
    """A setting is missing or malformed; the message names the variable."""


# Queue names are part of the operator contract (redis-cli commands in the README).
QUEUE_UNPACK = "queue:unpack"
QUEUE_TRANSCRIBE = "queue:transcribe"
QUEUE_FAILED = "queue:failed"


def host_transcribe_queue(host: str) -> str:
    """The host-local transcribe queue: files unpacked on ``host`` live only there."""
    return f"{QUEUE_TRANSCRIBE}:{host}"


class EnvReader:
    """Reads typed values from a mapping, collecting every problem before failing."""

    def __init__(self, environ: Mapping[str, str], production: bool) -> None:
        self.environ = environ
        self.production = production
        self.errors: list[str] = []

    def str(self, name: str, default: str, *, required: bool = False) -> str:
        value = self.environ.get(name, "").strip()
        if value:
            return value
        if required and self.production:
            self.errors.append(f"{name} must be set (APP_ENV=production has no default)")
        return default

    def int(self, name: str, default: int, *, minimum: int | None = None) -> int:
        raw = self.environ.get(name, "").strip()
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.errors.append(f"{name}={raw!r} is not an integer")
            return default
        if minimum is not None and value < minimum:
            self.errors.append(f"{name}={value} is below the minimum {minimum}")
        return value

    def float(
        self, name: str, default: float, *, minimum: float | None = None,
        above: float | None = None,
    ) -> float:  # fmt: skip
        """A number; ``minimum`` is inclusive, ``above`` exclusive (e.g. 0 for durations)."""
        raw = self.environ.get(name, "").strip()
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.errors.append(f"{name}={raw!r} is not a number")
            return default
        if minimum is not None and value < minimum:
            self.errors.append(f"{name}={raw} is below the minimum {minimum}")
        if above is not None and value <= above:
            self.errors.append(f"{name}={raw} must be above {above}")
        return value

    def raise_if_errors(self) -> None:
        """Stop with every problem found so far, each naming its variable."""
        if self.errors:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(self.errors))

    def bool(self, name: str, default: bool) -> bool:
        raw = self.environ.get(name, "").strip().lower()
        if not raw:
            return default
        if raw in {"1", "true", "yes", "on"}:
            return True
        if raw in {"0", "false", "no", "off"}:
            return False
        self.errors.append(f"{name}={raw!r} is not a boolean (use true/false)")
        return default


@dataclass(frozen=True)
class Settings:
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
    def production(self) -> bool:
        return self.app_env == "production"

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


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from ``environ`` (default: the process environment).

    Raises ConfigError listing every missing or malformed variable at once, so an
    operator fixes a unit file in one pass rather than one restart per variable.
    """
    environ = os.environ if environ is None else environ
    app_env = environ.get("APP_ENV", "development").strip() or "development"
    env = EnvReader(environ, production=app_env == "production")
    settings = Settings(
        app_env=app_env,
        worker_host=env.str("WORKER_HOST", socket.gethostname()),
        redis_host=env.str("REDIS_HOST", "127.0.0.1", required=True),
        redis_port=env.int("REDIS_PORT", 16379, minimum=1),
        redis_db=env.int("REDIS_DB", 0, minimum=0),
        redis_password=env.str("REDIS_PASSWORD", "") or None,
        postgres_host=env.str("POSTGRES_HOST", "127.0.0.1", required=True),
        postgres_port=env.int("POSTGRES_PORT", 15432, minimum=1),
        postgres_db=env.str("POSTGRES_DB", "audio_pipeline"),
        postgres_user=env.str("POSTGRES_USER", "pipeline"),
        postgres_password=env.str("POSTGRES_PASSWORD", "") or None,
        s3_endpoint=env.str("S3_ENDPOINT", "http://127.0.0.1:18333", required=True),
        s3_access_key=env.str("S3_ACCESS_KEY", "devaccess", required=True),
        s3_secret_key=env.str("S3_SECRET_KEY", "devsecret-change-me", required=True),
        s3_bucket=env.str("S3_BUCKET", "audio-archives"),
        s3_region=env.str("S3_REGION", "us-east-1"),
        # The guide's local defaults; production sets /data/scratch and /data/models.
        scratch_root=Path(env.str("SCRATCH_ROOT", "/tmp/scratch", required=True)),  # noqa: S108
        models_root=Path(env.str("MODELS_ROOT", "/tmp/models", required=True)),  # noqa: S108
    )
    env.raise_if_errors()
    return settings


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
