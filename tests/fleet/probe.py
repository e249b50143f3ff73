"""Checks run from inside a fleet machine's network namespace (lab.Fleet.probe):
the host's Python and libraries, the machine's address and firewall.

    python probe.py NAME JSON-ARGS   ->  one JSON value on stdout
"""

from __future__ import annotations

import json
import socket
import sys
import urllib.request
from typing import Any

import psycopg
import redis


def ports(address: str, ports: list[int], timeout_s: float) -> dict[str, bool]:
    """Which of these TCP ports accept a connection."""
    reached = {}
    for port in ports:
        with socket.socket() as s:
            s.settimeout(timeout_s)
            reached[str(port)] = s.connect_ex((address, port)) == 0
    return reached


def redis_access(address: str, password: str, ra_user: str, ra_password: str) -> dict[str, Any]:
    """The pipeline's password opens Redis; none or a wrong one does not; the RA
    app's ACL user reaches the limiter's keys and nothing else."""
    out: dict[str, Any] = {}
    for name, kwargs in (("anonymous", {}), ("wrong", {"password": "wrong"})):
        try:
            redis.Redis(host=address, socket_timeout=5, **kwargs).ping()
            out[name] = "ok"
        except redis.AuthenticationError:
            out[name] = "refused"
    pipeline = redis.Redis(host=address, socket_timeout=5, password=password)
    out["pipeline"] = pipeline.ping()
    out["appendonly"] = pipeline.config_get("appendonly")["appendonly"]
    ra = redis.Redis(host=address, socket_timeout=5, username=ra_user, password=ra_password)
    out["ra_ping"] = ra.ping()
    out["ra_limits_key"] = ra.set("LIMITS:probe", 1, ex=5)
    for command in (("LLEN", "queue:unpack"), ("KEYS", "*"), ("FLUSHALL",)):
        try:
            ra.execute_command(*command)
            out[command[0]] = "allowed"
        except redis.exceptions.NoPermissionError:
            out[command[0]] = "denied"
    return out


def limiter_keys(address: str, password: str) -> list[str]:
    r = redis.Redis(host=address, socket_timeout=5, password=password)
    return sorted(k.decode() for k in r.scan_iter("LIMITS:*"))


def postgres_access(address: str, pipeline_password: str, ra_password: str) -> dict[str, Any]:
    """Wrong passwords and the superuser are refused; the pipeline owns its tables;
    the RA app reads them and cannot write them."""
    base = f"host={address} dbname=audio_pipeline connect_timeout=5"
    out: dict[str, Any] = {}
    for name, user in (("wrong", "pipeline"), ("superuser", "postgres")):
        try:
            psycopg.connect(f"{base} user={user} password=wrong").close()
            out[name] = "ok"
        except psycopg.OperationalError as e:
            out[name] = str(e)
    with psycopg.connect(f"{base} user=pipeline password={pipeline_password}") as c:
        out["method"] = c.execute("SHOW password_encryption").fetchone()[0]  # type: ignore[index]
        owners = "SELECT tablename, tableowner FROM pg_tables WHERE schemaname='public'"
        out["owners"] = dict(c.execute(owners).fetchall())  # type: ignore[arg-type]
    with psycopg.connect(f"{base} user=ra_app password={ra_password}") as c:
        c.execute("SELECT count(*) FROM ra_queue").fetchone()
        try:
            c.execute("INSERT INTO policies (name, version, text) VALUES ('x', 1, 'x')")
            out["ra_insert"] = "allowed"
        except psycopg.errors.InsufficientPrivilege:
            out["ra_insert"] = "denied"
    return out


def ra_audit_log_access(address: str, ra_password: str) -> dict[str, str]:
    """What the RA app's own database role may do to the audit log, over the fleet
    network as the app connects: read it, and nothing that changes or removes a row."""
    out = {}
    attempts = {
        "select": "SELECT count(*) FROM ra_audit_log",
        "update": "UPDATE ra_audit_log SET action = 'forged'",
        "delete": "DELETE FROM ra_audit_log",
        "truncate": "TRUNCATE ra_audit_log",
        "disable_guard": "ALTER TABLE ra_audit_log DISABLE TRIGGER USER",
        "prune": "SELECT ra_audit_log_prune(1, 'probe')",
    }
    dsn = f"host={address} dbname=audio_pipeline user=ra_app password={ra_password}"
    for name, statement in attempts.items():
        with psycopg.connect(f"{dsn} connect_timeout=5") as c:
            try:
                c.execute(statement)
                out[name] = "allowed"
            except (psycopg.errors.InsufficientPrivilege, psycopg.errors.RaiseException):
                out[name] = "denied"
            c.rollback()
    return out


def http_json(url: str, timeout_s: float) -> Any:
    """GET ``url``, the JSON it answers (a loopback-only API of this machine)."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"not a loopback URL: {url}")
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (checked above)
        return json.load(response)


PROBES = {
    f.__name__: f
    for f in (ports, redis_access, limiter_keys, postgres_access, ra_audit_log_access, http_json)
}

if __name__ == "__main__":
    print(json.dumps(PROBES[sys.argv[1]](**json.loads(sys.argv[2]))))
