"""The audit log for the review board: every audited action once, with who, when and
from where; append-only for the app's own database role; pruned only past retention;
an admin page that filters it and exports it as CSV.

The app runs behind one trusted proxy (RA_PROXY_HOPS=1): the proxy connects from
PROXY_ADDR and names the client in X-Forwarded-For, as nginx does on the fleet.
"""

from __future__ import annotations

import csv
import getpass
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from devtools import devstack
from ra_app.extensions import db
from ra_app.models import ApiToken, User
from ra_app.security import issue_token
from tests.support.web import add_user, login, make_app, seed_items

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FLASK = [str(Path(sys.executable).parent / "flask"), "--app", "ra_app"]
PROXY_ADDR = "10.0.0.2"
ADMIN_ADDR = "203.0.113.10"
RA_ADDR = "203.0.113.20"
OS_ACTOR = "os:" + getpass.getuser()
NEW_PASSWORD = "another-long-password"


@pytest.fixture
def env(ra_env: dict[str, str]) -> dict[str, str]:
    return {**ra_env, "RA_PROXY_HOPS": "1"}


@pytest.fixture
def proxied(env: dict[str, str]) -> Flask:
    application = make_app(env)
    yield application
    with application.app_context():
        db.engine.dispose()


def _client(app: Flask, address: str) -> FlaskClient:
    """A browser at ``address``, reaching the app through the proxy."""
    client = app.test_client()
    client.environ_base.update(REMOTE_ADDR=PROXY_ADDR, HTTP_X_FORWARDED_FOR=address)
    return client


def _log(app: Flask, *, where: str = "true") -> list[dict[str, Any]]:
    with app.app_context():
        rows = db.session.execute(
            text(f"SELECT * FROM ra_audit_log WHERE {where} ORDER BY id")
        ).mappings()
        return [dict(r) for r in rows]


