"""gunicorn settings: gunicorn -c ra_app/gunicorn.conf.py "ra_app:create_app()".

The one gunicorn configuration: the orchestrator role's unit runs this file from the
deployed release, with its values in /etc/ra-app/ra-app.env, and bench/bench_ra.py
measures the same file. Every value can be overridden from the environment.
"""

import multiprocessing
import os
from pathlib import Path
from typing import Any

from audio_pipeline.config import EnvReader

_env = EnvReader()
bind = _env.str("RA_BIND", "127.0.0.1:8000")  # nginx terminates TLS in front
# Requests are short and I/O bound (Postgres, S3 relay); threads keep audio
# streams from tying up a whole worker.
workers = _env.int("RA_WORKERS", min(4, multiprocessing.cpu_count() * 2 + 1), minimum=1)
worker_class = "gthread"
threads = _env.int("RA_THREADS", 4, minimum=1)
# Seconds per request (a long export streams).
timeout = _env.int("RA_TIMEOUT_S", 60, minimum=1)
# Seconds to finish in-flight requests on SIGTERM.
graceful_timeout = _env.int("RA_GRACEFUL_TIMEOUT_S", 30, minimum=1)
keepalive = 5
max_requests = 2000  # recycle workers to bound any slow leak
max_requests_jitter = 200
accesslog = _env.str("RA_ACCESS_LOG", "-")
errorlog = _env.str("RA_ERROR_LOG", "-")
loglevel = _env.str("RA_LOG_LEVEL", "info")
# Only the local proxy (nginx) may say the request came over HTTPS.
forwarded_allow_ips = _env.str("RA_FORWARDED_ALLOW_IPS", "127.0.0.1")
# Build the app once in the master, so a bad config or codebook fails the start.
preload_app = True

# On the fleet errors go to the journal and to a rotated file as well, where the
# guide's troubleshooting (`tail -50 /opt/ra-app/logs/error.log`) looks.
_error_file = _env.str("RA_ERROR_LOG_FILE")
# A typo in the unit's environment stops gunicorn here, naming the variable.
_env.raise_if_errors()
if _error_file:
    _stderr = {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"},
        },
        "handlers": {
            "journal": _stderr,
            "error_file": {
                "class": "logging.handlers.RotatingFileHandler",
                "formatter": "plain",
                "filename": _error_file,
                "maxBytes": 10 * 1024 * 1024,
                "backupCount": 5,
            },
        },
        "loggers": {
            "gunicorn.error": {
                "level": loglevel.upper(),
                "handlers": ["journal", "error_file"],
                "propagate": False,
            },
        },
        "root": {"level": "INFO", "handlers": ["journal", "error_file"]},
    }


# The workers' metric files (ra_app/metrics.py), when PROMETHEUS_MULTIPROC_DIR is set.
_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def on_starting(server: Any) -> None:
    """A new master starts from an empty metrics directory: files left by an earlier
    run would be summed with this run's, and their counters never reset."""
    if not _metrics_dir:
        return
    directory = Path(_metrics_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()


def child_exit(server: Any, worker: Any) -> None:
    # A dead worker's live gauges leave the sums; its counters stay, as they should.
    if _metrics_dir:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
