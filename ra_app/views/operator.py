"""The operator's page: queues, workers, dead letters and batches in flight (admin only)."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("operator", __name__, url_prefix="/admin/operator")
