"""The assignment queue: order, double coding, expiry, skip, batch assignment, labels."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from sqlalchemy import text

from ra_app import assignment
from ra_app.extensions import db
from ra_app.models import Assignment, Label
from tests.support.web import (
    add_user,
    claim_all,
    login,
    make_app,
    seed_items,
    seed_scored,
    user_named,
)

pytestmark = pytest.mark.integration


def test_score_order_and_nothing_twice(app: Flask, db_conn: Any) -> None:
    ids = seed_items(db_conn, 4, scores=[0.6, 0.95, 0.7, 0.8])
    add_user(app, "ann")
    assert claim_all(app, "ann") == [ids[1], ids[3], ids[2], ids[0]]


def test_items_flagged_just_after_a_sync_are_offered_at_once(app: Flask, db_conn: Any) -> None:
    """A sync moments ago (another RA's claim, a metrics scrape) found nothing; what the
    pipeline flags right after is on the next "Next item", not SYNC_INTERVAL later."""
    add_user(app, "ann")
    with app.app_context():
        assignment.sync_queue()
        ids = seed_items(db_conn, 1)
        got = assignment.next_assignment(user_named("ann"))
        assert got is not None
        assert got.classification_id == ids[0]


def test_batch_order(ra_env: dict[str, str], db_conn: Any) -> None:
    later = seed_items(db_conn, 2, "b-2", scores=[0.99, 0.98])
    first = seed_items(db_conn, 2, "b-1", scores=[0.6, 0.7])
    app = make_app({**ra_env, "RA_QUEUE_ORDER": "batch"})
    add_user(app, "ann")
    assert claim_all(app, "ann") == first + later


def test_uncertainty_order_serves_the_items_nearest_their_threshold_first(
    ra_env: dict[str, str], db_conn: Any
) -> None:
    # distances to the threshold: 0.03, 0.06, 0.2, 0.4, 0.45 (threshold 0.5), and 0.02
    # for the item whose own threshold is 0.8; unflagged items come in as audit items
    far, near, mid, low, close = seed_scored(db_conn, [0.95, 0.56, 0.7, 0.1, 0.47])
    [own] = seed_scored(db_conn, [0.78], threshold=0.8)
    app = make_app({**ra_env, "RA_QUEUE_ORDER": "uncertainty", "RA_AUDIT_SHARE": "1"})
    add_user(app, "ann")
    assert claim_all(app, "ann") == [own, close, near, mid, low, far]


def test_random_order_is_fixed_by_the_seed(ra_env: dict[str, str], db_conn: Any) -> None:
    ids = seed_items(db_conn, 12)
    orders = []
    for name, seed in (("ann", "s1"), ("bob", "s1"), ("cat", "s2")):
        with make_app({**ra_env, "RA_QUEUE_ORDER": "random", "RA_QUEUE_SEED": seed}).app_context():
            # a new seed needs a re-shuffle; the sync keeps existing keys, so start over
            db.session.execute(text("TRUNCATE ra_items CASCADE"))
            db.session.commit()
        app = make_app({**ra_env, "RA_QUEUE_ORDER": "random", "RA_QUEUE_SEED": seed})
        add_user(app, name)
        orders.append(claim_all(app, name))
    assert sorted(orders[0]) == sorted(ids)
    assert orders[0] == orders[1]
    assert orders[0] != orders[2]
    assert orders[0] != ids


def test_double_coded_share_goes_to_two_different_ras(ra_env: dict[str, str], db_conn: Any) -> None:
    ids = seed_items(db_conn, 40)
    app = make_app({**ra_env, "RA_DOUBLE_CODED_SHARE": "0.5"})
    for name in ("ann", "bob", "cat"):
        add_user(app, name)
    claimed = {name: claim_all(app, name) for name in ("ann", "bob", "cat")}
    with app.app_context():
        needed = dict(
            db.session.execute(text("SELECT classification_id, coders_needed FROM ra_items")).all()
        )
    doubles = {c for c, n in needed.items() if n == 2}
    assert 8 <= len(doubles) <= 32  # about half of 40
    for cid in ids:
        coders = [n for n, got in claimed.items() if cid in got]
        assert len(coders) == needed[cid], (cid, coders)
        assert len(set(coders)) == len(coders)  # never one RA twice


def test_abandoned_assignment_expires_and_returns(app: Flask, db_conn: Any) -> None:
    [cid] = seed_items(db_conn, 1)
    add_user(app, "ann")
    add_user(app, "bob")
    with app.app_context():
        ann, bob = user_named("ann"), user_named("bob")
        first = assignment.next_assignment(ann)
        assert first is not None
        assert first.classification_id == cid
        assert assignment.next_assignment(bob) is None  # the one slot is taken
        db.session.execute(text("UPDATE ra_assignments SET expires_at = now() - interval '1 s'"))
        db.session.commit()
        second = assignment.next_assignment(bob)
        assert second is not None
        assert second.classification_id == cid
        assert db.session.get(Assignment, first.id).status == "expired"


def test_skip_returns_slot_to_others_not_to_skipper(app: Flask, db_conn: Any) -> None:
    seed_items(db_conn, 1)
    add_user(app, "ann")
    add_user(app, "bob")
    with app.app_context():
        ann, bob = user_named("ann"), user_named("bob")
        a = assignment.next_assignment(ann)
        assignment.skip(a, ann)
        db.session.commit()
        assert assignment.next_assignment(ann) is None
        assert assignment.next_assignment(bob) is not None


def test_admin_assigns_a_batch_to_a_named_ra(app: Flask, db_conn: Any) -> None:
    mine = seed_items(db_conn, 3, "b-mine", scores=[0.5, 0.5, 0.5])
    seed_items(db_conn, 2, "b-other", scores=[0.99, 0.99])
    add_user(app, "ann")
    add_user(app, "bob")
    add_user(app, "boss", "admin")
    admin = app.test_client()
    token = login(admin, "boss")
    response = admin.post(
        "/admin/assign", data={"csrf_token": token, "batch_id": "b-mine", "username": "ann"}
    )
    assert response.status_code == 302
    with app.app_context():
        rows = db.session.execute(db.select(Assignment)).scalars().all()
        assert sorted(r.classification_id for r in rows) == mine
        assert {r.source for r in rows} == {"admin"}
        assert all(r.expires_at is None for r in rows)
    # ann gets her batch before the higher-scored items; bob never sees it
    assert claim_all(app, "ann")[:3] == mine
    assert set(claim_all(app, "bob")).isdisjoint(mine)


def test_label_through_the_form(app: Flask, db_conn: Any) -> None:
    seed_items(db_conn, 2)
    add_user(app, "ann")
    client = app.test_client()
    token = login(client, "ann")
    url = client.post("/next", data={"csrf_token": token}).headers["Location"]
    aid = int(url.rsplit("/", 1)[1])
    page = client.get(url).get_data(as_text=True)
    assert "You people are vermin." in page
    assert 'class="segment evidence"' in page
    assert "hate v1" in page
    assert "0.90" in page

    bad = client.post(
        f"{url}/label", data={"csrf_token": token, "violates": "maybe", "time_on_task_ms": "1000"}
    )
    assert bad.status_code == 400
    assert "is not one of" in bad.get_data(as_text=True)
    with app.app_context():
        assert db.session.execute(db.select(Label)).first() is None

    data = {
        "csrf_token": token,
        "violates": "yes",
        "severity": "high",
        "categories": ["harassment", "hate_speech"],
        "notes": " slur at 0:03 ",
        "time_on_task_ms": "4200",
    }
    ok = client.post(f"{url}/label", data=data)
    assert ok.status_code == 302
    assert "/review/" in ok.headers["Location"]
    with app.app_context():
        label = db.session.execute(db.select(Label)).scalar_one()
        assert label.assignment_id == aid
        assert label.answer == {
            "violates": "yes",
            "severity": "high",
            "categories": ["hate_speech", "harassment"],
            "notes": "slur at 0:03",
        }
        assert 0 <= label.time_on_task_ms <= 4200
        assert label.codebook_version == "1"
        assert db.session.get(Assignment, aid).status == "done"
    again = client.post(f"{url}/label", data=data)  # a double submit changes nothing
    assert again.status_code == 302
    assert again.headers["Location"] == "/"
    with app.app_context():
        assert db.session.execute(text("SELECT count(*) FROM ra_labels")).scalar_one() == 1


def test_pipeline_tables_stay_read_only_for_the_app(app: Flask) -> None:
    with app.app_context(), pytest.raises(Exception, match="permission denied"):
        db.session.execute(text("UPDATE classifications SET score = 0"))
