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
    audio-pipeline reclassify --policy NAME [--version N] [--model M] [--batch B] [--again]
                                                judge stored transcripts again (no ASR)
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import redis

from audio_pipeline import dead_letter_actions, policy_files, queue_admin
from audio_pipeline import reclassify as text_jobs
from audio_pipeline.config import QUEUE_CLASSIFY, ConfigError, Settings, load_settings
from audio_pipeline.records import batches as batch_records
from audio_pipeline.records import policies as policy_records
from audio_pipeline.records import reclassify as reclassify_records
from audio_pipeline.records import results as result_records

IN_FLIGHT_BATCH_LIMIT = 20  # batches listed by `status` (counts cover all of them)
TEXT_COLUMN_CHARS = 70  # error and payload columns are cut to keep tables on one screen
# `status --json`: the version of its shape (health-check.yml reads it). Keys are only
# ever added; a renamed or removed key raises it.
STATUS_SCHEMA = 1


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
    """Everything `status` shows: the queues (queue_admin), batches and results."""
    status: dict[str, Any] = {"schema": STATUS_SCHEMA, **queue_admin.queue_status(r)}
    status.update(_database_status(settings))
    return status


def _database_status(settings: Settings) -> dict[str, Any]:
    try:
        with psycopg.connect(settings.database_url, connect_timeout=5) as conn:
            batches = batch_records.status_summary(conn, IN_FLIGHT_BATCH_LIMIT)
            results = {
                "active_policies": policy_records.count_active(conn),
                "flagged": result_records.count_flagged(conn),
            }
            reclassify = {"runs": reclassify_records.run_progress(conn)}
    except psycopg.Error as exc:
        error = {"error": f"PostgreSQL unavailable: {exc}".strip()}
        return {"batches": error, "results": dict(error), "reclassify": dict(error)}
    return {"batches": batches, "results": results, "reclassify": reclassify}


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
    for stage, n in status["unsettled_dead_letters"].items():
        # the reaper's dead letters: their rows are marked failed by the next worker
        # of that stage; a count that stays means none of that stage is running
        print(f"  {n} of them from stage {stage}: rows not yet marked failed")
    print("\nWORKERS")
    if status["workers"]:
        rows = [
            (
                w["worker"],
                w["state"],
                _age(w["heartbeat_age_s"]),
                _clip(w["job"] or "-", 60),
                w["look_ahead"] or "-",
            )
            for w in status["workers"]
        ]
        print(render_table(["worker", "state", "heartbeat", "current job", "ahead"], rows))
    else:
        print("(none)")
    _print_reclassify(status["reclassify"])
    print("\nBATCHES")
    batches = status["batches"]
    if "error" in batches:
        print(batches["error"])
        return
    if batches["by_status"]:
        print(render_table(["status", "batches"], sorted(batches["by_status"].items())))
    else:
        print("(none)")
    if batches["files_failed"]:
        print(
            f"files failed: {batches['files_failed']} in all; "
            f"{batches['done_with_failures']} done batches have failed files "
            "(each file's reason is in audio_files.error)"
        )
    if batches["in_flight"]:
        print("\nIN FLIGHT")
        rows = [
            (
                b["batch_id"],
                b["status"],
                b["file_count"],
                b["files_done"],
                b["files_failed"],
                b["unpack_host"],
                _age(b["idle_s"]),
            )
            for b in batches["in_flight"]
        ]
        print(render_table(["batch", "status", "files", "done", "failed", "host", "idle"], rows))


def _print_reclassify(reclassify: dict[str, Any]) -> None:
    print("\nRE-CLASSIFICATION (newest runs; text-only jobs on queue:classify)")
    if "error" in reclassify:
        print(reclassify["error"])
    elif reclassify["runs"]:
        rows = [
            (
                run["run_id"],
                f"{run['policy']} v{run['policy_version']}",
                run["model"],
                run["batch_id"] or "(all done)",
                run["files"],
                run["queued"],
                run["done"],
                run["failed"],
            )
            for run in reclassify["runs"]
        ]
        headers = ["run", "policy", "model", "batch", "files", "queued", "done", "failed"]
        print(render_table(headers, rows))
    else:
        print("(none)")


