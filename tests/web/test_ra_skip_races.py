"""Skip under races: double clicks, Skip against a label, Skip against the expiry sweep.

Each side of a race is its own HTTP request (Flask test clients in threads, each
request on its own pooled PostgreSQL connection), released together by a barrier.
After every round the tables must still add up: a slot is freed at most once, a
skipped assignment has no label, and no request answers 500.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from ra_app import assignment
from ra_app.extensions import db
from ra_app.models import User
from ra_app.security import issue_token
from tests.support.web import add_user, login, make_app, seed_items

pytestmark = pytest.mark.integration

ROUNDS = 6  # per scenario and RA
RAS = ("ann", "bob")
ANSWER = {"violates": "no", "time_on_task_ms": "1000"}


def _race(*sides: Callable[[], Any]) -> list[Any]:
    """Run ``sides`` at once; returns their results, or the exception each raised."""
    barrier = threading.Barrier(len(sides))
    results: list[Any] = [None] * len(sides)

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = sides[i]()
        except BaseException as exc:  # a 500 under TESTING propagates as an exception
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sides))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def _status(result: Any) -> int:
    assert not isinstance(result, BaseException), repr(result)
    return int(result.status_code)


def _check_tables(app: Flask) -> None:
    with app.app_context():
        wrong_slots = db.session.execute(
            text("""
            SELECT i.classification_id, i.coders_needed, i.open_slots, count(a.id) AS held
            FROM ra_items i
            LEFT JOIN ra_assignments a ON a.classification_id = i.classification_id
                 AND a.status IN ('assigned', 'done')
            GROUP BY i.classification_id
            HAVING i.open_slots <> i.coders_needed - count(a.id)
            """)
        ).all()
        labels_off_done = db.session.execute(
            text("""SELECT l.id, a.status FROM ra_labels l
                    JOIN ra_assignments a ON a.id = l.assignment_id WHERE a.status <> 'done'""")
        ).all()
        done_unlabelled = db.session.execute(
            text("""SELECT a.id FROM ra_assignments a
                    LEFT JOIN ra_labels l ON l.assignment_id = a.id
                    WHERE a.status = 'done' AND l.id IS NULL""")
        ).all()
        db.session.remove()
    assert wrong_slots == []
    assert labels_off_done == []
    assert done_unlabelled == []


def _status_of(app: Flask, aid: int) -> tuple[str, int]:
    with app.app_context():
        row = db.session.execute(
            text("""SELECT a.status, count(l.id) FROM ra_assignments a
                    LEFT JOIN ra_labels l ON l.assignment_id = a.id
                    WHERE a.id = :aid GROUP BY a.status"""),
            {"aid": aid},
        ).one()
        db.session.remove()
    return str(row[0]), int(row[1])


def test_skip_races_never_free_a_slot_twice(ra_env: dict[str, str], db_conn: Any) -> None:
    # Half the items double-coded: a second free of such a slot passes the table's
    # CHECK (open_slots <= coders_needed) while the other coder holds one, so only
    # the invariant below can catch it.
    seed_items(db_conn, 5 * ROUNDS * len(RAS) * 2)
    app = make_app({**ra_env, "RA_DOUBLE_CODED_SHARE": "0.5"})
    web: dict[str, tuple[FlaskClient, str, FlaskClient, str]] = {}
    tokens: dict[str, str] = {}
    for name in RAS:
        add_user(app, name)
        one, two = app.test_client(), app.test_client()  # two sessions, like two tabs
        web[name] = (one, login(one, name), two, login(two, name))
        with app.app_context():
            user = db.session.execute(db.select(User).where(User.username == name)).scalar_one()
            tokens[name] = issue_token(user, "race", 1)
            db.session.commit()
    api = app.test_client()

    def claim(name: str) -> int:
        got = api.post("/api/v1/next", headers={"Authorization": f"Bearer {tokens[name]}"})
        assert got.status_code == 200
        return int(got.get_json()["assignment"]["assignment_id"])

    def web_skip(client: FlaskClient, csrf: str, aid: int) -> Callable[[], Any]:
        return lambda: client.post(f"/review/{aid}/skip", data={"csrf_token": csrf})

    def web_label(client: FlaskClient, csrf: str, aid: int) -> Callable[[], Any]:
        return lambda: client.post(f"/review/{aid}/label", data={"csrf_token": csrf, **ANSWER})

    def api_skip(name: str, aid: int) -> Callable[[], Any]:
        auth = {"Authorization": f"Bearer {tokens[name]}"}
        return lambda: app.test_client().post(f"/api/v1/assignments/{aid}/skip", headers=auth)

    def api_label(name: str, aid: int) -> Callable[[], Any]:
        auth = {"Authorization": f"Bearer {tokens[name]}"}
        body = {"answer": {"violates": "yes"}, "time_on_task_ms": 500}
        return lambda: app.test_client().post(
            f"/api/v1/assignments/{aid}/label", headers=auth, json=body
        )

    def sweep() -> int:
        with app.app_context():
            n = assignment.expire_abandoned()
            db.session.remove()
        return n

    outcomes: dict[str, set[tuple[str, int]]] = {}
    for _ in range(ROUNDS):
        for name in RAS:
            one, csrf1, two, csrf2 = web[name]

            aid = claim(name)  # double-clicked Skip in the browser
            results = _race(web_skip(one, csrf1, aid), web_skip(two, csrf2, aid))
            assert all(_status(r) == 302 for r in results)
            assert _status_of(app, aid) == ("skipped", 0)

            aid = claim(name)  # a script retrying its skip
            codes = sorted(_status(r) for r in _race(api_skip(name, aid), api_skip(name, aid)))
            assert codes == [200, 200]
            assert _status_of(app, aid) == ("skipped", 0)

            aid = claim(name)  # Skip in one tab, submit in another
            results = _race(web_skip(one, csrf1, aid), web_label(two, csrf2, aid))
            assert all(_status(r) == 302 for r in results)
            outcomes.setdefault("web skip/label", set()).add(_status_of(app, aid))

            aid = claim(name)  # the same through the API: the loser gets 409, never 500
            codes = sorted(_status(r) for r in _race(api_skip(name, aid), api_label(name, aid)))
            assert codes in ([200, 409], [201, 409])
            outcomes.setdefault("api skip/label", set()).add(_status_of(app, aid))

            aid = claim(name)  # Skip as the expiry sweep takes the same assignment
            with app.app_context():
                db.session.execute(
                    text(
                        "UPDATE ra_assignments SET expires_at = now() - interval '1 s' "
                        "WHERE id = :aid"
                    ),
                    {"aid": aid},
                )
                db.session.commit()
                db.session.remove()
            results = _race(web_skip(one, csrf1, aid), sweep)
            assert _status(results[0]) == 302
            assert not isinstance(results[1], BaseException), repr(results[1])
            # Whichever ran first, the RA said "not for me": it ends skipped, slot freed once.
            assert _status_of(app, aid) == ("skipped", 0)

            _check_tables(app)
    for race, seen in outcomes.items():
        assert seen <= {("skipped", 0), ("done", 1)}, race
