"""A worker's metrics: names, labels, the realtime factor and the /metrics endpoint."""

from __future__ import annotations

import math
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry

from audio_pipeline.metrics import MetricsSettings, WorkerMetrics, serve
from tests.support.metrics_scrape import free_port


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"stage": "gpu", "host": "gpu-01", **labels})


def test_counts_carry_stage_and_host_and_the_realtime_factor_is_recent() -> None:
    reg = CollectorRegistry()
    m = WorkerMetrics("gpu", "gpu-01", registry=reg)
    m.claimed.inc(8)
    m.done.inc(7)
    m.retried.inc()
    m.transcribed(files=4, audio_s=120.0, asr_s=10.0)
    m.transcribed(files=4, audio_s=60.0, asr_s=20.0)

    assert sample(reg, "audio_pipeline_jobs_claimed_total") == 8
    assert sample(reg, "audio_pipeline_jobs_done_total") == 7
    assert sample(reg, "audio_pipeline_jobs_retried_total") == 1
    assert sample(reg, "audio_pipeline_files_transcribed_total") == 8
    assert sample(reg, "audio_pipeline_audio_seconds_transcribed_total") == 180
    # (120 + 60) audio seconds over (10 + 20) ASR seconds
    assert sample(reg, "audio_pipeline_realtime_factor") == 6.0


def test_an_outage_is_counted_once_and_shown_while_it_lasts() -> None:
    reg = CollectorRegistry()
    m = WorkerMetrics("gpu", "gpu-01", registry=reg)
    assert sample(reg, "audio_pipeline_backend_up", backend="redis") == 1
    m.backend_available("redis", False)
    m.backend_available("redis", False)  # the same outage, seen again
    assert sample(reg, "audio_pipeline_backend_up", backend="redis") == 0
    m.backend_available("redis", True)
    m.backend_available("redis", False)
    assert sample(reg, "audio_pipeline_backend_outages_total", backend="redis") == 2
    assert sample(reg, "audio_pipeline_backend_outages_total", backend="postgres") is None


def test_scratch_free_bytes_are_read_at_scrape_time(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    m = WorkerMetrics("gpu", "gpu-01", registry=reg)
    m.watch_scratch(tmp_path)
    assert (sample(reg, "audio_pipeline_scratch_free_bytes") or 0) > 0
    m.watch_scratch(tmp_path / "not-mounted")
    assert math.isnan(sample(reg, "audio_pipeline_scratch_free_bytes") or 0.0)


def test_the_endpoint_is_off_by_default_and_serves_the_text_format() -> None:
    reg = CollectorRegistry()
    assert serve(MetricsSettings(), registry=reg) is None
    m = WorkerMetrics("unpack", "gpu-01", registry=reg)
    m.claimed.inc()
    port = serve(MetricsSettings(port=free_port()), registry=reg)
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert 'audio_pipeline_jobs_claimed_total{host="gpu-01",stage="unpack"} 1.0' in text


def test_queue_wait_is_observed_for_stamped_jobs_only() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics("gpu", "gpu-01", registry)
    metrics.jobs_claimed([12.0, None, 700.0])
    labels = {"stage": "gpu", "host": "gpu-01"}
    assert registry.get_sample_value("audio_pipeline_jobs_claimed_total", labels) == 3
    assert registry.get_sample_value("audio_pipeline_queue_wait_seconds_count", labels) == 2
    assert registry.get_sample_value("audio_pipeline_queue_wait_seconds_sum", labels) == 712.0
    at_60 = {**labels, "le": "60.0"}
    assert registry.get_sample_value("audio_pipeline_queue_wait_seconds_bucket", at_60) == 1


def test_each_registry_gets_its_own_families_even_at_a_reused_address() -> None:
    # CPython often hands a new object the address of one just collected
    for _ in range(50):
        reg = CollectorRegistry()
        WorkerMetrics("gpu", "gpu-01", registry=reg).claimed.inc()
        assert sample(reg, "audio_pipeline_jobs_claimed_total") == 1
        del reg