# -- commands -------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, settings: Settings, r: redis.Redis) -> int:
    status = collect_status(r, settings)
    if args.json:
        _print_json(status)
    else:
        print_status(status)
    return 0


def cmd_failed(args: argparse.Namespace, settings: Settings, r: redis.Redis) -> int:
    entries = queue_admin.read_failed(r)
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
            (
                index,
                e.get("failed_at"),
                e.get("stage"),
                e.get("queue"),
                e.get("attempts"),
                _clip(e.get("error", "")),
                _clip(str(e.get("job", "")), 40),
            )
        )
    print(render_table(["index", "failed_at", "stage", "queue", "tries", "error", "job"], rows))
    print(f"\n{len(shown)} of {total} dead letters shown (newest last)")
    return 0


def cmd_requeue(args: argparse.Namespace, settings: Settings, r: redis.Redis) -> int:
    try:
        report = dead_letter_actions.requeue(
            r, settings.database_url, all_=args.all, index=args.index, stage=args.stage
        )
    except dead_letter_actions.DeadLetterActionError as exc:
        raise CommandError(str(exc)) from None
    moved = [o for o in report if o["result"] == "requeued"]
    if args.json:
        _print_json({"requeued": len(moved), "entries": report})
    elif report:
        rows = [
            (o["index"], o["stage"], o["queue"], o["result"], o.get("rows") or "-") for o in report
        ]
        print(render_table(["index", "stage", "to queue", "result", "rows back in play"], rows))
        print(f"\n{len(moved)} job(s) requeued with attempts reset")
    else:
        print("nothing to requeue")
    return 0 if len(moved) == len(report) else 1


def cmd_purge_failed(args: argparse.Namespace, settings: Settings, r: redis.Redis) -> int:
    seen = dead_letter_actions.seen_failed(r)
    if seen.count == 0:
        print("queue:failed is already empty")
        return 0
    if not args.yes:
        answer = input(f"Delete {seen.count} dead letter(s) from queue:failed for good? [y/N] ")
        if answer.strip().lower() not in {"y", "yes"}:
            print("nothing deleted")
            return 1
    try:
        deleted = dead_letter_actions.purge_seen(r, seen)
    except dead_letter_actions.DeadLetterActionError as exc:
        raise CommandError(str(exc)) from None
    print(f"deleted {deleted} dead letter(s)")
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
            try:
                result = policy_records.add_version(conn, args.name, args.version, text, lexicon)
            except policy_records.PolicyVersionConflict as exc:
                raise CommandError(str(exc)) from None
            print(f"policy {args.name} v{args.version}: {result}")
        elif args.policy_command == "list":
            policies = policy_records.all_versions(conn)
            if args.json:
                _print_json(policies)
            elif not policies:
                print("no policies")
            else:
                rows = [
                    (
                        p["id"],
                        p["name"],
                        p["version"],
                        "yes" if p["active"] else "no",
                        _clip(", ".join(p["lexicon"]), 30),
                        _clip(p["text"], 50),
                    )
                    for p in policies
                ]
                print(render_table(["id", "name", "version", "active", "lexicon", "text"], rows))
        else:
            if not policy_records.set_active(conn, args.name, args.version, False):
                raise CommandError(f"no policy {args.name!r} version {args.version}")
            print(f"policy {args.name} v{args.version}: deactivated")
    return 0