def _flask(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FLASK, *args],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_audited_action_is_logged_once_with_actor_and_address(
    proxied: Flask, db_conn: Any
) -> None:
    app = proxied
    first, second = seed_items(db_conn, 2, "batch-1", scores=[0.9, 0.8])
    seed_items(db_conn, 1, "batch-2")
    boss_id = add_user(app, "boss", "admin")
    ann_id = add_user(app, "ann")

    ra = _client(app, RA_ADDR)
    token = _csrf_from(ra.get("/login").get_data(as_text=True))
    wrong = ra.post(
        "/login", data={"username": "ann", "password": "wrong-password-1", "csrf_token": token}
    )
    assert wrong.status_code == 401

    admin = _client(app, ADMIN_ADDR)
    atoken = login(admin, "boss")
    made = admin.post(
        "/admin/users",
        data={"csrf_token": atoken, "username": "cat", "password": NEW_PASSWORD, "role": "ra"},
    )
    assert made.status_code == 302
    with app.app_context():
        cat_id = db.session.execute(db.select(User.id).where(User.username == "cat")).scalar_one()
    assigned = admin.post(
        "/admin/assign", data={"csrf_token": atoken, "batch_id": "batch-2", "username": "cat"}
    )
    assert assigned.status_code == 302
    reset = admin.post(
        f"/admin/users/{cat_id}/password",
        data={"csrf_token": atoken, "password": NEW_PASSWORD + "x", "confirm": NEW_PASSWORD + "x"},
    )
    assert reset.status_code == 302
    issued = admin.post(
        f"/admin/users/{cat_id}/tokens", data={"csrf_token": atoken, "name": "s", "days": "7"}
    )
    assert issued.status_code == 200
    with app.app_context():
        token_id = db.session.execute(
            db.select(ApiToken.id).where(ApiToken.user_id == cat_id)
        ).scalar_one()
    revoked = admin.post(
        f"/admin/users/{cat_id}/tokens/{token_id}/revoke", data={"csrf_token": atoken}
    )
    assert revoked.status_code == 302
    off = admin.post(f"/admin/users/{cat_id}/active", data={"csrf_token": atoken, "active": "0"})
    assert off.status_code == 302

    rtoken = login(ra, "ann")
    review = ra.post("/next", data={"csrf_token": rtoken}).headers["Location"]
    assert ra.get(review).status_code == 200
    labelled = ra.post(f"{review}/label", data={"csrf_token": rtoken, "violates": "yes"})
    nxt = labelled.headers["Location"]
    assert nxt.startswith("/review/")
    skipped = ra.post(f"{nxt}/skip", data={"csrf_token": rtoken})
    assert skipped.status_code == 302
    again = ra.post(f"{nxt}/skip", data={"csrf_token": rtoken})  # a double click
    assert again.status_code == 302
    assert ra.post("/logout", data={"csrf_token": rtoken}).status_code == 302

    assert admin.get("/admin/export.csv").status_code == 200
    assert admin.get(f"/admin/items/{first}").status_code == 200
    decided = admin.post(
        f"/admin/items/{first}/adjudicate",
        data={"csrf_token": atoken, "violates": "yes", "adjudication_note": "clear"},
    )
    assert decided.status_code == 302

    got = [
        (r["actor_id"], r["actor_username"], r["action"], r["classification_id"], r["target"])
        for r in _log(app)
    ]
    review_id, next_id = review.rsplit("/", 1)[1], nxt.rsplit("/", 1)[1]
    assert got == [
        (None, "ann", "login.failed", None, None),
        (boss_id, "boss", "login", None, None),
        (boss_id, "boss", "user.create", None, "user:cat"),
        (boss_id, "boss", "batch.assign", None, "batch:batch-2"),
        (boss_id, "boss", "user.password_reset", None, "user:cat"),
        (boss_id, "boss", "token.issue", None, "user:cat"),
        (boss_id, "boss", "token.revoke", None, "user:cat"),
        (boss_id, "boss", "user.deactivate", None, "user:cat"),
        (ann_id, "ann", "login", None, None),
        (ann_id, "ann", "item.view", first, f"assignment:{review_id}"),
        (ann_id, "ann", "label", first, f"assignment:{review_id}"),
        (ann_id, "ann", "skip", second, f"assignment:{next_id}"),  # once, double click or not
        (ann_id, "ann", "logout", None, None),
        (boss_id, "boss", "export", None, "ra_labels"),
        (boss_id, "boss", "item.view", first, None),
        (boss_id, "boss", "adjudication", first, None),
    ]
    rows = _log(app)
    # the client's address from the trusted proxy's header, never the proxy's own
    assert {r["client_addr"] for r in rows if r["actor_username"] == "boss"} == {ADMIN_ADDR}
    assert {r["client_addr"] for r in rows if r["actor_username"] == "ann"} == {RA_ADDR}
    # one session per login, and the failed attempt's session is not ann's login's
    sessions = {r["action"]: r["session_hash"] for r in rows if r["actor_username"] == "ann"}
    assert sessions["login"] == sessions["label"] == sessions["skip"] == sessions["logout"]
    assert sessions["login.failed"] != sessions["login"]
    assert all(r["session_hash"] and len(r["session_hash"]) == 64 for r in rows)
    # no password anywhere in the log
    assert "wrong-password-1" not in json.dumps([str(r) for r in rows])
    assert NEW_PASSWORD not in json.dumps([str(r) for r in rows])


def _csrf_from(html: str) -> str:
    from tests.support.web import CSRF_RE

    match = CSRF_RE.search(html)
    assert match
    return next(g for g in match.groups() if g)


def test_cli_account_actions_name_the_os_user(proxied: Flask, env: dict[str, str]) -> None:
    created = _flask(env, "create-user", "dave", "--role", "ra", "--password", NEW_PASSWORD)
    assert created.returncode == 0, created.stderr
    reset = _flask(env, "reset-password", "dave", "--password", NEW_PASSWORD + "y")
    assert reset.returncode == 0, reset.stderr
    minted = _flask(env, "create-token", "dave", "--name", "job")
    assert minted.returncode == 0, minted.stderr
    revoked = _flask(env, "revoke-token", "dave")
    assert revoked.returncode == 0, revoked.stderr
    off = _flask(env, "deactivate-user", "dave")
    assert off.returncode == 0, off.stderr
    got = [(r["actor_id"], r["actor_username"], r["action"], r["target"]) for r in _log(proxied)]
    assert got == [
        (None, OS_ACTOR, "user.create", "user:dave"),
        (None, OS_ACTOR, "user.password_reset", "user:dave"),
        (None, OS_ACTOR, "token.issue", "user:dave"),
        (None, OS_ACTOR, "token.revoke", "user:dave"),
        (None, OS_ACTOR, "user.deactivate", "user:dave"),
    ]
    assert all(r["client_addr"] is None for r in _log(proxied))


