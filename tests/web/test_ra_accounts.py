"""Account hygiene: password resets end sessions, revoked tokens fail at once,
deactivation from the user's page; each from the admin page and the CLI."""

from __future__ import annotations

import pytest
from flask import Flask
from flask.testing import FlaskClient

from ra_app.extensions import db
from ra_app.models import ApiToken, User
from ra_app.security import issue_token
from tests.support.web import PASSWORD, add_user, csrf_token, login

pytestmark = pytest.mark.integration

NEW_PASSWORD = "a-brand-new-passphrase"


def _token(app: Flask, name: str, token_name: str = "script") -> str:  # noqa: S107
    with app.app_context():
        user = db.session.execute(db.select(User).where(User.username == name)).scalar_one()
        token = issue_token(user, token_name, 30)
        db.session.commit()
    return token


def _user_with_token(app: Flask, name: str) -> tuple[int, str]:
    """A new RA holding an API token: (user id, token)."""
    return add_user(app, name), _token(app, name)


def _next(client: FlaskClient, token: str) -> int:
    return client.post("/api/v1/next", headers={"Authorization": f"Bearer {token}"}).status_code


def _login_status(app: Flask, name: str, password: str) -> int:
    client = app.test_client()
    data = {"username": name, "password": password, "csrf_token": csrf_token(client, "/login")}
    return client.post("/login", data=data).status_code


def test_admin_resets_a_password_and_every_session_of_the_user_ends(
    app: Flask, admin_client: tuple[FlaskClient, str]
) -> None:
    admin, csrf = admin_client
    uid = add_user(app, "ann")
    laptop, phone = app.test_client(), app.test_client()
    login(laptop, "ann")
    login(phone, "ann")
    page = admin.get(f"/admin/users/{uid}").get_data(as_text=True)
    assert "Reset password" in page
    url = f"/admin/users/{uid}/password"

    assert (
        admin.post(url, data={"password": NEW_PASSWORD, "confirm": NEW_PASSWORD}).status_code == 400
    )
    differ = admin.post(
        url,
        data={"csrf_token": csrf, "password": NEW_PASSWORD, "confirm": NEW_PASSWORD + "x"},
        follow_redirects=True,
    )
    assert "The passwords differ." in differ.get_data(as_text=True)
    short = admin.post(
        url,
        data={"csrf_token": csrf, "password": "short", "confirm": "short"},
        follow_redirects=True,
    )
    assert "must be 10 to 1024 characters" in short.get_data(as_text=True)
    assert laptop.get("/").status_code == 200  # nothing changed yet

    done = admin.post(
        url,
        data={"csrf_token": csrf, "password": NEW_PASSWORD, "confirm": NEW_PASSWORD},
        follow_redirects=True,
    )
    assert done.status_code == 200
    assert "open sessions are ended" in done.get_data(as_text=True)
    for client in (laptop, phone):
        response = client.get("/")
        assert response.status_code == 302
        assert response.headers["Location"].startswith("/login")
    assert _login_status(app, "ann", PASSWORD) == 401
    assert _login_status(app, "ann", NEW_PASSWORD) == 302
    assert admin.get("/admin/users").status_code == 200  # the admin's own session is untouched


def test_an_ra_cannot_reset_passwords_or_revoke_tokens(
    app: Flask, ra_client: tuple[FlaskClient, str]
) -> None:
    client, csrf = ra_client
    bob, token = _user_with_token(app, "bob")
    data = {"csrf_token": csrf, "password": NEW_PASSWORD, "confirm": NEW_PASSWORD}
    assert client.post(f"/admin/users/{bob}/password", data=data).status_code == 403
    assert client.post(f"/admin/users/{bob}/tokens/revoke", data=data).status_code == 403
    assert _login_status(app, "bob", PASSWORD) == 302
    assert _next(app.test_client(), token) == 200


def test_an_admin_resetting_their_own_password_stays_logged_in_here_only(app: Flask) -> None:
    uid = add_user(app, "boss", "admin")
    here, elsewhere = app.test_client(), app.test_client()
    csrf = login(here, "boss")
    login(elsewhere, "boss")
    here.post(
        f"/admin/users/{uid}/password",
        data={"csrf_token": csrf, "password": NEW_PASSWORD, "confirm": NEW_PASSWORD},
    )
    assert here.get("/admin/users").status_code == 200
    assert elsewhere.get("/admin/users").status_code == 302


def test_a_session_without_a_version_is_refused(app: Flask) -> None:
    """A cookie from before session versions existed holds only the user id."""
    uid = add_user(app, "ann")
    client = app.test_client()
    login(client, "ann")
    with client.session_transaction() as session:
        assert session["_user_id"] == f"{uid}:1"
        session["_user_id"] = str(uid)
    assert client.get("/").status_code == 302


