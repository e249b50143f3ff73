"""Prometheus metrics of a worker process, served on ``METRICS_PORT``.

Every name starts with ``audio_pipeline_`` and carries the labels ``stage`` and
``host``, so one Prometheus sees the whole fleet and sums or splits by either. A
worker updates its own counters; queue depths are not here: they are the same for
every worker, so they belong to one collector (redis_exporter's key checks on the
orchestrator), not here.

The endpoint is off unless ``METRICS_PORT`` is set. ``METRICS_ADDR`` is the address it
listens on, loopback by default; on the fleet the units set both (the host's fleet
address), the firewall opens the port to the orchestrator, and its Prometheus
scrapes it (roles/monitoring).

The job-duration buckets span what a stage does: a job takes from
milliseconds (an ack) to hours (a long unpack behind a full disk).
"""

from __future__ import annotations

import shutil
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import start_http_server as _start_http_server

from audio_pipeline.config import EnvReader, EnvSettings

LABELS = ("stage", "host")
# seconds: from an ack to a long unpack
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# seconds a job waited in its queue: from a busy fleet's moments to a backlog of days
QUEUE_WAIT_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 259200)
RTF_WINDOW = 20  # claims the realtime-factor gauge averages over


@dataclass(frozen=True)
class MetricsSettings(EnvSettings):
    port: int = 0  # 0: no endpoint
    addr: str = "127.0.0.1"

    @classmethod
    def read(cls, env: EnvReader) -> MetricsSettings:
        return cls(
            port=env.int("METRICS_PORT", 0, minimum=0, maximum=65535),
            addr=env.str("METRICS_ADDR", "127.0.0.1"),
        )