def test_a_range_request_burst_is_one_play_per_session(
    proxied: Flask, db_conn: Any, s3_client: Any, env: dict[str, str]
) -> None:
    app = proxied
    [cid] = seed_items(db_conn, 1)
    key = db_conn.execute("SELECT opus_s3_key FROM audio_files").fetchone()["opus_s3_key"]
    s3_client.put_object(Bucket=env["S3_BUCKET"], Key=key, Body=bytes(range(256)) * 40)
    add_user(app, "ann")
    first = _client(app, RA_ADDR)
    token = login(first, "ann")
    review = first.post("/next", data={"csrf_token": token}).headers["Location"]
    aid = review.rsplit("/", 1)[1]
    # what a browser's player sends: a probe, the start, a seek, the end, a replay
    for byte_range in (None, "bytes=0-", "bytes=0-1", "bytes=4000-", "bytes=9000-10239"):
        headers = {"Range": byte_range} if byte_range else {}
        assert first.get(f"/audio/{aid}", headers=headers).status_code in (200, 206)
    plays = _log(app, where="action = 'audio.play'")
    assert [(r["actor_username"], r["classification_id"]) for r in plays] == [("ann", cid)]
    assert plays[0]["client_addr"] == RA_ADDR

    later = _client(app, "203.0.113.21")  # a new login is a new session: a new play
    login(later, "ann")
    for byte_range in ("bytes=0-", "bytes=100-"):
        assert later.get(f"/audio/{aid}", headers={"Range": byte_range}).status_code == 206
    plays = _log(app, where="action = 'audio.play'")
    assert [r["client_addr"] for r in plays] == [RA_ADDR, "203.0.113.21"]
    assert plays[0]["session_hash"] != plays[1]["session_hash"]

    # the API: one play per token, however many ranges
    with app.app_context():
        user = db.session.execute(db.select(User).where(User.username == "ann")).scalar_one()
        bearer = issue_token(user, "player", 1)
        db.session.commit()
    api = _client(app, "203.0.113.22")
    for byte_range in ("bytes=0-", "bytes=10-20", "bytes=30-"):
        response = api.get(
            f"/api/v1/assignments/{aid}/audio",
            headers={"Authorization": f"Bearer {bearer}", "Range": byte_range},
        )
        assert response.status_code == 206
    assert len(_log(app, where="action = 'audio.play'")) == 3


def test_the_apps_own_connection_cannot_change_or_delete_rows(proxied: Flask, db_conn: Any) -> None:
    app = proxied
    add_user(app, "boss", "admin")
    login(_client(app, ADMIN_ADDR), "boss")
    [row] = _log(app)
    refused = (
        "UPDATE ra_audit_log SET actor_username = 'nobody'",
        "DELETE FROM ra_audit_log",
        "TRUNCATE ra_audit_log",
    )
    with app.app_context():
        assert db.session.execute(text("SELECT current_user")).scalar_one() == "ra_app"
        for statement in refused:  # no privilege, owner or not
            with pytest.raises(DBAPIError, match="permission denied"):
                db.session.execute(text(statement))
            db.session.rollback()
        # the owner grants itself the privileges back: the triggers still refuse
        db.session.execute(text("GRANT UPDATE, DELETE, TRUNCATE ON ra_audit_log TO CURRENT_USER"))
        db.session.commit()
        for statement in refused:
            with pytest.raises(DBAPIError, match="append-only"):
                db.session.execute(text(statement))
            db.session.rollback()
        # nor can a row be back-dated: the database stamps it
        db.session.execute(
            text("""INSERT INTO ra_audit_log (action, actor_username, at)
                    VALUES ('login', 'forger', now() - interval '400 days')""")
        )
        db.session.commit()
    assert _log(app)[0] == row
    forged = _log(app, where="actor_username = 'forger'")[0]
    assert forged["at"] > datetime.now(UTC) - timedelta(minutes=5)


