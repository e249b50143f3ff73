"""health-check.yml's report templates, rendered by Ansible from made-up host results.

The fleet test runs the playbook on real machines; this checks, in seconds, that
each problem the templates know of becomes one line naming the host and the cause.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.support.ansible_run import ansible_playbook

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "playbooks" / "templates"
PLAYBOOK = REPO / "playbooks" / "health-check.yml"


def connections(host: str, failing: dict[str, str] | None = None) -> dict[str, Any]:
    """What `audio-pipeline check-connections --json` prints, as a registered result."""
    failing = failing or {}
    checks = [
        {
            "service": s,
            "target": f"{s}-target",
            "ok": s not in failing,
            "detail": failing.get(s, "fine"),
            "elapsed_s": 0.01,
        }
        for s in ("redis", "postgres", "s3")
    ]
    report = {"host": host, "ok": not failing, "checks": checks}
    return {"rc": 1 if failing else 0, "stdout": json.dumps(report), "stderr": ""}


def status(failed: int = 0, active_policies: int = 1) -> dict[str, Any]:
    """What `audio-pipeline status --json` prints (the parts the templates read)."""
    report = {
        "schema": 1,
        "queues": {"queue:failed": failed, "queue:transcribe": 0, "queue:unpack": 2},
        "processing": [
            {
                "worker": "gpu:gpu-01:7",
                "source": "queue:transcribe:gpu-01",
                "items": 1,
                "alive": True,
            }
        ],
        "delayed_retries": [],
        "failed": failed,
        "workers": [],
        "batches": {"by_status": {}, "in_flight": []},
        "results": {"active_policies": active_policies, "flagged": 3},
    }
    return {"rc": 0, "stdout": json.dumps(report), "stderr": ""}


def alerts(*firing_and_pending: tuple[str, str, str]) -> dict[str, Any]:
    """What Prometheus's /api/v1/alerts answers: (name, state, summary) each."""
    found = [
        {
            "labels": {"alertname": name, "severity": "page"},
            "annotations": {"summary": summary, "runbook": f"docs/FLEET.md, Monitoring: {name}"},
            "state": state,
        }
        for name, state, summary in firing_and_pending
    ]
    return {"status": 200, "json": {"status": "success", "data": {"alerts": found}}}


def failed_command(stderr: str) -> dict[str, Any]:
    """A registered result of an audio-pipeline command that exited 1 printing nothing."""
    return {"rc": 1, "stdout": "", "stderr": stderr}


def healthy() -> dict[str, dict[str, Any]]:
    return {
        "orch-01": {
            "health_services": {"stdout_lines": ["active", "active"]},
            "health_pg": {"stdout_lines": ["15 main 5432 online postgres /d /l"]},
            "health_ra_app": {"status": 200},
            "health_alerts": alerts(),
            "health_status": status(),
            "health_connections": connections("orch-01"),
            "health_failed_jobs": {"rc": 0, "stdout": json.dumps({"total": 0, "entries": []})},
        },
        "gpu-01": {
            "health_services": {"stdout_lines": ["active", "active"]},
            "health_df": {"stdout_lines": ["Use% Avail", " 10% 50G"]},
            "health_du": {"stdout": "1G /data/scratch"},
            "health_connections": connections("gpu-01"),
        },
        "transfer-01": {
            "health_services": {"stdout_lines": ["active"]},
            "health_df": {"stdout_lines": ["Use% Avail", " 10% 50G"]},
            "health_du": {"stdout": "1G /data/scratch"},
            "health_connections": connections("transfer-01"),
        },
    }


