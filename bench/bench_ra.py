"""RA app under load: next-item and the review page, 32 RAs at once, seeded database.

    .venv/bin/python -m bench.bench_ra [--smoke] [--out PATH]

Setup, in this run's own Postgres database: bench/seed_ra_db.py seeds 100k audio
files and 1M classifications (smoke: far fewer), ``flask db upgrade`` adds the RA
tables, ra_items is synced from ra_queue, and CLIENTS RA accounts are created and
logged in (one session cookie and CSRF token each). gunicorn then serves
``ra_app:create_app()`` on 127.0.0.1 with ra_app/gunicorn.conf.py, as deployed.

Load: wrk, CLIENTS threads of one connection each, closed loop (a client sends
its next request when the previous answer arrives), bench/ra_loop.lua:

- baseline: GET /healthz (a session-less request that runs SELECT 1);
- the RA loop: POST /next once (claims an item; 302 to its page), then
  GET /review/<id> (transcript, evidence, codebook form) and
  POST /review/<id>/skip, which frees the slot and hands out the next item
  (302 to its page), exactly as submitting an answer does: that request is the
  app's "next item" under load. Latency percentiles are per kind of request.

Two runs of the RA loop: flat out (no wait: latency is mostly queueing, 32
clients / throughput) and paced, each RA waiting THINK_MS on average (drawn
from 0.5-1.5x per request) between an answer and its next click. The target is
held against the paced run.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import benchlib

LUA = Path(__file__).resolve().parent / "ra_loop.lua"
FULL_SEED = {"files": 100_000, "classifications": 1_000_000}
SMOKE_SEED = {"files": 2_000, "classifications": 16_000}
CLIENTS = 32
FULL_DURATION_S, SMOKE_DURATION_S = 30, 3
WRK_TIMEOUT = "10s"  # a slower answer is counted by wrk as a timeout, not a latency
USER_AGENT = "ra-bench"  # Flask-Login's strong session protection hashes it in
PASSWORD = "bench-password-123"  # noqa: S105 (throwaway accounts in a throwaway database)
SECRET_KEY = "bench-secret-key-throwaway"  # noqa: S105
# next_none: /next answered with no item (the RA's queue is empty): should not happen.
EXPECTED_STATUS = {"health": 200, "next": 302, "next_none": 302, "review": 200, "skip": 302}
NEXT_ITEM = "skip"  # the request that hands out the next item in the loop
TARGET_P95_MS = 50.0
# Paced run: each RA waits this long between an answer and its next click: 32 RAs
# clicking once a second each, several times busier than people reading transcripts,
# but meant to stay below the saturation point so latency is the app's own and not
# the length of a queue (the report shows whether it did: compare req/s to flat out).
THINK_MS = 1000  # mean wait; each is drawn from THINK_SPREAD times it, so RAs don't click in step
THINK_SPREAD = (0.5, 1.5)
SMOKE_THINK_MS = 200  # a smoke run is seconds long: enough to go round the loop
SERVER_START_TIMEOUT_S = 60
CSRF_FIELD = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed(url: str, env: dict[str, str], size: dict[str, int]) -> float:
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.seed_ra_db",
            url,
            "--files",
            str(size["files"]),
            "--classifications",
            str(size["classifications"]),
        ],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=benchlib.REPO_ROOT,
    )
    return time.perf_counter() - started


def prepare_app(env: dict[str, str]) -> tuple[list[tuple[str, str]], int]:
    """RA accounts logged in ((cookie, csrf) each) and the synced queue size."""
    subprocess.run(
        [str(Path(sys.executable).parent / "flask"), "--app", "ra_app", "db", "upgrade"],
        env=env,
        check=True,
        capture_output=True,
        cwd=benchlib.REPO_ROOT,
    )
    from ra_app.assignment import sync_queue
    from ra_app.extensions import db
    from ra_app.factory import create_app
    from ra_app.users import create_user

    app = create_app({"ENVIRON": env, "RATELIMIT_ENABLED": False})
    with app.app_context():
        for i in range(CLIENTS):
            create_user(f"bench-ra-{i:02d}", PASSWORD)
        db.session.commit()
        sync_queue(full=True)
        items = int(db.session.execute(db.text("SELECT count(*) FROM ra_items")).scalar_one())
    sessions = []
    headers = {"User-Agent": USER_AGENT}
    for i in range(CLIENTS):
        client = app.test_client()
        page = client.get("/login", headers=headers).get_data(as_text=True)
        token = _csrf(page)
        form = {"username": f"bench-ra-{i:02d}", "password": PASSWORD, "csrf_token": token}
        done = client.post("/login", headers=headers, data=form)
        if done.status_code != 302:
            raise SystemExit(f"login failed for bench-ra-{i:02d}: {done.status_code}")
        home = client.get("/", headers=headers).get_data(as_text=True)
        cookie = client.get_cookie("session")
        if cookie is None:
            raise SystemExit("no session cookie after login")
        sessions.append((cookie.value, _csrf(home)))
    return sessions, items


def _csrf(html: str) -> str:
    found = CSRF_FIELD.search(html)
    if not found:
        raise SystemExit("no csrf_token field in the page")
    return found.group(1)


def start_server(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "gunicorn"),
            "-c",
            "ra_app/gunicorn.conf.py",
            "ra_app:create_app()",
        ],
        cwd=benchlib.REPO_ROOT,
        env={
            **env,
            "RA_BIND": f"127.0.0.1:{port}",
            "RA_ACCESS_LOG": str(log),
            "RA_ERROR_LOG": str(log),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gunicorn exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    stop_server(proc)
    raise SystemExit("gunicorn did not answer /healthz in time")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_wrk(
    port: int, mode: str, duration_s: int, sessions_file: Path, out: Path, think_ms: int = 0
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    done = subprocess.run(
        [
            "wrk",
            f"-t{CLIENTS}",
            f"-c{CLIENTS}",
            f"-d{duration_s}s",
            f"--timeout={WRK_TIMEOUT}",
            "-s",
            str(LUA),
            f"http://127.0.0.1:{port}",
        ],
        env={
            **os.environ,
            "BENCH_MODE": mode,
            "BENCH_SESSIONS": str(sessions_file),
            "BENCH_OUT": str(out),
            "BENCH_THINK_MS": str(think_ms),
            "BENCH_THINK_SPREAD": " ".join(map(str, THINK_SPREAD)),
        },
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - started
    samples: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    for path in out.glob("lat-*.txt"):
        for line in path.read_text().splitlines():
            kind, status, micros = line.split()
            samples.setdefault(kind, []).append(int(micros) / 1000)
            if int(status) != EXPECTED_STATUS[kind]:
                errors[kind] = errors.get(kind, 0) + 1
    timeouts = re.search(r"timeout (\d+)", done.stdout)
    kinds = {
        kind: {
            "requests": len(ms),
            "rps": round(len(ms) / duration_s, 1),
            "p50_ms": round(benchlib.percentile(ms, 50), 2),
            "p95_ms": round(benchlib.percentile(ms, 95), 2),
            "p99_ms": round(benchlib.percentile(ms, 99), 2),
            "unexpected_status": errors.get(kind, 0),
        }
        for kind, ms in sorted(samples.items())
    }
    total = sum(k["requests"] for k in kinds.values())
    return {
        "duration_s": duration_s,
        "think_ms": think_ms,
        "think_spread": list(THINK_SPREAD),
        "wall_s": round(wall, 2),
        "requests": total,
        "rps": round(total / duration_s, 1),
        "timeouts": int(timeouts.group(1)) if timeouts else 0,
        "kinds": kinds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = benchlib.parse_args(__doc__.split("\n\n")[0], argv)
    report = benchlib.Report("ra_app", args.smoke)
    size = SMOKE_SEED if args.smoke else FULL_SEED
    duration = SMOKE_DURATION_S if args.smoke else FULL_DURATION_S
    with (
        benchlib.isolated_stack("ra", bucket=False) as iso,
        tempfile.TemporaryDirectory(prefix="bench-ra-") as tmp,
    ):
        work = Path(tmp)
        env = {**os.environ, **iso.env, "SECRET_KEY": SECRET_KEY, "RA_QUEUE_ORDER": "score"}
        seed_s = seed(iso.pipeline_url, env, size)
        sessions, items = prepare_app(env)
        sessions_file = work / "sessions.tsv"
        sessions_file.write_text("".join(f"{c}\t{t}\n" for c, t in sessions))
        port = free_port()
        server = start_server(env, port, work / "gunicorn.log")
        try:
            health = run_wrk(port, "health", duration, sessions_file, work / "health")
            loop = run_wrk(port, "ra", duration, sessions_file, work / "ra")
            think = SMOKE_THINK_MS if args.smoke else THINK_MS
            paced = run_wrk(port, "ra", duration, sessions_file, work / "paced", think)
        finally:
            stop_server(server)
    hk = health["kinds"].get("health", {})
    nk, rk = loop["kinds"].get(NEXT_ITEM, {}), loop["kinds"].get("review", {})
    pn, pr = paced["kinds"].get(NEXT_ITEM, {}), paced["kinds"].get("review", {})
    p95_worst = max(nk.get("p95_ms", 0.0), rk.get("p95_ms", 0.0))
    p95_paced = max(pn.get("p95_ms", 0.0), pr.get("p95_ms", 0.0))
    report.data.update(
        {
            "seed": {**size, "seconds": round(seed_s, 1), "ra_items": items},
            "clients": CLIENTS,
            "server": "gunicorn -c ra_app/gunicorn.conf.py (defaults: gthread, "
            f"{os.environ.get('RA_WORKERS', 'min(4, 2*cpus+1)')} workers x 4 threads)",
            "baseline": health,
            "candidate": loop,
            "candidate_paced": paced,
            "rps_vs_healthz": benchlib.ratio(loop["rps"], health["rps"]),
            "p95_next_vs_healthz": benchlib.ratio(nk.get("p95_ms", 0), hk.get("p95_ms", 0)),
            "p95_review_vs_healthz": benchlib.ratio(rk.get("p95_ms", 0), hk.get("p95_ms", 0)),
            "targets": {"p95_ms_max": TARGET_P95_MS},
            "p95_worst_ms": p95_worst,
            "p95_worst_paced_ms": p95_paced,
            "meets_targets": p95_paced < TARGET_P95_MS,
            "meets_targets_flat_out": p95_worst < TARGET_P95_MS,
        }
    )
    report.row(
        "seeded",
        f"{size['files']} files",
        f"{size['classifications']} classifications, {items} queue items, {seed_s:.0f} s",
    )
    first_next = loop["kinds"].get("next", {})
    for name, k in (
        ("healthz (baseline)", hk),
        ("next item (skip + claim)", nk),
        ("GET /review/<id>", rk),
        ("first POST /next", first_next),
    ):
        if k:
            report.row(
                name,
                f"{k['rps']:.0f} req/s",
                f"p50 {k['p50_ms']:.1f} / p95 {k['p95_ms']:.1f} / p99 {k['p99_ms']:.1f} ms"
                + (f", {k['unexpected_status']} bad status" if k["unexpected_status"] else ""),
            )
    report.row(
        "RA loop total",
        f"{loop['rps']:.0f} req/s",
        f"{benchlib.ratio(loop['rps'], health['rps']):.2f}x of healthz",
    )
    report.row("worst p95, flat out", f"{p95_worst:.1f} ms", f"target < {TARGET_P95_MS} ms")
    for name, k in (("paced: next item", pn), ("paced: GET /review/<id>", pr)):
        if k:
            report.row(
                name,
                f"{k['rps']:.0f} req/s",
                f"p50 {k['p50_ms']:.1f} / p95 {k['p95_ms']:.1f} / p99 {k['p99_ms']:.1f} ms",
            )
    report.row(
        f"worst p95, paced (~{paced['think_ms']} ms think)",
        f"{p95_paced:.1f} ms",
        f"target < {TARGET_P95_MS} ms",
    )
    report.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
