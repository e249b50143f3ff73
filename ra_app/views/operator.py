"""The operator's page: queues, workers, dead letters and batches in flight (admin only).

Requeue and purge go through audio_pipeline.dead_letter_actions, the code behind
`audio-pipeline requeue` and `purge-failed`. Each button carries what the admin saw
(the dead letter's fingerprint, or the count and digest of the list) and is refused
when the list has changed since, so a click never acts on another entry than the
one on the screen. Every action done is written to the audit log. CSRF tokens are
checked for every POST by the app's CSRFProtect, before these views run.
"""

from __future__ import annotations

from typing import Any

import psycopg
import redis
from flask import Blueprint, abort, flash, redirect, render_template, request, url_for

from audio_pipeline import dead_letter_actions
from ra_app import audit_log, operator_panel
from ra_app.extensions import db
from ra_app.security import admin_required

bp = Blueprint("operator", __name__, url_prefix="/admin/operator")

DEAD_LETTERS_SHOWN = 200  # newest first; a purge still counts the whole list it saw


@bp.get("/")
@admin_required
def index() -> Any:
    panel = operator_panel.collect()
    shown = list(reversed(panel.dead_letters))[:DEAD_LETTERS_SHOWN]
    return render_template("admin/operator.html", panel=panel, dead_letters=shown)


def _form_int(name: str) -> int:
    raw = request.form.get(name, "")
    if not raw.isdigit():
        abort(400, description=f"{name} must be a whole number")
    return int(raw)


def _back() -> Any:
    return redirect(url_for("operator.index"))


def _audit(action: audit_log.Action, target: str, details: dict[str, Any]) -> None:
    # The action is done in Redis and the pipeline's database, outside this
    # transaction: the row follows it, with what actually happened.
    audit_log.record(action, target=target, details=details)
    db.session.commit()


def _requeue(selection: dict[str, Any], target: str) -> Any:
    try:
        r = operator_panel.operator_redis()
        database_url = operator_panel.pipeline_database_url()
        report = dead_letter_actions.requeue(r, database_url, **selection)
    except (operator_panel.NotConfiguredError, dead_letter_actions.DeadLetterActionError) as exc:
        flash(f"Nothing requeued: {exc}", "error")
        return _back()
    except (redis.RedisError, psycopg.Error) as exc:
        # Mid-way, some jobs may have moved already: say so, and log the attempt.
        error = f"{type(exc).__name__}: {exc}"
        _audit(audit_log.Action.DEAD_LETTER_REQUEUE, target, {"error": error})
        flash(f"Requeue stopped ({error}); some jobs may have moved: look again.", "error")
        return _back()
    moved = [o for o in report if o["result"] == "requeued"]
    _audit(
        audit_log.Action.DEAD_LETTER_REQUEUE,
        target,
        {
            "requeued": len(moved),
            "entries": [
                {k: o.get(k) for k in ("index", "stage", "queue", "result", "rows")} for o in report
            ],
        },
    )
    skipped = [o for o in report if o["result"] != "requeued"]
    queues = sorted({o["queue"] for o in moved})
    message = f"{len(moved)} job(s) requeued with attempts reset"
    flash(message + (f" (to {', '.join(queues)})" if queues else "") + ".", "info")
    for o in skipped:
        flash(f"Dead letter {o['index']}: {o['result']}", "error")
    return _back()


@bp.post("/requeue")
@admin_required
def requeue_one() -> Any:
    index = _form_int("index")
    fingerprint = request.form.get("fingerprint", "")
    if not fingerprint:
        abort(400, description="fingerprint is missing")
    return _requeue({"index": index, "expect": fingerprint}, f"queue:failed[{index}]")


@bp.post("/requeue-stage")
@admin_required
def requeue_stage() -> Any:
    stage = request.form.get("stage", "").strip()
    if not stage:
        abort(400, description="stage is missing")
    return _requeue({"stage": stage}, f"queue:failed stage={stage}")


@bp.post("/purge")
@admin_required
def purge() -> Any:
    seen = dead_letter_actions.Seen(_form_int("count"), request.form.get("digest", ""))
    try:
        deleted = dead_letter_actions.purge_seen(operator_panel.operator_redis(), seen)
    except (operator_panel.NotConfiguredError, dead_letter_actions.DeadLetterActionError) as exc:
        flash(f"Nothing deleted: {exc}", "error")
        return _back()
    except redis.RedisError as exc:
        flash(f"Nothing deleted: the pipeline's Redis did not answer ({exc})", "error")
        return _back()
    _audit(audit_log.Action.DEAD_LETTER_PURGE, "queue:failed", {"deleted": deleted})
    flash(f"Deleted {deleted} dead letter(s).", "info")
    return _back()
