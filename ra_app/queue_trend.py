"""Queue depths over the last hours, from the fleet's Prometheus (operator page).

The depths are redis_exporter's key checks (roles/monitoring: ``-check-keys=queue:*``,
metric ``redis_key_size`` labelled ``key``, as the alert rules read it). Per-host
queues are keys of their own (``queue:transcribe:<host>``), so one series per key
is one per queue and host. Prometheus is optional: where it is not deployed or does
not answer quickly, the page shows the live depths from Redis instead, and says so.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import urlencode

TREND_HOURS = 6
STEP_S = 300  # one point per five minutes: smooth enough, and a small answer
TIMEOUT_S = 2.0  # the page must not hang on a Prometheus that is down
QUERY = 'max by (key) (redis_key_size{key=~"queue:.*"})'


@dataclass(frozen=True)
class Trend:
    """Series of (unix time, depth) per queue key, or why there are none."""

    start: float
    end: float
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    error: str | None = None

    @property
    def peak(self) -> float:
        return max((v for points in self.series.values() for _, v in points), default=0.0)

    def polyline(self, key: str, width: float, height: float) -> str:
        """SVG points of one series in a ``width`` x ``height`` box: time runs left to
        right over the whole window, depth bottom to top up to the peak of all series
        (so the lines compare)."""
        span = max(self.end - self.start, 1.0)
        top = max(self.peak, 1.0)
        return " ".join(
            f"{(t - self.start) / span * width:.1f},{height - v / top * height:.1f}"
            for t, v in self.series.get(key, [])
        )


def fetch_trend(base_url: str, *, hours: float = TREND_HOURS, now: float | None = None) -> Trend:
    """Ask Prometheus at ``base_url`` for the queue depths of the last ``hours``."""
    end = time.time() if now is None else now
    start = end - hours * 3600
    params = urlencode({"query": QUERY, "start": start, "end": end, "step": STEP_S})
    url = f"{base_url.rstrip('/')}/api/v1/query_range?{params}"
    try:
        # The URL is the operator's own setting (PROMETHEUS_URL, http or https only).
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310
            body = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return Trend(start, end, error=f"Prometheus did not answer ({reason})")
    if not isinstance(body, dict) or body.get("status") != "success":
        detail = body.get("error") if isinstance(body, dict) else None
        return Trend(start, end, error=f"Prometheus refused the query ({detail or 'no reason'})")
    return Trend(start, end, series=_series(body))


def _series(body: dict[str, object]) -> dict[str, list[tuple[float, float]]]:
    data = body.get("data")
    result = data.get("result") if isinstance(data, dict) else None
    series: dict[str, list[tuple[float, float]]] = {}
    for item in result if isinstance(result, list) else []:
        try:
            key = str(item["metric"]["key"])
            points = [(float(t), float(v)) for t, v in item["values"]]
        except (KeyError, TypeError, ValueError):
            continue  # a series without a key label or with odd values is no queue's
        series[key] = points
    return dict(sorted(series.items()))
