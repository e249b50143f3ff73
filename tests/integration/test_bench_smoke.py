"""Every benchmark in bench/ runs at its smoke size as a real process and reports sanely.

Benchmarks are not timed tests: nothing here asserts a speed, only that each one
runs against the real local stack, exits 0, and writes a JSON report with its
fields and plausible values (ratios above zero, WER within 0..1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # per benchmark; smoke sizes take well under a minute on 2 idle cores


def run_bench(module: str, out: Path, stack_env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", "--smoke", "--out", str(out)],
        env={**os.environ, **stack_env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert str(out) in done.stdout  # the table ends by naming the report
    report = json.loads(out.read_text())
    assert report["size"] == "smoke"
    assert report["machine"]["cpus"] >= 1
    assert report["wall_s"] > 0
    assert isinstance(report["meets_targets"], bool | None)
    return report


def test_asr_benchmark(stack_env: dict[str, str], tmp_path: Path) -> None:
    r = run_bench("bench_asr", tmp_path / "asr.json", stack_env)
    assert r["corpus"]["clips"] >= 2
    assert r["corpus"]["audio_s"] > 0
    for side in ("baseline", "candidate", "candidate_one_file_per_call"):
        assert r[side]["audio_s_per_s"] > 0
        assert 0.0 <= r[side]["wer"] <= 1.0
    assert r["speedup"] > 0
    assert r["speedup_one_file_per_call"] > 0
    assert r["wer_delta"] == pytest.approx(r["candidate"]["wer"] - r["baseline"]["wer"], abs=1e-3)
    # The look-ahead pass transcribes the same claims: its words are the candidate's
    # (a claim transcribed with another claim's audio would be near 100 % WER).
    assert r["look_ahead"]["gain"] > 0
    assert r["look_ahead"]["wer"] == pytest.approx(r["candidate"]["wer"], abs=0.011)


def test_unpack_benchmark(stack_env: dict[str, str], tmp_path: Path) -> None:
    r = run_bench("bench_unpack", tmp_path / "unpack.json", stack_env)
    assert r["baseline"]["jobs"] == 1
    assert r["candidate"]["jobs"] == r["machine"]["cpus"]
    assert r["baseline"]["audio_s_per_s"] > 0
    assert r["candidate"]["audio_s_per_s"] > 0
    assert r["speedup"] > 0


def test_queue_benchmark(stack_env: dict[str, str], tmp_path: Path) -> None:
    r = run_bench("bench_queue", tmp_path / "queue.json", stack_env)
    assert r["jobs"] > 0
    for side in ("baseline", "candidate", "candidate_batch8"):
        assert r[side]["ms_per_job"] > 0
        assert r[side]["jobs_per_s"] > 0
    assert r["speedup"] > 0
    assert r["speedup_batch8"] > 0


def test_pipeline_benchmark(stack_env: dict[str, str], tmp_path: Path) -> None:
    r = run_bench("bench_pipeline", tmp_path / "pipeline.json", stack_env)
    assert r["batch"]["files"] > 0
    assert r["batch"]["audio_s"] > 0
    assert r["baseline"]["bare_s"] > 0
    assert r["pipeline"]["job_s"] > 0
    assert r["pipeline"]["end_to_end_wall_s"] >= r["pipeline"]["job_s"]
    assert r["pipeline_vs_bare"] > 0
    assert r["overhead"] == pytest.approx(r["pipeline_vs_bare"] - 1, abs=1e-3)


def test_ra_app_benchmark(stack_env: dict[str, str], tmp_path: Path) -> None:
    r = run_bench("bench_ra", tmp_path / "ra.json", stack_env)
    assert r["seed"]["ra_items"] > 0
    assert r["baseline"]["kinds"]["health"]["requests"] > 0
    for kind in ("review", "skip"):  # flat out, every client goes round the loop
        k = r["candidate"]["kinds"][kind]
        assert k["requests"] > 0
        assert 0 < k["p50_ms"] <= k["p95_ms"] <= k["p99_ms"]
    for run in ("candidate", "candidate_paced"):
        kinds = r[run]["kinds"]
        assert r[run]["requests"] > 0
        assert all(k["unexpected_status"] == 0 for k in kinds.values()), kinds
        assert "next_none" not in kinds  # the seeded queue never runs dry
    assert r["rps_vs_healthz"] > 0
