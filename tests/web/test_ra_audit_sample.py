"""The audit sample: a recorded, reproducible share of unflagged items enters the queue."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask_migrate import upgrade
from sqlalchemy import text

from audio_pipeline.config import ConfigError
from ra_app import assignment
from ra_app.audit_sample import AuditBand, in_audit_sample, parse_audit_bands
from ra_app.config import load_ra_settings
from ra_app.extensions import db
from ra_app.factory import create_app
from tests.support.web import make_app, seed_scored

pytestmark = pytest.mark.integration

# Unflagged scores spread over [0, 0.5) and flagged ones over [0.5, 1).
UNFLAGGED = [round(0.005 * n, 3) for n in range(100)]
FLAGGED = [0.5, 0.75, 0.99]


def _items(app: Flask) -> dict[int, tuple[str, float, float | None]]:
    """classification id -> (entry, sample_probability, threshold) after a full sync."""
    with app.app_context():
        assignment.sync_queue(full=True)
        rows = db.session.execute(
            text("SELECT classification_id, entry, sample_probability, threshold FROM ra_items")
        ).all()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def _seed(db_conn: Any) -> tuple[list[int], list[int]]:
    unflagged = seed_scored(db_conn, UNFLAGGED)
    flagged = seed_scored(db_conn, FLAGGED)
    return unflagged, flagged


def test_a_share_of_unflagged_items_enters_reproducibly(
    ra_env: dict[str, str], db_conn: Any
) -> None:
    unflagged, flagged = _seed(db_conn)
    env = {**ra_env, "RA_AUDIT_SHARE": "0.3", "RA_QUEUE_SEED": "study-a"}
    items = _items(make_app(env))
    # every flagged item, with probability 1
    assert {cid: items[cid][:2] for cid in flagged} == {cid: ("flagged", 1.0) for cid in flagged}
    audit = {cid for cid, (entry, _, _) in items.items() if entry == "audit"}
    # exactly the items the documented rule picks, recomputed here from the seed
    expected = {
        cid
        for cid, score in zip(unflagged, UNFLAGGED, strict=True)
        if in_audit_sample("study-a", cid, score, 0.3)
    }
    assert audit == expected
    assert 10 <= len(audit) <= 50  # about 30 of 100
    assert {items[cid][1] for cid in audit} == {0.3}
    assert {items[cid][2] for cid in audit} == {0.5}  # the threshold travels along

    # the same seed draws the same sample again; another seed another one
    with make_app(env).app_context():
        db.session.execute(text("TRUNCATE ra_items CASCADE"))
        db.session.commit()
    again = _items(make_app(env))
    assert {c for c, v in again.items() if v[0] == "audit"} == audit
    with make_app(env).app_context():
        db.session.execute(text("TRUNCATE ra_items CASCADE"))
        db.session.commit()
    other = _items(make_app({**env, "RA_QUEUE_SEED": "study-b"}))
    assert {c for c, v in other.items() if v[0] == "audit"} != audit


@pytest.mark.parametrize(("share", "entered"), [("1", 100), ("0", 0)])
def test_share_one_takes_every_unflagged_item_and_zero_none(
    ra_env: dict[str, str], db_conn: Any, share: str, entered: int
) -> None:
    _seed(db_conn)
    items = _items(make_app({**ra_env, "RA_AUDIT_SHARE": share}))
    assert sum(1 for e, _, _ in items.values() if e == "audit") == entered
    assert sum(1 for e, _, _ in items.values() if e == "flagged") == len(FLAGGED)


def test_the_default_share_is_five_percent(ra_env: dict[str, str]) -> None:
    assert load_ra_settings(ra_env).audit_share == 0.05


def test_stratified_by_score_band(ra_env: dict[str, str], db_conn: Any) -> None:
    unflagged, _ = _seed(db_conn)
    env = {**ra_env, "RA_AUDIT_SHARE": "0.5", "RA_AUDIT_BANDS": "0.2:0, 0.4:1"}
    items = _items(make_app(env))
    score_of = dict(zip(unflagged, UNFLAGGED, strict=True))
    audit = {cid: items[cid][1] for cid in unflagged if cid in items}
    # below 0.2: none; 0.2 to 0.4: all, with probability 1; from 0.4: the rule at 0.5
    assert all(score_of[c] >= 0.2 for c in audit)
    assert {c for c in unflagged if 0.2 <= score_of[c] < 0.4} <= set(audit)
    assert {p for c, p in audit.items() if score_of[c] < 0.4} == {1.0}
    upper = {c for c in audit if score_of[c] >= 0.4}
    bands = parse_audit_bands("0.2:0, 0.4:1")
    assert upper == {
        c
        for c in unflagged
        if score_of[c] >= 0.4 and in_audit_sample("study", c, score_of[c], 0.5, bands)
    }
    assert {audit[c] for c in upper} == {0.5}


def test_inactive_policy_versions_get_no_audit_items(ra_env: dict[str, str], db_conn: Any) -> None:
    seed_scored(db_conn, [0.1, 0.2], policy="old", active=False)
    items = _items(make_app({**ra_env, "RA_AUDIT_SHARE": "1"}))
    assert items == {}


def test_raising_the_share_keeps_the_sample_nested(ra_env: dict[str, str], db_conn: Any) -> None:
    _seed(db_conn)
    small = _items(make_app({**ra_env, "RA_AUDIT_SHARE": "0.1"}))
    large = _items(make_app({**ra_env, "RA_AUDIT_SHARE": "0.4"}))
    small_audit = {c for c, v in small.items() if v[0] == "audit"}
    large_audit = {c for c, v in large.items() if v[0] == "audit"}
    assert small_audit < large_audit
    # after a full sync every audit item carries the share it would be drawn at now
    assert {large[c][1] for c in large_audit} == {0.4}
    # lowering the share again leaves what was drawn, at the share it was drawn at
    lowered = _items(make_app({**ra_env, "RA_AUDIT_SHARE": "0.1"}))
    assert lowered == large


def test_bad_audit_settings_are_named() -> None:
    with pytest.raises(ConfigError) as err:
        load_ra_settings({"RA_AUDIT_SHARE": "1.5", "RA_AUDIT_BANDS": "0.3:0.1,0.2:0.5"})
    message = str(err.value)
    assert "RA_AUDIT_SHARE" in message
    assert "RA_AUDIT_BANDS" in message
    assert parse_audit_bands("0.1:0.01,0.3:0.05") == (AuditBand(0.1, 0.01), AuditBand(0.3, 0.05))
    for bad in ("0.1", "x:0.1", "0:0.1", "0.1:2"):
        with pytest.raises(ValueError, match="0"):
            parse_audit_bands(bad)


def test_an_existing_deployment_upgrades(ra_env: dict[str, str], db_conn: Any) -> None:
    """A database at the previous revision, with queued items, upgrades in place: its
    items are flagged ones with probability 1, their thresholds filled in."""
    [cid] = seed_scored(db_conn, [0.8], threshold=0.6)
    app = create_app({"ENVIRON": ra_env, "TESTING": True})
    with app.app_context():
        upgrade(revision="0003")
        db.session.execute(
            text("""INSERT INTO ra_items (classification_id, audio_id, batch_id, policy_id,
                        score, shuffle_key, coders_needed, open_slots)
                    SELECT id, audio_id, 'batch-1', policy_id, score, 1, 1, 1
                    FROM classifications""")
        )
        db.session.commit()
        upgrade()
        row = db.session.execute(
            text("SELECT classification_id, entry, sample_probability, threshold FROM ra_items")
        ).one()
        db.engine.dispose()
    assert tuple(row) == (cid, "flagged", 1.0, pytest.approx(0.6))
