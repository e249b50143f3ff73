"""Many RAs pressing "Next item" at once never share a slot."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import text

from ra_app import assignment
from ra_app.extensions import db
from ra_app.models import User
from tests.support.web import add_user, make_app, seed_items

pytestmark = pytest.mark.integration

CLAIMERS = 12  # threads, each its own RA and database connection
ITEMS = 120


def _run_claimers(app: Any, names: list[str]) -> dict[str, list[int]]:
    barrier = threading.Barrier(len(names))
    claimed: dict[str, list[int]] = {n: [] for n in names}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            with app.app_context():
                user = db.session.execute(db.select(User).where(User.username == name)).scalar_one()
                barrier.wait()
                while (a := assignment.next_assignment(user)) is not None:
                    claimed[name].append(a.classification_id)
                    a.status = "done"  # finish it so the next call claims a new one
                    db.session.commit()
                db.session.remove()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return claimed


def test_parallel_claims_hand_out_each_item_once(ra_env: dict[str, str], db_conn: Any) -> None:
    ids = seed_items(db_conn, ITEMS)
    app = make_app(ra_env, SQLALCHEMY_ENGINE_OPTIONS={"pool_size": CLAIMERS})
    names = [f"ra{i:02d}" for i in range(CLAIMERS)]
    for n in names:
        add_user(app, n)
    claimed = _run_claimers(app, names)
    every = [cid for got in claimed.values() for cid in got]
    duplicates = [cid for cid, k in Counter(every).items() if k > 1]
    assert duplicates == []
    assert sorted(every) == sorted(ids)
    assert sum(1 for got in claimed.values() if got) > 1  # the work really was shared


def test_parallel_double_coding_uses_two_different_ras(
    ra_env: dict[str, str], db_conn: Any
) -> None:
    seed_items(db_conn, 60)
    app = make_app(
        {**ra_env, "RA_DOUBLE_CODED_SHARE": "0.5"},
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": CLAIMERS},
    )
    names = [f"ra{i:02d}" for i in range(CLAIMERS)]
    for n in names:
        add_user(app, n)
    claimed = _run_claimers(app, names)
    with app.app_context():
        needed = dict(
            db.session.execute(text("SELECT classification_id, coders_needed FROM ra_items")).all()
        )
        left = db.session.execute(text("SELECT sum(open_slots) FROM ra_items")).scalar_one()
    assert left == 0
    holders: dict[int, list[str]] = {}
    for name, got in claimed.items():
        assert len(got) == len(set(got)), name  # no RA got one item twice
        for cid in got:
            holders.setdefault(cid, []).append(name)
    assert {cid: len(h) for cid, h in holders.items()} == needed
    assert any(n == 2 for n in needed.values())
