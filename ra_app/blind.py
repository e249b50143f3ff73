"""Blind review: which items an RA judges without the classifier's verdict.

Seeing the score and the highlighted evidence first anchors a judgement, and an
audit item's low score would say "the classifier thinks this is fine". RA_BLIND
decides which items hide them: ``audit`` (the default) the audit sample's items,
``all`` every item, ``none`` none. Under ``all`` an RA cannot tell an audit item
from a flagged one; under ``audit`` a blind page still hints that the item is an
audit item (flagged ones show their score), but not what the classifier said.

Everything an RA reaches goes through review_item, which hands out a blinded copy
(pipeline.ItemDetail.blinded); admins' own pages and the exports read the full item.
"""

from __future__ import annotations

from flask import current_app
from sqlalchemy import text

from ra_app import pipeline
from ra_app.audit_sample import Entry
from ra_app.config import BlindMode
from ra_app.extensions import db


def is_blind(entry: str | None, mode: BlindMode | str) -> bool:
    """Whether an item that entered as ``entry`` is reviewed blind under ``mode``."""
    mode = BlindMode(mode)
    return mode is BlindMode.ALL or (mode is BlindMode.AUDIT and entry == Entry.AUDIT.value)


def item_is_blind(classification_id: int) -> bool:
    entry = db.session.execute(
        text("SELECT entry FROM ra_items WHERE classification_id = :cid"),
        {"cid": classification_id},
    ).scalar_one_or_none()
    return is_blind(entry, current_app.config["RA_BLIND"])


def review_item(classification_id: int) -> pipeline.ItemDetail | None:
    """The item as the reviewing RA may see it: blinded when RA_BLIND says so."""
    item = pipeline.item_detail(classification_id)
    if item is None or not item_is_blind(classification_id):
        return item
    return item.blinded()
