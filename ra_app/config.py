"""RA app settings, read from the environment.

Same rules as audio_pipeline.config: every setting has a local default so the app
runs against the local stack with nothing exported, and with APP_ENV=production the
secrets (DATABASE_URL, SECRET_KEY) must be set: a missing one stops start-up with a
message naming the variable instead of the app quietly using a development value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from audio_pipeline.config import (
    DEV_REDIS_PASSWORD,
    DEV_S3_ACCESS_KEY,
    DEV_S3_BUCKET,
    DEV_S3_SECRET_KEY,
    EnvReader,
    HasAppEnv,
)
from ra_app.audit_sample import AuditBand, parse_audit_bands
from ra_app.codebook import DEFAULT_CODEBOOK_PATH

DEV_DATABASE_URL = "postgresql://ra_app:dev-ra-app@127.0.0.1:15432/audio_pipeline"
DEV_SECRET_KEY = "dev-only-secret-key-not-for-production"  # noqa: S105
DEFAULT_CODEBOOK = DEFAULT_CODEBOOK_PATH  # the one default, ra_app.codebook's

# Seconds an unfinished, self-claimed assignment is held (RA_ASSIGNMENT_TTL_S).
ASSIGNMENT_TTL = 30 * 60
DOUBLE_CODED_SHARE = 0.2  # share of items coded by two different RAs
# Share of the classifier's unflagged items that enters the queue anyway (the audit
# sample), so that recall and prevalence can be estimated; see ra_app.audit_sample.
AUDIT_SHARE = 0.05
SESSION_LIFETIME = 12 * 3600  # seconds a login lasts (one working day)
API_TOKEN_DAYS = 30  # default lifetime of a bearer token, days
LOGIN_RATE_LIMIT = "10 per minute;50 per hour"  # per client address, POSTs only
PAGE_SIZE = 50  # rows per page in lists
# Days the audit log keeps its rows (RA_AUDIT_RETENTION_DAYS); 0 keeps them for ever.
# Rows go only when `flask --app ra_app audit-log prune` runs (cron or by hand).
AUDIT_RETENTION_DAYS = 0
# Pooled connections are replaced after this many seconds instead of pinged on every
# checkout (a SELECT 1 round trip per request); a connection that died meanwhile
# fails that one request and is discarded by the pool.
POOL_RECYCLE = 30 * 60


class QueueOrder(StrEnum):
    """The order in which the queue hands out flagged items (a study decision)."""

    SCORE = "score"  # highest classifier score first
    BATCH = "batch"  # batch by batch, in classification order
    RANDOM = "random"  # a shuffle fixed by RA_QUEUE_SEED
    UNCERTAINTY = "uncertainty"  # nearest the classifier's threshold first


class BlindMode(StrEnum):
    """Which items an RA reviews without the classifier's score, flag and evidence."""

    AUDIT = "audit"  # the audit sample's items only
    ALL = "all"  # every item
    NONE = "none"  # no item