def cmd_reclassify(args: argparse.Namespace, settings: Settings, r: redis.Redis) -> int:
    with psycopg.connect(settings.database_url, connect_timeout=5) as conn:
        try:
            policy = reclassify_records.resolve_policy(conn, args.policy, args.version)
            if args.batch is not None:
                reclassify_records.check_batch(conn, args.batch)
            model = _reclassify_model(conn, settings, args.model)
            run_id, files = reclassify_records.create_run(
                conn, policy.id, model, args.batch, again=args.again
            )
        except reclassify_records.ReclassifyError as exc:
            raise CommandError(str(exc)) from None
        conn.commit()  # the run's rows exist before any worker can take its jobs
    try:
        queued = text_jobs.enqueue(r, run_id, policy.id, model, files)
    except redis.exceptions.RedisError as exc:
        # No job may be left without its run, nor a run without its jobs: drop the run
        # (jobs pushed already find no run file to mark and only store their verdict).
        with psycopg.connect(settings.database_url, connect_timeout=5) as conn:
            reclassify_records.delete_run(conn, run_id)
        raise CommandError(f"Redis unavailable, run {run_id} withdrawn: {exc}") from None
    summary = {
        "run_id": run_id,
        "policy": policy.name,
        "policy_version": policy.version,
        "policy_active": policy.active,
        "model": model,
        "batch_id": args.batch,
        "files": queued,
        "queue": QUEUE_CLASSIFY,
    }
    if args.json:
        _print_json(summary)
        return 0
    scope = f"batch {args.batch}" if args.batch else "every finished batch"
    print(
        f"run {run_id}: {queued} file(s) of {scope} queued on {QUEUE_CLASSIFY} "
        f"for policy {policy.name} v{policy.version} with model {model}"
    )
    if not policy.active:
        print(
            f"note: {policy.name} v{policy.version} is not active: its verdicts are stored, "
            "but they do not enter the RA queue"
        )
    print("progress: audio-pipeline status (RE-CLASSIFICATION)")
    return 0


def _reclassify_model(conn: psycopg.Connection, settings: Settings, model: str | None) -> str:
    """The model to judge with: the one named, if the fleet knows it (it has stored
    verdicts, it is the lexicon, or it is published in the model store, where the gpu
    hosts sync their models from); by default the model of the newest verdicts."""
    from audio_pipeline import model_store
    from audio_pipeline.classify import LEXICON_MODEL

    in_use = reclassify_records.models_in_use(conn)
    if model is None:
        if not in_use:
            raise CommandError(
                "no verdict is stored yet, so there is no current model: use --model"
            )
        return in_use[0]
    if model in in_use or model == LEXICON_MODEL:
        return model
    known = ", ".join(in_use) or "none"
    try:
        model_store.read_manifest(model, settings)
    except model_store.ModelStoreError as exc:
        raise CommandError(
            f"unknown model {model!r}: no verdict of it is stored and it is not in the model "
            f"store ({exc}); models with stored verdicts: {known} (and {LEXICON_MODEL})"
        ) from None
    except Exception as exc:  # S3 away or refusing: the name cannot be checked
        raise CommandError(
            f"unknown model {model!r}: no verdict of it is stored, and the model store "
            f"cannot be read to look for it ({type(exc).__name__}: {exc})"
        ) from None
    return model


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

    p = sub.add_parser(
        "reclassify",
        help="judge stored transcripts again under a policy version (text-only jobs, no ASR)",
    )
    p.add_argument("--policy", required=True, metavar="NAME", help="the policy's name")
    p.add_argument(
        "--version", type=int, metavar="N", help="the version (default: its newest active one)"
    )
    p.add_argument(
        "--model",
        metavar="M",
        help="classifier model as classifications.model names it (default: the newest verdicts')",
    )
    p.add_argument("--batch", metavar="B", help="one finished batch (default: every finished one)")
    p.add_argument(
        "--again",
        action="store_true",
        help="also files that have a verdict of this version by this model already",
    )
    p.add_argument("--json", action="store_true", help="the run, for scripts")
    p.set_defaults(func=cmd_reclassify)

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
