"""Bearer-token API for scripts: next item, submit a label, skip, export.

curl -X POST -H "Authorization: Bearer $TOKEN" https://ra.example/api/v1/next
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, jsonify, request, url_for

from ra_app import assignment, audio, audit_log, blind, pipeline
from ra_app.audit_log import Action
from ra_app.codebook import AnswerError
from ra_app.codebook_support import get_codebook
from ra_app.export import ExportFormat
from ra_app.extensions import db
from ra_app.labels import LabelError, record_label
from ra_app.models import Assignment, Role
from ra_app.security import token_required
from ra_app.views.admin import export_response
from ra_app.views.review import assignment_target, commit_skip, record_play

bp = Blueprint("api", __name__, url_prefix="/api/v1")


def _assignment_json(found: Assignment) -> dict[str, Any]:
    item = blind.review_item(found.classification_id)
    return {
        "assignment_id": found.id,
        "status": found.status,
        "expires_at": found.expires_at.isoformat() if found.expires_at else None,
        "audio_url": url_for("api.audio_file", assignment_id=found.id, _external=True),
        "item": item.as_json() if item else None,
    }


def _own(assignment_id: int) -> Assignment | None:
    found = db.session.get(Assignment, assignment_id)
    return found if found is not None and found.user_id == g.api_user.id else None


@bp.post("/next")
@token_required()
def next_item() -> Any:
    found = assignment.next_assignment(g.api_user)
    if found is None:
        return jsonify(assignment=None, message="nothing left to review"), 200
    audit_log.record(
        Action.ITEM_VIEW, classification_id=found.classification_id, target=assignment_target(found)
    )
    db.session.commit()  # logged before the item is sent
    return jsonify(assignment=_assignment_json(found))


@bp.get("/codebook")
@token_required()
def codebook() -> Any:
    return jsonify(get_codebook().to_dict())


@bp.post("/assignments/<int:assignment_id>/label")
@token_required()
def label(assignment_id: int) -> Any:
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("answer"), dict):
        return jsonify(error='expected a JSON object {"answer": {...}, "time_on_task_ms": n}'), 400
    if _own(assignment_id) is None:
        return jsonify(error="no such assignment of yours"), 404
    try:
        saved = record_label(assignment_id, g.api_user, body["answer"], body.get("time_on_task_ms"))
    except AnswerError as exc:
        return jsonify(error="invalid answer", fields=exc.errors), 422
    except LabelError as exc:
        return jsonify(error=str(exc)), 409
    return jsonify(
        label_id=saved.id, answer=saved.answer, time_on_task_ms=saved.time_on_task_ms
    ), 201


@bp.post("/assignments/<int:assignment_id>/skip")
@token_required()
def skip(assignment_id: int) -> Any:
    found = _own(assignment_id)
    if found is None:
        return jsonify(error="no such assignment of yours"), 404
    try:
        outcome = assignment.skip(found, g.api_user)
    except assignment.AssignmentError as exc:
        db.session.rollback()
        return jsonify(error=str(exc)), 409
    commit_skip(found, outcome)
    # A retried skip is a success: the client wanted the item skipped, and it is.
    return jsonify(status=found.status, already=outcome is assignment.SkipResult.ALREADY_SKIPPED)


@bp.get("/export")
@token_required(role=Role.ADMIN.value)
def export() -> Any:
    try:
        kind = ExportFormat(request.args.get("format", "jsonl"))
    except ValueError:
        return jsonify(error="format must be csv or jsonl"), 400
    return export_response(kind)


@bp.get("/assignments/<int:assignment_id>/audio")
@token_required()
def audio_file(assignment_id: int) -> Any:
    found = _own(assignment_id)
    key = pipeline.opus_key_for(found.classification_id) if found else None
    if found is None or not key:
        return jsonify(error="no audio for this assignment of yours"), 404
    record_play(found)
    return audio.stream_opus(key)