@dataclass(frozen=True)
class RASettings(HasAppEnv):
    app_env: str
    database_url: str
    secret_key: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_bucket: str
    s3_region: str
    codebook_path: Path
    queue_order: QueueOrder
    queue_seed: str
    double_coded_share: float
    audit_share: float
    audit_bands: tuple[AuditBand, ...]
    blind: BlindMode
    assignment_ttl: int
    ratelimit_storage_uri: str
    session_cookie_secure: bool
    proxy_hops: int
    audit_retention_days: int
    audit_prune_database_url: str
    operator_redis_url: str
    operator_database_url: str
    prometheus_url: str

    def flask_config(self) -> dict[str, Any]:
        """The Flask config keys these settings map to."""
        return {
            "ENV_NAME": self.app_env,
            "SECRET_KEY": self.secret_key,
            "SQLALCHEMY_DATABASE_URI": sqlalchemy_url(self.database_url),
            "SQLALCHEMY_ENGINE_OPTIONS": {"pool_recycle": POOL_RECYCLE},
            "S3_ENDPOINT": self.s3_endpoint,
            "S3_ACCESS_KEY": self.s3_access_key,
            "S3_SECRET_KEY": self.s3_secret_key,
            "S3_BUCKET": self.s3_bucket,
            "S3_REGION": self.s3_region,
            "CODEBOOK_PATH": str(self.codebook_path),
            "RA_QUEUE_ORDER": self.queue_order.value,
            "RA_QUEUE_SEED": self.queue_seed,
            "RA_DOUBLE_CODED_SHARE": self.double_coded_share,
            "RA_AUDIT_SHARE": self.audit_share,
            "RA_AUDIT_BANDS": self.audit_bands,
            "RA_BLIND": self.blind.value,
            "RA_ASSIGNMENT_TTL": self.assignment_ttl,
            "RATELIMIT_STORAGE_URI": self.ratelimit_storage_uri,
            "RATELIMIT_HEADERS_ENABLED": True,
            "SESSION_COOKIE_SECURE": self.session_cookie_secure,
            "SESSION_COOKIE_HTTPONLY": True,
            "SESSION_COOKIE_SAMESITE": "Lax",
            "REMEMBER_COOKIE_SECURE": self.session_cookie_secure,
            "REMEMBER_COOKIE_HTTPONLY": True,
            "REMEMBER_COOKIE_SAMESITE": "Lax",
            "PERMANENT_SESSION_LIFETIME": SESSION_LIFETIME,
            "WTF_CSRF_TIME_LIMIT": SESSION_LIFETIME,
            "PAGE_SIZE": PAGE_SIZE,
            "RA_AUDIT_RETENTION_DAYS": self.audit_retention_days,
            "RA_AUDIT_PRUNE_DATABASE_URL": self.audit_prune_database_url,
            "OPERATOR_REDIS_URL": self.operator_redis_url,
            "OPERATOR_DATABASE_URL": self.operator_database_url,
            "PROMETHEUS_URL": self.prometheus_url,
        }


def sqlalchemy_url(url: str) -> str:
    """Point a libpq URL at psycopg 3 (SQLAlchemy's default driver is psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _redis_uri(env: EnvReader) -> str:
    """The limiter's Redis URL. On the fleet the RA app logs in as its own ACL user
    (REDIS_USERNAME), which may touch only the limiter's keys, never the queues."""
    username = env.str("REDIS_USERNAME")
    password = env.str("REDIS_PASSWORD", DEV_REDIS_PASSWORD, production=True)
    host = env.str("REDIS_HOST", "127.0.0.1", production=True)
    port = env.int("REDIS_PORT", 16379, minimum=1)
    db_number = env.int("REDIS_DB", 0, minimum=0)
    auth = ""
    if password:
        auth = f"{quote(username, safe='')}:{quote(password, safe='')}@"
    return f"redis://{auth}{host}:{port}/{db_number}"


def _url(env: EnvReader, name: str, schemes: tuple[str, ...], *, secret: bool = False) -> str:
    """An optional URL setting: empty, or one of ``schemes`` naming a host. With
    ``secret`` it must carry a password in production (the fleet's services all ask
    for one), and the message never repeats the value."""
    value = env.str(name)
    if not value:
        return ""
    shown = "" if secret else f"={value!r}"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number
    except ValueError:
        env.error(f"{name}{shown} is not a URL")
        return ""
    if parts.scheme not in schemes or not parts.hostname:
        env.error(f"{name}{shown} must be a {' or '.join(schemes)} URL with a host")
    elif secret and env.production and not parts.password:
        env.error(f"{name} has no password (APP_ENV=production)")
    return value


def read_audit_bands(env: EnvReader) -> tuple[AuditBand, ...]:
    """RA_AUDIT_BANDS, e.g. ``0.1:0.01,0.3:0.05``: scores below 0.1 are sampled at 1 %,
    below 0.3 at 5 %, the rest at RA_AUDIT_SHARE. Empty: one share for every score."""
    raw = env.raw("RA_AUDIT_BANDS")
    try:
        return parse_audit_bands(raw)
    except ValueError as exc:
        env.error(f"RA_AUDIT_BANDS={raw!r}: {exc}")
        return ()


