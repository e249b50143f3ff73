"""``audio-pipeline``: the operator's view of the queues, failures, batches and policies.

    audio-pipeline status [--json]              queue depths, workers, batches in flight
    audio-pipeline failed [--limit N] [--json]  recent dead letters, with their index
    audio-pipeline requeue (--all | --index N | --stage S)
    audio-pipeline purge-failed [--yes]
    audio-pipeline init-db                      apply schema.sql (idempotent)
    audio-pipeline check-connections [--json]   reach Redis, PostgreSQL and S3 (exit 1 if not)
    audio-pipeline policy add NAME --version N --file F [--lexicon 'a,b']
    audio-pipeline policy apply PATH... [--json] policy files (policies/*.yml), idempotent
    audio-pipeline policy list [--json]
    audio-pipeline policy deactivate NAME VERSION
    audio-pipeline models publish|sync|merge-cope-a ...  the S3 model store (model_cli.py)
    audio-pipeline s3 ls [PREFIX] [--count]     the bucket as this host sees it (s3_cli.py)
    audio-pipeline s3 get KEY DEST              a verified, timed download

Exit codes: 0 ok, 1 the command could not do what was asked (named on stderr),
2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import redis

from audio_pipeline import policy_files
from audio_pipeline.config import (
    QUEUE_FAILED,
    QUEUE_TRANSCRIBE,
    QUEUE_UNPACK,
    ConfigError,
    Settings,
    load_settings,
)
from audio_pipeline.queue import (
    ATTEMPTS_FIELD,
    DELAYED_KEY,
    PROCESSING_PREFIX,
    WORKERS_KEY,
    heartbeat_key,
    parse_processing_key,
)
from audio_pipeline.records import policies as policy_records

ALWAYS_SHOWN_QUEUES = (QUEUE_UNPACK, QUEUE_TRANSCRIBE, QUEUE_FAILED)
IN_FLIGHT_BATCH_LIMIT = 20  # batches listed by `status` (counts cover all of them)
TEXT_COLUMN_CHARS = 70  # error and payload columns are cut to keep tables on one screen

# Moves one dead letter (ARGV[1]) back to a queue only if it is still in queue:failed,
# so two operators requeueing at once never double a job.
_REQUEUE_LUA = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
"""


class CommandError(Exception):
    """The command cannot do what was asked; the message says why."""