def test_reset_password_cli(app: Flask) -> None:
    add_user(app, "ann")
    open_session = app.test_client()
    login(open_session, "ann")
    runner = app.test_cli_runner()
    by_env = runner.invoke(args=["reset-password", "ann"], env={"RA_NEW_PASSWORD": NEW_PASSWORD})
    assert by_env.exit_code == 0, by_env.output
    assert open_session.get("/").status_code == 302
    assert _login_status(app, "ann", NEW_PASSWORD) == 302

    prompted = runner.invoke(args=["reset-password", "ANN"], input="third-password!\n" * 2)
    assert prompted.exit_code == 0, prompted.output
    assert "third-password!" not in prompted.output  # hidden input
    assert _login_status(app, "ann", "third-password!") == 302
    assert _login_status(app, "ann", NEW_PASSWORD) == 401

    short = runner.invoke(args=["reset-password", "ann", "--password", "short"])
    assert short.exit_code != 0
    assert "at least" in short.output
    nobody = runner.invoke(args=["reset-password", "zed", "--password", NEW_PASSWORD])
    assert nobody.exit_code != 0
    assert "no user" in nobody.output
    assert _login_status(app, "ann", "third-password!") == 302


def test_admin_revokes_tokens_and_they_fail_on_the_next_request(
    app: Flask, admin_client: tuple[FlaskClient, str]
) -> None:
    admin, csrf = admin_client
    ann, bob = add_user(app, "ann"), add_user(app, "bob")
    first, second = _token(app, "ann", "laptop"), _token(app, "ann", "cron")
    bobs = _token(app, "bob")
    api = app.test_client()
    assert [_next(api, t) for t in (first, second, bobs)] == [200, 200, 200]
    with app.app_context():
        tid = db.session.execute(
            db.select(ApiToken.id).where(ApiToken.name == "laptop")
        ).scalar_one()
        bobs_id = db.session.execute(
            db.select(ApiToken.id).where(ApiToken.user_id == bob)
        ).scalar_one()
    page = admin.get(f"/admin/users/{ann}").get_data(as_text=True)
    assert "<td>laptop</td>" in page
    assert "<td>cron</td>" in page

    # another user's token through this user's page: not found, nothing revoked
    assert (
        admin.post(
            f"/admin/users/{ann}/tokens/{bobs_id}/revoke", data={"csrf_token": csrf}
        ).status_code
        == 404
    )
    assert admin.post(f"/admin/users/{ann}/tokens/{tid}/revoke").status_code == 400  # no CSRF
    assert _next(api, first) == 200

    assert (
        admin.post(f"/admin/users/{ann}/tokens/{tid}/revoke", data={"csrf_token": csrf}).status_code
        == 302
    )
    assert _next(api, first) == 401  # at once, no cache
    assert _next(api, second) == 200
    assert "<td>laptop</td>" not in admin.get(f"/admin/users/{ann}").get_data(as_text=True)

    assert (
        admin.post(f"/admin/users/{ann}/tokens/revoke", data={"csrf_token": csrf}).status_code
        == 302
    )
    assert _next(api, second) == 401
    assert _next(api, bobs) == 200
    with app.app_context():
        revoked = (
            db.session.execute(db.select(ApiToken.name).where(ApiToken.revoked_at.is_not(None)))
            .scalars()
            .all()
        )
    assert sorted(revoked) == ["cron", "laptop"]


def test_revoke_and_list_tokens_cli(app: Flask) -> None:
    add_user(app, "ann")
    laptop, cron, cron2 = (_token(app, "ann", n) for n in ("laptop", "cron", "cron"))
    api = app.test_client()
    runner = app.test_cli_runner()
    listed = runner.invoke(args=["list-tokens", "ann"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert [line.split("\t")[1] for line in lines] == ["laptop", "cron", "cron"]
    laptop_id = lines[0].split("\t")[0]

    by_id = runner.invoke(args=["revoke-token", "ann", "--id", laptop_id])
    assert by_id.exit_code == 0, by_id.output
    assert "revoked 1 token of 'ann'" in by_id.output
    assert [_next(api, t) for t in (laptop, cron, cron2)] == [401, 200, 200]

    again = runner.invoke(args=["revoke-token", "ann", "--id", laptop_id])
    assert again.exit_code != 0
    assert "no unrevoked token" in again.output

    by_name = runner.invoke(args=["revoke-token", "ann", "--name", "cron"])
    assert by_name.exit_code == 0, by_name.output
    assert "revoked 2 tokens" in by_name.output
    assert [_next(api, t) for t in (cron, cron2)] == [401, 401]
    assert runner.invoke(args=["list-tokens", "ann"]).output == ""

    fresh = _token(app, "ann")
    everything = runner.invoke(args=["revoke-token", "ann"])
    assert everything.exit_code == 0, everything.output
    assert _next(api, fresh) == 401


def test_admin_deactivates_from_the_users_page_and_tokens_stop(
    app: Flask, admin_client: tuple[FlaskClient, str]
) -> None:
    admin, csrf = admin_client
    uid, token = _user_with_token(app, "ann")
    session = app.test_client()
    login(session, "ann")
    response = admin.post(
        f"/admin/users/{uid}/active", data={"csrf_token": csrf, "active": "0", "back": "user"}
    )
    assert response.headers["Location"] == f"/admin/users/{uid}"
    assert "deactivated" in admin.get(f"/admin/users/{uid}").get_data(as_text=True)
    assert session.get("/").status_code == 302
    assert _next(app.test_client(), token) == 401
    assert _login_status(app, "ann", PASSWORD) == 401