def read_ra_settings(env: EnvReader) -> RASettings:
    """The RA app's settings from ``env``; problems are collected in ``env.errors``."""
    codebook = env.path("CODEBOOK_PATH", DEFAULT_CODEBOOK)
    if not codebook.is_file():
        env.error(f"CODEBOOK_PATH={str(codebook)!r} is not a readable file")
    # Production shares the limiter's counters between gunicorn workers via Redis;
    # memory:// counts per process, which is fine for one developer.
    limiter_uri = env.str("RATELIMIT_STORAGE_URI")
    if not limiter_uri:
        limiter_uri = _redis_uri(env) if env.production else "memory://"
    settings = RASettings(
        app_env=env.app_env,
        database_url=env.str("DATABASE_URL", DEV_DATABASE_URL, production=True),
        secret_key=env.str("SECRET_KEY", DEV_SECRET_KEY, production=True),
        s3_endpoint=env.str("S3_ENDPOINT", "http://127.0.0.1:18333", production=True),
        s3_access_key=env.str("S3_ACCESS_KEY", DEV_S3_ACCESS_KEY, production=True),
        s3_secret_key=env.str("S3_SECRET_KEY", DEV_S3_SECRET_KEY, production=True),
        s3_bucket=env.str("S3_BUCKET", DEV_S3_BUCKET),
        s3_region=env.str("S3_REGION", "us-east-1"),
        codebook_path=codebook,
        queue_order=env.choice("RA_QUEUE_ORDER", QueueOrder, QueueOrder.SCORE),
        queue_seed=env.str("RA_QUEUE_SEED", "study"),
        double_coded_share=env.float(
            "RA_DOUBLE_CODED_SHARE", DOUBLE_CODED_SHARE, minimum=0.0, maximum=1.0
        ),
        audit_share=env.float("RA_AUDIT_SHARE", AUDIT_SHARE, minimum=0.0, maximum=1.0),
        audit_bands=read_audit_bands(env),
        blind=env.choice("RA_BLIND", BlindMode, BlindMode.AUDIT),
        assignment_ttl=env.int("RA_ASSIGNMENT_TTL_S", ASSIGNMENT_TTL, minimum=60),
        ratelimit_storage_uri=limiter_uri,
        session_cookie_secure=env.bool("RA_COOKIE_SECURE", env.production),
        # In production nginx is the one proxy in front: the client address and
        # scheme come from its X-Forwarded-* headers, never from further hops.
        proxy_hops=env.int("RA_PROXY_HOPS", 1 if env.production else 0, minimum=0),
        audit_retention_days=env.int("RA_AUDIT_RETENTION_DAYS", AUDIT_RETENTION_DAYS, minimum=0),
        # The role that may prune the audit log where the app's own may not (see
        # ra_app.audit_log); empty: the app's DATABASE_URL.
        audit_prune_database_url=env.str("RA_AUDIT_PRUNE_DATABASE_URL"),
        # The operator's page (views/operator.py). Each is optional: unset, the page says
        # what it cannot show instead of failing. The pipeline's Redis (an ACL user of
        # its own, never the limiter's) and PostgreSQL as the pipeline role, which a
        # requeue needs to put the job's rows back in play (the app's role only reads).
        operator_redis_url=_url(env, "OPERATOR_REDIS_URL", ("redis", "rediss"), secret=True),
        operator_database_url=_url(
            env, "OPERATOR_DATABASE_URL", ("postgresql", "postgres"), secret=True
        ),
        # Prometheus for the queue-depth trend; unset, the page shows live depths only.
        prometheus_url=_url(env, "PROMETHEUS_URL", ("http", "https")),
    )
    if env.production and settings.secret_key == DEV_SECRET_KEY:
        env.error("SECRET_KEY is the development key; set a real one")
    return settings


def load_ra_settings(environ: Mapping[str, str] | None = None) -> RASettings:
    """Build RASettings; raises ConfigError naming every bad variable at once."""
    env = EnvReader(environ)
    settings = read_ra_settings(env)
    env.raise_if_errors()
    return settings