# -- output helpers ---------------------------------------------------------------


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, numbers right-aligned, a dashed rule under the header."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    numeric = [
        bool(rows) and all(isinstance(r[i], int | float) for r in rows) for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _clip(text: str, limit: int = TEXT_COLUMN_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


# -- status -------------------------------------------------------------------------


def collect_status(r: redis.Redis, settings: Settings) -> dict[str, Any]:
    now = time.time()
    queues = {q: 0 for q in ALWAYS_SHOWN_QUEUES}
    for key in r.scan_iter(match="queue:*", count=500):
        if r.type(key) == "list":
            queues[key] = r.llen(key)

    live = {w for w in r.smembers(WORKERS_KEY) if r.exists(heartbeat_key(w))}
    processing = []
    for key in sorted(r.scan_iter(match=PROCESSING_PREFIX + "*", count=500)):
        try:
            worker_id, source = parse_processing_key(key)
        except ValueError:
            continue
        alive = worker_id in live or bool(r.exists(heartbeat_key(worker_id)))
        processing.append(
            {"worker": worker_id, "source": source, "items": r.llen(key), "alive": alive}
        )

    delayed: dict[str, dict[str, Any]] = {}
    for member, due in r.zrange(DELAYED_KEY, 0, -1, withscores=True):
        try:
            queue = json.loads(member)["queue"]
        except (ValueError, KeyError, TypeError):
            queue = "(unreadable)"
        entry = delayed.setdefault(queue, {"queue": queue, "retries": 0, "next_due_s": None})
        entry["retries"] += 1
        wait = max(0.0, due - now)
        entry["next_due_s"] = (
            wait if entry["next_due_s"] is None else min(entry["next_due_s"], wait)
        )

    workers = []
    for worker_id in sorted(r.smembers(WORKERS_KEY)):
        info = r.hgetall(heartbeat_key(worker_id))
        beat_at = float(info["beat_at"]) if info.get("beat_at") else None
        workers.append(
            {
                "worker": worker_id,
                "stage": info.get("stage", worker_id.split(":", 1)[0]),
                "host": info.get("host"),
                "pid": info.get("pid"),
                "state": info.get("state") if info else "dead (awaiting reaper)",
                "heartbeat_age_s": None if beat_at is None else round(now - beat_at, 1),
                "job": info.get("job_raw") or None,
                # jobs claimed ahead and being prepared (gpu worker, PREFETCH)
                "look_ahead": int(info.get("look_ahead") or 0),
            }
        )

    return {
        "queues": dict(sorted(queues.items())),
        "processing": processing,
        "delayed_retries": sorted(delayed.values(), key=lambda d: d["queue"]),
        "failed": queues[QUEUE_FAILED],
        "workers": workers,
        "batches": _batch_status(settings),
    }


def _batch_status(settings: Settings) -> dict[str, Any]:
    try:
        with psycopg.connect(settings.database_url, connect_timeout=5) as conn:
            counts = dict(conn.execute("SELECT status, count(*) FROM batches GROUP BY status"))
            rows = conn.execute(
                """
                SELECT b.batch_id, b.status, b.file_count, b.unpack_host,
                       count(a.id) FILTER (WHERE a.status = 'done') AS files_done,
                       count(a.id) FILTER (WHERE a.status = 'failed') AS files_failed,
                       extract(epoch FROM now() - b.updated_at) AS idle_s
                FROM batches b LEFT JOIN audio_files a ON a.batch_id = b.batch_id
                WHERE b.status NOT IN ('done', 'failed')
                GROUP BY b.batch_id ORDER BY b.created_at LIMIT %s
                """,
                (IN_FLIGHT_BATCH_LIMIT,),
            ).fetchall()
    except psycopg.Error as exc:
        return {"error": f"PostgreSQL unavailable: {exc}".strip()}
    in_flight = [
        {
            "batch_id": b, "status": s, "file_count": fc, "unpack_host": h,
            "files_done": d, "files_failed": f, "idle_s": float(idle),
        }
        for b, s, fc, h, d, f, idle in rows
    ]  # fmt: skip
    return {"by_status": counts, "in_flight": in_flight}


def print_status(status: dict[str, Any]) -> None:
    print("QUEUES")
    print(render_table(["queue", "depth"], list(status["queues"].items())))
    print("\nIN PROGRESS (processing lists)")
    if status["processing"]:
        rows = [
            (p["worker"], p["source"], p["items"], "alive" if p["alive"] else "DEAD")
            for p in status["processing"]
        ]
        print(render_table(["worker", "from queue", "items", "worker state"], rows))
    else:
        print("(none)")
    print("\nDELAYED RETRIES")
    if status["delayed_retries"]:
        rows = [
            (d["queue"], d["retries"], _age(d["next_due_s"])) for d in status["delayed_retries"]
        ]
        print(render_table(["queue", "retries", "next due in"], rows))
    else:
        print("(none)")
    print(f"\nFAILED (dead letters): {status['failed']}")
    print("\nWORKERS")
    if status["workers"]:
        rows = [
            (w["worker"], w["state"], _age(w["heartbeat_age_s"]), _clip(w["job"] or "-", 60),
             w["look_ahead"] or "-")
            for w in status["workers"]
        ]  # fmt: skip
        print(render_table(["worker", "state", "heartbeat", "current job", "ahead"], rows))
    else:
        print("(none)")
    print("\nBATCHES")
    batches = status["batches"]
    if "error" in batches:
        print(batches["error"])
        return
    if batches["by_status"]:
        print(render_table(["status", "batches"], sorted(batches["by_status"].items())))
    else:
        print("(none)")
    if batches["in_flight"]:
        print("\nIN FLIGHT")
        rows = [
            (b["batch_id"], b["status"], b["file_count"], b["files_done"], b["files_failed"],
             b["unpack_host"], _age(b["idle_s"]))
            for b in batches["in_flight"]
        ]  # fmt: skip
        print(render_table(["batch", "status", "files", "done", "failed", "host", "idle"], rows))


# -- dead letters -------------------------------------------------------------------


def read_failed(r: redis.Redis) -> list[tuple[int, str, dict[str, Any] | None]]:
    """(index, raw entry, parsed entry or None if unreadable) for each dead letter."""
    out = []
    for index, raw in enumerate(r.lrange(QUEUE_FAILED, 0, -1)):
        try:
            entry = json.loads(raw)
            parsed = entry if isinstance(entry, dict) else None
        except json.JSONDecodeError:
            parsed = None
        out.append((index, raw, parsed))
    return out


def reset_attempts(job: str) -> str | None:
    """The job as it goes back to its queue: retry count cleared; None if unusable."""
    try:
        payload = json.loads(job)
    except (TypeError, json.JSONDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    payload.pop(ATTEMPTS_FIELD, None)
    return json.dumps(payload, separators=(",", ":"))


def requeue(
    r: redis.Redis, *, all_: bool = False, index: int | None = None, stage: str | None = None
) -> list[dict[str, Any]]:
    """Move selected dead letters back to their source queues; returns what happened."""
    entries = read_failed(r)
    if index is not None:
        if not 0 <= index < len(entries):
            raise CommandError(f"no dead letter at index {index} ({len(entries)} in queue:failed)")
        selected = [entries[index]]
    elif stage is not None:
        selected = [e for e in entries if e[2] is not None and e[2].get("stage") == stage]
    elif all_:
        selected = entries
    else:
        raise CommandError("say which: --all, --index N or --stage S")
    move = r.register_script(_REQUEUE_LUA)
    report = []
    for idx, raw, entry in selected:
        outcome: dict[str, Any] = {"index": idx, "stage": None, "queue": None}
        if entry is None or not isinstance(entry.get("queue"), str):
            outcome["result"] = "skipped: unreadable dead letter"
        else:
            outcome.update(stage=entry.get("stage"), queue=entry["queue"])
            job = reset_attempts(entry.get("job"))
            if job is None:
                outcome["result"] = "skipped: the job is not a JSON object (it would fail again)"
            elif move(keys=[QUEUE_FAILED, entry["queue"]], args=[raw, job]):
                outcome["result"] = "requeued"
                outcome["job"] = job
            else:
                outcome["result"] = "skipped: no longer in queue:failed"
        report.append(outcome)
    return report


# -- policies -------------------------------------------------------------------------


def add_policy(
    conn: psycopg.Connection, name: str, version: int, text: str, lexicon: list[str]
) -> str:
    existing = policy_records.get_version(conn, name, version)
    if existing is not None:
        if existing.same_wording(text, tuple(lexicon)):
            return "unchanged"
        raise CommandError(
            f"policy {name!r} version {version} already exists with a different text or "
            "lexicon; policies are never edited: add version "
            f"{policy_records.next_version(conn, name)} instead"
        )
    policy_records.insert_version(conn, name, version, text, lexicon)
    return "added"


# -- commands -------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, settings: Settings, r: redis.Redis) -> int:
    status = collect_status(r, settings)
    if args.json:
        _print_json(status)
    else:
        print_status(status)
    return 0


def cmd_failed(args: argparse.Namespace, settings: Settings, r: redis.Redis) -> int:
    entries = read_failed(r)
    total = len(entries)
    shown = entries[-args.limit :] if args.limit > 0 else []
    if args.json:
        _print_json(
            {
                "total": total,
                "entries": [{"index": i, **(e or {"raw": raw})} for i, raw, e in shown],
            }
        )
        return 0
    if not entries:
        print("queue:failed is empty")
        return 0
    rows = []
    for index, raw, e in shown:
        if e is None:
            rows.append((index, "-", "-", "-", "-", "unreadable dead letter", _clip(raw, 40)))
            continue
        rows.append(
            (index, e.get("failed_at"), e.get("stage"), e.get("queue"), e.get("attempts"),
             _clip(e.get("error", "")), _clip(str(e.get("job", "")), 40))
        )  # fmt: skip
    print(render_table(["index", "failed_at", "stage", "queue", "tries", "error", "job"], rows))
    print(f"\n{len(shown)} of {total} dead letters shown (newest last)")
    return 0


def cmd_requeue(args: argparse.Namespace, settings: Settings, r: redis.Redis) -> int:
    report = requeue(r, all_=args.all, index=args.index, stage=args.stage)
    moved = [o for o in report if o["result"] == "requeued"]
    if args.json:
        _print_json({"requeued": len(moved), "entries": report})
    elif report:
        rows = [(o["index"], o["stage"], o["queue"], o["result"]) for o in report]
        print(render_table(["index", "stage", "to queue", "result"], rows))
        print(f"\n{len(moved)} job(s) requeued with attempts reset")
    else:
        print("nothing to requeue")
    return 0 if len(moved) == len(report) else 1


def cmd_purge_failed(args: argparse.Namespace, settings: Settings, r: redis.Redis) -> int:
    count = r.llen(QUEUE_FAILED)
    if count == 0:
        print("queue:failed is already empty")
        return 0
    if not args.yes:
        answer = input(f"Delete {count} dead letter(s) from queue:failed for good? [y/N] ")
        if answer.strip().lower() not in {"y", "yes"}:
            print("nothing deleted")
            return 1
    # Trim exactly the entries counted: a failure arriving meanwhile is kept.
    r.ltrim(QUEUE_FAILED, count, -1)
    print(f"deleted {count} dead letter(s)")
    return 0


def cmd_init_db(args: argparse.Namespace, settings: Settings, r: redis.Redis | None) -> int:
    from audio_pipeline.db import apply_schema

    apply_schema(settings.database_url)
    print(
        f"schema applied to {settings.postgres_db} on {settings.postgres_host}:"
        f"{settings.postgres_port}"
    )
    return 0


def cmd_check_connections(
    args: argparse.Namespace, settings: Settings, r: redis.Redis | None
) -> int:
    from audio_pipeline.connectivity import check_connections, report

    results = check_connections(settings)
    if args.json:
        _print_json(report(settings, results))
    else:
        rows = [(c.service, "ok" if c.ok else "FAILED", c.target, c.detail) for c in results]
        print(render_table(["service", "result", "target", "detail"], rows))
    return 0 if all(c.ok for c in results) else 1


def cmd_policy(args: argparse.Namespace, settings: Settings, r: redis.Redis | None) -> int:
    if args.policy_command == "apply":
        # Every file is checked before the database is touched.
        try:
            loaded = policy_files.load_policy_files(args.paths)
        except policy_files.PolicyFileError as exc:
            raise CommandError(str(exc)) from None
    with psycopg.connect(settings.database_url) as conn:
        if args.policy_command == "apply":
            try:
                summary = policy_files.apply(conn, loaded)
            except policy_files.PolicyFileError as exc:
                raise CommandError(str(exc)) from None
            if args.json:
                _print_json(summary)
            else:
                for p in summary["policies"]:
                    off = p["deactivated"]
                    note = f" (switched off: v{', v'.join(map(str, off))})" if off else ""
                    version = f" v{p['version']}" if p["version"] is not None else ""
                    print(f"policy {p['name']}{version}: {p['result']}{note}  [{p['file']}]")
        elif args.policy_command == "add":
            text = _read_policy_text(args.file)
            lexicon = [t.strip() for t in (args.lexicon or "").split(",") if t.strip()]
            result = add_policy(conn, args.name, args.version, text, lexicon)
            print(f"policy {args.name} v{args.version}: {result}")
        elif args.policy_command == "list":
            policies = policy_records.all_versions(conn)
            if args.json:
                _print_json(policies)
            elif not policies:
                print("no policies")
            else:
                rows = [
                    (p["id"], p["name"], p["version"], "yes" if p["active"] else "no",
                     _clip(", ".join(p["lexicon"]), 30), _clip(p["text"], 50))
                    for p in policies
                ]  # fmt: skip
                print(render_table(["id", "name", "version", "active", "lexicon", "text"], rows))
        else:
            if not policy_records.set_active(conn, args.name, args.version, False):
                raise CommandError(f"no policy {args.name!r} version {args.version}")
            print(f"policy {args.name} v{args.version}: deactivated")
    return 0


def _read_policy_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read policy file {path}: {exc}") from None
    if not text:
        raise CommandError(f"policy file {path} is empty")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audio-pipeline", description="Operate the audio pipeline's queues and records."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("status", help="queue depths, workers, batches in flight")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("failed", help="list dead letters (queue:failed)")
    p.add_argument("--limit", type=int, default=20, help="newest N entries (default 20)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_failed)

    p = sub.add_parser("requeue", help="move dead letters back to their queue, attempts reset")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every dead letter")
    which.add_argument("--index", type=int, help="one entry, by the index `failed` shows")
    which.add_argument("--stage", help="every dead letter of one stage (transfer, unpack, gpu)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_requeue)

    p = sub.add_parser("purge-failed", help="delete every dead letter (asks first)")
    p.add_argument("--yes", action="store_true", help="do not ask")
    p.set_defaults(func=cmd_purge_failed)

    p = sub.add_parser("init-db", help="apply schema.sql (idempotent)")
    p.set_defaults(func=cmd_init_db, needs_redis=False)

    p = sub.add_parser(
        "check-connections",
        help="reach Redis, PostgreSQL and S3 with this environment's credentials",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_check_connections, needs_redis=False)

    p = sub.add_parser("policy", help="moderation policies (versioned)")
    psub = p.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    add = psub.add_parser("add", help="add a policy version from a text file")
    add.add_argument("name")
    add.add_argument("--version", type=int, required=True)
    add.add_argument("--file", type=Path, required=True, help="the policy text")
    add.add_argument("--lexicon", help="comma-separated terms for the lexicon classifier")
    apply = psub.add_parser(
        "apply", help="make the policies in YAML files current (new version if reworded)"
    )
    apply.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="policy files or directories of them"
    )
    apply.add_argument("--json", action="store_true", help="a summary for scripts (changed: ...)")
    lst = psub.add_parser("list", help="every policy version")
    lst.add_argument("--json", action="store_true")
    deact = psub.add_parser("deactivate", help="stop classifying against a version")
    deact.add_argument("name")
    deact.add_argument("version", type=int)
    p.set_defaults(func=cmd_policy, needs_redis=False)

    from audio_pipeline import model_cli, s3_cli

    model_cli.add_parser(sub)
    s3_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"audio-pipeline: {exc}", file=sys.stderr)
        return 2
    r: redis.Redis | None = None
    if getattr(args, "needs_redis", True):
        from audio_pipeline.redis_conn import get_redis

        r = get_redis(settings)
    try:
        return int(args.func(args, settings, r))
    except CommandError as exc:
        print(f"audio-pipeline {args.command}: {exc}", file=sys.stderr)
        return 1
    except redis.exceptions.ConnectionError as exc:
        print(f"audio-pipeline {args.command}: Redis unavailable: {exc}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(f"audio-pipeline {args.command}: PostgreSQL unavailable: {exc}", file=sys.stderr)
        return 1
    except psycopg.errors.CheckViolation as exc:
        print(f"audio-pipeline {args.command}: rejected by the schema: {exc}", file=sys.stderr)
        return 1
    except EOFError:
        print("\nnothing deleted (no answer)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
