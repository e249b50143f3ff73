"""A worker's /metrics, read as Prometheus would: for tests that count what it did."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

# Labels beside stage and host that tell one series of a name from another.
DISTINGUISHING_LABELS = ("backend", "le", "model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int, stage: str) -> dict[str, float]:
    """The samples of ``stage``, by name, with ``/<label value>`` appended for each
    distinguishing label (``audio_pipeline_backend_up/redis``, ``..._bucket/60.0``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("stage") != stage:
                continue
            suffix = "".join(f"/{s.labels[k]}" for k in DISTINGUISHING_LABELS if k in s.labels)
            samples[s.name + suffix] = s.value
    return samples