def test_prune_deletes_only_rows_older_than_the_retention(
    proxied: Flask, env: dict[str, str], stack: devstack.Stack
) -> None:
    app = proxied
    add_user(app, "boss", "admin")
    login(_client(app, ADMIN_ADDR), "boss")  # a row of today
    # Old rows as a superuser writes them, the stamping trigger off (replica mode).
    with devstack.admin_connect(stack, env["POSTGRES_DB"]) as conn:
        conn.execute("SET session_replication_role = replica")
        for days in (45, 31, 29):
            conn.execute(
                "INSERT INTO ra_audit_log (action, actor_username, at) "
                "VALUES ('login', %s, now() - make_interval(days => %s))",
                (f"old{days}", days),
            )
    forever = _flask(env, "audit-log", "prune")  # the default retention keeps everything
    assert forever.returncode == 0, forever.stderr
    assert "nothing pruned" in forever.stdout
    assert len(_log(app)) == 4

    pruned = _flask({**env, "RA_AUDIT_RETENTION_DAYS": "30"}, "audit-log", "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert "pruned 2 audit log rows older than 30 days" in pruned.stdout
    left = [(r["actor_username"], r["action"]) for r in _log(app)]
    assert left == [
        ("boss", "login"),
        ("old29", "login"),
        (OS_ACTOR, "audit_log.prune"),
    ]
    prune_row = _log(app)[-1]
    assert prune_row["details"] == {"keep_days": 30, "deleted": 2, "database_role": "ra_app"}
    # --days overrides the setting; the guard is back on after a prune
    narrower = _flask(env, "audit-log", "prune", "--days", "28")
    assert "pruned 1 audit log rows" in narrower.stdout
    with app.app_context(), pytest.raises(DBAPIError, match="permission denied"):
        db.session.execute(text("DELETE FROM ra_audit_log"))
    # nor can the app's role re-grant itself DELETE and get past the trigger
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        conn.execute("GRANT DELETE ON ra_audit_log TO CURRENT_USER")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute("DELETE FROM ra_audit_log")


def test_the_page_filters_and_exports_csv_for_admins_only(proxied: Flask, db_conn: Any) -> None:
    app = proxied
    [cid] = seed_items(db_conn, 1)
    add_user(app, "boss", "admin")
    add_user(app, "ann")
    admin = _client(app, ADMIN_ADDR)
    login(admin, "boss")
    ra = _client(app, RA_ADDR)
    token = login(ra, "ann")
    review = ra.post("/next", data={"csrf_token": token}).headers["Location"]
    assert ra.get(review).status_code == 200  # ann views the item
    stranger = _client(app, "198.51.100.9")
    bad = _csrf_from(stranger.get("/login").get_data(as_text=True))
    stranger.post("/login", data={"username": "mallory", "password": "x" * 12, "csrf_token": bad})

    def shown(query: str) -> list[tuple[str, str]]:
        response = admin.get(f"/admin/audit-log{query}")
        assert response.status_code == 200
        html = response.get_data(as_text=True)
        cells = html.split('<tr class="audit-row">')[1:]
        return [
            (
                c.split('class="actor">')[1].split("<")[0],
                c.split('class="action">')[1].split("<")[0],
            )
            for c in cells
        ]

    assert shown("") == [
        ("mallory", "login.failed"),
        ("ann", "item.view"),
        ("ann", "login"),
        ("boss", "login"),
    ]
    assert shown("?user=ann") == [("ann", "item.view"), ("ann", "login")]
    assert shown("?action=login.failed") == [("mallory", "login.failed")]
    assert shown(f"?item={cid}") == [("ann", "item.view")]
    today = datetime.now(UTC).date()
    assert shown(f"?from={today + timedelta(days=1)}") == []
    assert shown(f"?to={today - timedelta(days=1)}") == []
    assert len(shown(f"?from={today}&to={today}")) == 4
    # paged: one row a page
    app.config["PAGE_SIZE"] = 1
    assert shown("?user=ann&page=2") == [("ann", "login")]
    assert "page=3" not in admin.get("/admin/audit-log?user=ann&page=2").get_data(as_text=True)
    app.config["PAGE_SIZE"] = 50

    exported = admin.get("/admin/audit-log.csv?user=ann")
    assert exported.status_code == 200
    assert exported.headers["Content-Disposition"].endswith('ra_audit_log.csv"')
    rows = list(csv.DictReader(io.StringIO(exported.get_data(as_text=True))))
    assert [(r["actor_username"], r["action"], r["client_addr"]) for r in rows] == [
        ("ann", "item.view", RA_ADDR),
        ("ann", "login", RA_ADDR),
    ]
    # the export is itself audited, with its filters
    [export_row] = _log(app, where="action = 'audit_log.export'")
    assert export_row["actor_username"] == "boss"
    assert export_row["details"]["actor"] == "ann"

    for url in ("/admin/audit-log", "/admin/audit-log.csv"):
        assert ra.get(url).status_code == 403
    assert app.test_client().get("/admin/audit-log").status_code == 302  # to the login


PRUNER_PASSWORD = "dev-ra-audit-pruner"


def test_with_the_fleets_ownership_the_app_role_cannot_even_disable_the_guard(
    proxied: Flask, env: dict[str, str], stack: devstack.Stack
) -> None:
    """audit_log.ownership_sql, as a superuser runs it on the fleet: the table belongs
    to a role nobody logs in as, the app may only read and append, and only the
    pruner role (RA_AUDIT_PRUNE_DATABASE_URL) may prune."""
    app = proxied
    add_user(app, "boss", "admin")
    with devstack.admin_connect(stack, env["POSTGRES_DB"]) as conn:
        # Roles belong to the whole (shared) cluster: made once, by whichever test runs first.
        for role, login_clause in (
            ("ra_audit_owner", "NOLOGIN"),
            ("ra_audit_pruner", f"LOGIN PASSWORD '{PRUNER_PASSWORD}'"),
        ):
            conn.execute(
                f"DO $$ BEGIN CREATE ROLE {role} {login_clause}; "
                "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
            )
        sql = _flask(env, "audit-log", "ownership-sql")  # as the orchestrator role gets it
        assert sql.returncode == 0, sql.stderr
        conn.execute(sql.stdout)
    login(_client(app, ADMIN_ADDR), "boss")  # the app still appends
    assert [r["action"] for r in _log(app)] == ["login"]
    with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
        # Not the owner: PostgreSQL only warns that no privileges were granted.
        conn.execute("GRANT DELETE ON ra_audit_log TO CURRENT_USER")
        for statement in (
            "ALTER TABLE ra_audit_log DISABLE TRIGGER ra_audit_log_append_only",
            "DELETE FROM ra_audit_log",
            "SELECT ra_audit_log_prune(1, 'me')",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    pruner_url = env["DATABASE_URL"].replace(
        "ra_app:dev-ra-app@", f"ra_audit_pruner:{PRUNER_PASSWORD}@"
    )
    assert pruner_url != env["DATABASE_URL"]
    pruned = _flask(
        {**env, "RA_AUDIT_RETENTION_DAYS": "1", "RA_AUDIT_PRUNE_DATABASE_URL": pruner_url},
        "audit-log",
        "prune",
    )
    assert pruned.returncode == 0, pruned.stderr
    assert "pruned 0 audit log rows" in pruned.stdout
    assert _log(app)[-1]["details"]["database_role"] == "ra_audit_pruner"


def test_an_action_whose_audit_row_cannot_be_written_is_refused(
    proxied: Flask, db_conn: Any, env: dict[str, str], stack: devstack.Stack
) -> None:
    """A review board prefers a refused action to an unlogged one: with the log
    unwritable, a label, a skip and an adjudication fail and leave nothing behind."""
    app = proxied
    [cid] = seed_items(db_conn, 1)
    add_user(app, "boss", "admin")
    add_user(app, "ann")
    ra = _client(app, RA_ADDR)
    token = login(ra, "ann")
    review = ra.post("/next", data={"csrf_token": token}).headers["Location"]
    admin = _client(app, ADMIN_ADDR)
    atoken = login(admin, "boss")
    with devstack.admin_connect(stack, env["POSTGRES_DB"]) as conn:
        conn.execute("REVOKE INSERT ON ra_audit_log FROM ra_app")
    with pytest.raises(DBAPIError, match="permission denied"):
        ra.post(f"{review}/label", data={"csrf_token": token, "violates": "yes"})
    with app.app_context():
        slots = db.session.execute(text("SELECT open_slots FROM ra_items")).scalar_one()
    with pytest.raises(DBAPIError, match="permission denied"):
        ra.post(f"{review}/skip", data={"csrf_token": token})
    with pytest.raises(DBAPIError, match="permission denied"):
        admin.post(
            f"/admin/items/{cid}/adjudicate",
            data={"csrf_token": atoken, "violates": "yes", "adjudication_note": "clear"},
        )
    with app.app_context():
        assert db.session.execute(text("SELECT count(*) FROM ra_labels")).scalar_one() == 0
        done = db.session.execute(text("SELECT status FROM ra_assignments")).scalar_one()
        assert done == "assigned"
        assert db.session.execute(text("SELECT open_slots FROM ra_items")).scalar_one() == slots
        assert db.session.execute(text("SELECT count(*) FROM ra_adjudications")).scalar_one() == 0
