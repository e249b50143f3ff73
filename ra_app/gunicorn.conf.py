"""gunicorn settings: gunicorn -c ra_app/gunicorn.conf.py "ra_app:create_app()".

Every value can be overridden from the environment (the Ansible unit sets them).
"""

import multiprocessing
import os

bind = os.environ.get("RA_BIND", "127.0.0.1:8000")  # nginx terminates TLS in front
# Requests are short and I/O bound (Postgres, S3 relay); threads keep audio
# streams from tying up a whole worker.
workers = int(os.environ.get("RA_WORKERS", min(4, multiprocessing.cpu_count() * 2 + 1)))
worker_class = "gthread"
threads = int(os.environ.get("RA_THREADS", "4"))
timeout = int(os.environ.get("RA_TIMEOUT", "60"))  # seconds; a long export streams
graceful_timeout = 30  # seconds to finish requests on SIGTERM
keepalive = 5
max_requests = 2000  # recycle workers to bound any slow leak
max_requests_jitter = 200
accesslog = os.environ.get("RA_ACCESS_LOG", "-")
errorlog = os.environ.get("RA_ERROR_LOG", "-")
loglevel = os.environ.get("RA_LOG_LEVEL", "info")
forwarded_allow_ips = os.environ.get("RA_FORWARDED_ALLOW_IPS", "127.0.0.1")
# Build the app once in the master, so a bad config or codebook fails the start.
preload_app = True
