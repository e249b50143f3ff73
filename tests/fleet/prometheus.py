"""The orchestrator's Prometheus, as the fleet tests read it: its HTTP API through
the probe on orch (Prometheus listens on loopback only)."""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.fleet.lab import Fleet

PROMETHEUS = "http://127.0.0.1:9090"


def api(fleet: Fleet, path: str) -> Any:
    """The ``data`` of a successful answer to ``path`` (``/api/v1/...``)."""
    answer = fleet.probe("orch", "http_json", url=f"{PROMETHEUS}{path}", timeout_s=10)
    assert answer["status"] == "success", answer
    return answer["data"]


def query(fleet: Fleet, promql: str) -> list[dict[str, Any]]:
    """The instant vector ``promql`` evaluates to now."""
    found: list[dict[str, Any]] = api(fleet, "/api/v1/query?query=" + urllib.parse.quote(promql))[
        "result"
    ]
    return found


def active_targets(fleet: Fleet) -> set[tuple[str, str, str]]:
    """(job, instance, health) of every target Prometheus scrapes."""
    active = api(fleet, "/api/v1/targets?state=active")["activeTargets"]
    return {(t["labels"]["job"], t["labels"]["instance"], t["health"]) for t in active}


def targets_up(fleet: Fleet) -> set[tuple[str, str]]:
    """(job, instance) of every target whose last scrape succeeded."""
    return {(job, instance) for job, instance, health in active_targets(fleet) if health == "up"}


def firing(fleet: Fleet) -> list[dict[str, Any]]:
    """The alerts firing now."""
    return [a for a in api(fleet, "/api/v1/alerts")["alerts"] if a["state"] == "firing"]