def render(tmp_path: Path, results: dict[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(problem lines, report lines) as health-check.yml's summary builds them."""
    # Registered results are plain host variables to the templates: the inventory
    # carries them.
    hosts = {h: {"ansible_connection": "local", **r} for h, r in results.items()}
    inventory = {
        "all": {
            "children": {
                "orchestrator": {"hosts": {"orch-01": hosts["orch-01"]}},
                "gpu_workers": {"hosts": {"gpu-01": hosts["gpu-01"]}},
                "transfer": {"hosts": {"transfer-01": hosts["transfer-01"]}},
            }
        }
    }
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    out = tmp_path / "out.json"
    problems_j2, report_j2 = TEMPLATES / "health-problems.j2", TEMPLATES / "health-report.j2"
    # The playbook's own Summary variables (thresholds, the parsed status JSON).
    [summary] = [p for p in yaml.safe_load(PLAYBOOK.read_text()) if p["name"] == "Summary"]
    play = [
        {
            "name": "Summary",
            "hosts": "all",
            "gather_facts": False,
            "vars": summary["vars"],
            "tasks": [
                {
                    "name": "Render",
                    "run_once": True,
                    "delegate_to": "localhost",
                    "ansible.builtin.copy": {
                        "dest": str(out),
                        "mode": "0644",
                        "content": (
                            f"{{{{ {{'problems': lookup('ansible.builtin.template', "
                            f"'{problems_j2}'), 'report': lookup("
                            f"'ansible.builtin.template', '{report_j2}')}} | to_json }}}}"
                        ),
                    },
                }
            ],
        },
    ]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    proc = ansible_playbook(tmp_path, "-i", "inventory.yml", "play.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rendered = json.loads(out.read_text())
    problems = [x.strip() for x in (rendered["problems"] or "").splitlines() if x.strip()]
    return problems, rendered["report"].splitlines()


def test_a_healthy_fleet_has_no_problem_and_reports_connections(tmp_path):
    problems, report = render(tmp_path, healthy())
    assert problems == []
    assert any(x.startswith("gpu-01") and "redis=ok  postgres=ok  s3=ok" in x for x in report)
    assert any(x.startswith("active policies") and x.endswith(" 1") for x in report)
    assert any(x.startswith("flagged (ra_queue)") and x.endswith(" 3") for x in report)
    assert any(x.startswith("queue:unpack ") and x.endswith(" 2") for x in report)
    assert any(
        x.startswith("processing:gpu:gpu-01:7:from:queue:transcribe:gpu-01 ") for x in report
    )


def test_no_policy_and_unreachable_services_are_named(tmp_path):
    results = healthy()
    results["orch-01"]["health_status"] = status(active_policies=0)
    results["gpu-01"]["health_connections"] = connections(
        "gpu-01", {"redis": "AuthenticationError: invalid username-password pair"}
    )
    results["transfer-01"]["health_connections"] = connections(
        "transfer-01", {"s3": "ClientError: An error occurred (403) ... Forbidden"}
    )
    results["orch-01"]["health_connections"] = failed_command(
        "audio-pipeline: cannot read /etc/fleet-operators/..."
    )
    problems, report = render(tmp_path, results)
    assert problems == [
        "orch-01: no active policy: files are transcribed but get no verdict "
        "(ansible-playbook playbooks/apply-policies.yml)",
        "orch-01: could not check its connections: audio-pipeline: cannot read "
        "/etc/fleet-operators/...",
        "gpu-01: cannot reach redis at redis-target (AuthenticationError: invalid "
        "username-password pair)",
        "transfer-01: cannot reach s3 at s3-target (ClientError: An error occurred (403) "
        "... Forbidden)",
    ]
    assert any(x.startswith("gpu-01") and "redis=FAILED" in x for x in report)


def test_dead_letters_and_an_unreadable_status_are_named(tmp_path):
    results = healthy()
    results["orch-01"]["health_status"] = status(failed=2)
    dead = {"index": 1, "job": '{"batch_id": "b9"}', "queue": "queue:unpack", "error": "boom"}
    results["orch-01"]["health_failed_jobs"]["stdout"] = json.dumps({"total": 2, "entries": [dead]})
    problems, report = render(tmp_path, results)
    assert problems == [
        "2 failed job(s) in queue:failed (audio-pipeline failed; audio-pipeline requeue)"
    ]
    assert any("boom" in x and "b9" in x for x in report)

    results["orch-01"]["health_status"] = failed_command(
        "audio-pipeline status: Redis unavailable: refused"
    )
    problems, _ = render(tmp_path, results)
    assert problems == [
        "orch-01: could not read the pipeline's status: audio-pipeline status: Redis "
        "unavailable: refused"
    ]


def test_firing_alerts_are_named_with_their_runbook_and_pending_ones_are_not(tmp_path):
    results = healthy()
    results["orch-01"]["health_alerts"] = alerts(
        ("WorkerDown", "firing", "gpu-worker on gpu-02 is not answering"),
        ("DeadLetters", "pending", "3 dead letters in queue:failed"),
    )
    problems, _ = render(tmp_path, results)
    assert problems == [
        "orch-01: alert WorkerDown firing: gpu-worker on gpu-02 is not answering "
        "(runbook: docs/FLEET.md, Monitoring: WorkerDown)"
    ]


def test_a_prometheus_that_does_not_answer_is_named(tmp_path):
    results = healthy()
    results["orch-01"]["health_alerts"] = {"status": -1, "msg": "Connection refused"}
    problems, _ = render(tmp_path, results)
    assert problems == ["orch-01: could not read Prometheus's alerts: -1 Connection refused"]