class _Family:
    """The metric families, registered once per registry (one per process)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = LABELS) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = LABELS) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        self.claimed = counter("audio_pipeline_jobs_claimed_total", "Jobs claimed from a queue.")
        self.done = counter("audio_pipeline_jobs_done_total", "Jobs finished and acknowledged.")
        self.retried = counter(
            "audio_pipeline_jobs_retried_total", "Jobs that failed and were scheduled again."
        )
        self.dead = counter(
            "audio_pipeline_jobs_dead_lettered_total",
            "Jobs given up: moved to queue:failed (transfer: the batch marked failed).",
        )
        self.handed_back = counter(
            "audio_pipeline_jobs_handed_back_total",
            "Jobs given back unspent (a stop, a backend outage).",
        )
        self.duration = Histogram(
            "audio_pipeline_job_duration_seconds",
            "Time from the start of a claim's work to its settling, per job.",
            LABELS,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "audio_pipeline_queue_wait_seconds",
            "Time from a job's enqueue (or, for a retry, from when it fell due) to its claim.",
            LABELS,
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.files = counter("audio_pipeline_files_transcribed_total", "Files transcribed.")
        self.audio_seconds = counter(
            "audio_pipeline_audio_seconds_transcribed_total", "Seconds of audio transcribed."
        )
        self.asr_seconds = counter(
            "audio_pipeline_asr_seconds_total", "Wall seconds spent in speech recognition."
        )
        self.classifier_seconds = counter(
            "audio_pipeline_classifier_seconds_total", "Wall seconds spent classifying."
        )
        self.realtime_factor = gauge(
            "audio_pipeline_realtime_factor",
            f"Audio seconds per ASR second over the last {RTF_WINDOW} claims.",
        )
        self.model_load = gauge(
            "audio_pipeline_model_load_seconds",
            "Time the last model load took.",
            (*LABELS, "model"),
        )
        self.scratch_free = gauge(
            "audio_pipeline_scratch_free_bytes", "Free bytes on the scratch file system."
        )
        self.bytes_transferred = counter(
            "audio_pipeline_bytes_transferred_total",
            "Archive bytes copied from the collection host to S3 (transfer).",
        )
        self.backpressure = counter(
            "audio_pipeline_backpressure_pauses_total",
            "Pauses because the next stage is full or scratch is low.",
        )
        self.backend_up = gauge(
            "audio_pipeline_backend_up",
            "1 while Redis / PostgreSQL answers this worker, 0 during an outage.",
            (*LABELS, "backend"),
        )
        self.outages = counter(
            "audio_pipeline_backend_outages_total",
            "Outages of Redis / PostgreSQL this worker met.",
            (*LABELS, "backend"),
        )


# Keyed by the registry object itself, weakly: keyed by id(), a new registry that
# reused a collected one's address got the old one's families, registered elsewhere.
_families: weakref.WeakKeyDictionary[CollectorRegistry, _Family] = weakref.WeakKeyDictionary()


def _family(registry: CollectorRegistry) -> _Family:
    if registry not in _families:
        _families[registry] = _Family(registry)
    return _families[registry]


class WorkerMetrics:
    """One service's metrics, its stage and host labels bound."""

    def __init__(self, stage: str, host: str, registry: CollectorRegistry = REGISTRY) -> None:
        f = _family(registry)
        self.registry = registry
        self.stage, self.host = stage, host
        self.claimed = f.claimed.labels(stage, host)
        self.done = f.done.labels(stage, host)
        self.retried = f.retried.labels(stage, host)
        self.dead_lettered = f.dead.labels(stage, host)
        self.handed_back = f.handed_back.labels(stage, host)
        self.duration = f.duration.labels(stage, host)
        self._queue_wait = f.queue_wait.labels(stage, host)
        self.files = f.files.labels(stage, host)
        self.audio_seconds = f.audio_seconds.labels(stage, host)
        self.asr_seconds = f.asr_seconds.labels(stage, host)
        self.classifier_seconds = f.classifier_seconds.labels(stage, host)
        self.backpressure = f.backpressure.labels(stage, host)
        self.bytes_transferred = f.bytes_transferred.labels(stage, host)
        self._realtime_factor = f.realtime_factor.labels(stage, host)
        self._model_load = f.model_load
        self._scratch_free = f.scratch_free.labels(stage, host)
        self._backend_up = f.backend_up
        self._outages = f.outages
        self._recent: deque[tuple[float, float]] = deque(maxlen=RTF_WINDOW)
        self._up: dict[str, bool] = {}
        for backend in ("redis", "postgres"):
            self.backend_available(backend, True)

    def jobs_claimed(self, waits_s: list[float | None]) -> None:
        """Jobs just claimed, with how long each waited in its queue (None: unstamped,
        a job pushed by hand)."""
        self.claimed.inc(len(waits_s))
        for wait in waits_s:
            if wait is not None:
                self._queue_wait.observe(wait)

    def transcribed(self, files: int, audio_s: float, asr_s: float) -> None:
        """One claim's speech recognition: counts, and the recent realtime factor."""
        self.files.inc(files)
        self.audio_seconds.inc(audio_s)
        self.asr_seconds.inc(asr_s)
        self._recent.append((audio_s, asr_s))
        spent = sum(a for _, a in self._recent)
        if spent > 0:
            self._realtime_factor.set(sum(au for au, _ in self._recent) / spent)

    def model_loaded(self, model: str, seconds: float) -> None:
        self._model_load.labels(self.stage, self.host, model).set(seconds)

    def backend_available(self, backend: str, up: bool) -> None:
        if not up and self._up.get(backend, True):  # count an outage once, at its start
            self._outages.labels(self.stage, self.host, backend).inc()
        self._up[backend] = up
        self._backend_up.labels(self.stage, self.host, backend).set(1 if up else 0)

    def watch_scratch(self, root: Path) -> None:
        """Report the scratch file system's free bytes at every scrape."""
        self._scratch_free.set_function(lambda: _free_bytes(root))


def _free_bytes(root: Path) -> float:
    try:
        return float(shutil.disk_usage(root).free)
    except OSError:  # scratch not mounted yet: no reading rather than a failed scrape
        return float("nan")


def serve(settings: MetricsSettings, registry: CollectorRegistry = REGISTRY) -> int | None:
    """Start the /metrics endpoint in a daemon thread; its port, or None when off."""
    if settings.port == 0:
        return None
    server, _thread = _start_http_server(settings.port, addr=settings.addr, registry=registry)
    return int(server.server_port)
