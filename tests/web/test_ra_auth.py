"""Accounts, sessions, CSRF, rate limit and per-route access for every role."""

from __future__ import annotations

import pytest
from flask import Flask
from flask.testing import FlaskClient

from ra_app.extensions import db
from ra_app.models import User
from tests.support.web import PASSWORD, add_user, csrf_token, login, seed_items

pytestmark = pytest.mark.integration

# Every page route with a sample argument; the API is covered in test_ra_api.py.
GET_ROUTES = [
    "/",
    "/review/1",
    "/audio/1",
    "/admin/",
    "/admin/batches",
    "/admin/agreement",
    "/admin/disagreements",
    "/admin/items/1",
    "/admin/users",
    "/admin/users/1",
    "/admin/export.csv",
    "/admin/export.jsonl",
]
POST_ROUTES = [
    "/next",
    "/logout",
    "/review/1/label",
    "/review/1/skip",
    "/admin/assign",
    "/admin/sync",
    "/admin/users",
    "/admin/users/1/active",
    "/admin/users/1/tokens",
    "/admin/users/1/password",
    "/admin/users/1/tokens/1/revoke",
    "/admin/users/1/tokens/revoke",
]
ADMIN_GET = [r for r in GET_ROUTES if r.startswith("/admin")]
ADMIN_POST = [r for r in POST_ROUTES if r.startswith("/admin")]


def test_login_page_is_public_and_other_pages_redirect(client: FlaskClient) -> None:
    assert client.get("/login").status_code == 200
    for url in GET_ROUTES:
        response = client.get(url)
        assert response.status_code == 302, url
        assert response.headers["Location"].startswith("/login"), url


def test_anonymous_posts_are_refused(app: Flask) -> None:
    app.config["WTF_CSRF_ENABLED"] = False  # show that the login check alone refuses
    client = app.test_client()
    for url in POST_ROUTES:
        response = client.post(url)
        assert response.status_code == 302, url
        assert "/login" in response.headers["Location"], url


def test_login_logout_and_wrong_password(app: Flask, client: FlaskClient) -> None:
    add_user(app, "ann")
    token = csrf_token(client, "/login")
    bad = client.post(
        "/login", data={"username": "ann", "password": "nope-nope-nope", "csrf_token": token}
    )
    assert bad.status_code == 401
    assert "Wrong username or password" in bad.get_data(as_text=True)
    unknown = client.post(
        "/login", data={"username": "zed", "password": PASSWORD, "csrf_token": token}
    )
    assert unknown.status_code == 401
    session_token = login(client, "ANN")  # usernames are case-insensitive
    assert client.get("/").status_code == 200
    assert client.post("/logout", data={"csrf_token": session_token}).status_code == 302
    assert client.get("/").status_code == 302


def test_password_is_stored_as_argon2id(app: Flask) -> None:
    add_user(app, "ann")
    with app.app_context():
        stored = db.session.execute(db.select(User.password_hash)).scalar_one()
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored


def test_post_without_csrf_token_is_rejected(app: Flask, client: FlaskClient) -> None:
    add_user(app, "ann")
    response = client.post("/login", data={"username": "ann", "password": PASSWORD})
    assert response.status_code == 400
    assert client.get("/").status_code == 302  # not logged in
    login(client, "ann")
    assert client.post("/next").status_code == 400
    assert client.post("/logout").status_code == 400


def test_login_is_rate_limited(app: Flask, client: FlaskClient) -> None:
    add_user(app, "ann")
    token = csrf_token(client, "/login")
    codes = [
        client.post(
            "/login", data={"username": "ann", "password": "wrong-password!", "csrf_token": token}
        ).status_code
        for _ in range(12)
    ]
    assert codes[:10] == [401] * 10
    assert codes[10:] == [429, 429]
    # Even the right password is refused while limited: no brute-force oracle.
    right = client.post(
        "/login", data={"username": "ann", "password": PASSWORD, "csrf_token": token}
    )
    assert right.status_code == 429


def test_deactivated_user_cannot_log_in_and_loses_session(app: Flask) -> None:
    uid = add_user(app, "ann")
    client = app.test_client()
    login(client, "ann")
    with app.app_context():
        db.session.get(User, uid).active = False
        db.session.commit()
    assert client.get("/").status_code == 302  # the open session stopped working
    token = csrf_token(client, "/login")
    response = client.post(
        "/login", data={"username": "ann", "password": PASSWORD, "csrf_token": token}
    )
    assert response.status_code == 401


def test_ra_gets_403_on_every_admin_route(app: Flask, ra_client: tuple[FlaskClient, str]) -> None:
    client, token = ra_client
    for url in ADMIN_GET:
        assert client.get(url).status_code == 403, url
    for url in ADMIN_POST:
        assert client.post(url, data={"csrf_token": token}).status_code == 403, url


def test_admin_reaches_every_admin_page(admin_client: tuple[FlaskClient, str], db_conn) -> None:
    client, _ = admin_client
    [cid] = seed_items(db_conn, 1)
    for url in ADMIN_GET:
        url = url.replace("/items/1", f"/items/{cid}")
        assert client.get(url).status_code == 200, url


def test_ra_never_sees_another_ras_assignment(app: Flask, db_conn) -> None:
    seed_items(db_conn, 2)
    add_user(app, "ann")
    add_user(app, "bob")
    ann, bob = app.test_client(), app.test_client()
    ann_token, bob_token = login(ann, "ann"), login(bob, "bob")
    first = ann.post("/next", data={"csrf_token": ann_token})
    ann_url = first.headers["Location"]
    assert ann.get(ann_url).status_code == 200
    aid = ann_url.rsplit("/", 1)[1]
    assert bob.get(ann_url).status_code == 404
    assert bob.get(f"/audio/{aid}").status_code == 404
    data = {"csrf_token": bob_token, "violates": "no"}
    assert bob.post(f"/review/{aid}/label", data=data).status_code == 404
    assert bob.post(f"/review/{aid}/skip", data={"csrf_token": bob_token}).status_code == 404
    # ann's label list is hers alone
    ann.post(f"/review/{aid}/label", data={"csrf_token": ann_token, "violates": "yes"})
    assert f"/review/{aid}" in ann.get("/").get_data(as_text=True)
    assert f"/review/{aid}" not in bob.get("/").get_data(as_text=True)


def test_session_cookie_is_hardened(app: Flask, client: FlaskClient) -> None:
    add_user(app, "ann")
    token = csrf_token(client, "/login")
    response = client.post(
        "/login", data={"username": "ann", "password": PASSWORD, "csrf_token": token}
    )
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert app.config["PERMANENT_SESSION_LIFETIME"] > 0


def test_create_user_cli(app: Flask) -> None:
    runner = app.test_cli_runner()
    result = runner.invoke(args=["create-user", "Root", "--role", "admin", "--password", PASSWORD])
    assert result.exit_code == 0, result.output
    again = runner.invoke(args=["create-user", "root", "--password", PASSWORD])
    assert again.exit_code != 0
    assert "already exists" in again.output
    short = runner.invoke(args=["create-user", "carl", "--password", "short"])
    assert short.exit_code != 0
    assert "at least" in short.output
    with app.app_context():
        user = db.session.execute(db.select(User).where(User.username == "root")).scalar_one()
        assert user.role == "admin"
