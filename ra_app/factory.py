"""The app factory: settings, extensions, blueprints, CLI, /healthz.

The app writes only its own ra_* tables; the pipeline's tables are read, never
written (the ra_app database role could not anyway).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Flask, jsonify, render_template, request
from sqlalchemy import text
from werkzeug.middleware.proxy_fix import ProxyFix

from ra_app.config import load_ra_settings
from ra_app.extensions import csrf, db, limiter, login_manager, migrate

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
HEALTH_DB_TIMEOUT = 2000  # milliseconds the health check waits for the database


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the app from the environment; ``test_config`` overrides any key.

    A test_config may hold ``ENVIRON`` (a mapping read instead of os.environ).
    """
    test_config = dict(test_config or {})
    environ = test_config.pop("ENVIRON", None)
    app = Flask(__name__)
    settings = load_ra_settings(environ)
    app.config.update(settings.flask_config())
    app.config.update(test_config)
    if settings.proxy_hops:
        # Exactly the configured number of proxies is trusted, so the login limit
        # and the logs see the client's address, and a client cannot forge it by
        # sending its own X-Forwarded-For.
        hops = settings.proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)  # type: ignore[method-assign]

    db.init_app(app)
    migrate.init_app(app, db, directory=str(MIGRATIONS_DIR))
    csrf.init_app(app)
    limiter.init_app(app)
    login_manager.init_app(app)
    login_manager.login_view = "auth.login"
    login_manager.session_protection = "strong"

    from ra_app import cli, codebook_support, metrics, models
    from ra_app.views import admin, api, auth, operator, queue, review

    @login_manager.user_loader
    def load_user(session_id: str) -> models.User | None:
        # A deactivated user's open sessions, and every session from before a password
        # reset (older session_version), stop working on their next request. A bare
        # id (a session from before versions existed) is refused too: one more login.
        user_id, _, version = session_id.partition(":")
        if not (user_id.isdigit() and version.isdigit()):
            return None
        user = db.session.get(models.User, int(user_id))
        if user is None or not user.active or user.session_version != int(version):
            return None
        return user

    codebook_support.init_app(app)
    for module in (auth, queue, review, admin, operator, api):
        app.register_blueprint(module.bp)
    csrf.exempt(api.bp)  # bearer tokens only; session cookies are ignored there
    cli.init_app(app)
    # Its timer wraps the whole WSGI app, ProxyFix (above) included.
    metrics.init_app(app)

    @app.get("/healthz")
    def healthz() -> Any:
        try:
            db.session.execute(text(f"SET LOCAL statement_timeout = {HEALTH_DB_TIMEOUT}"))
            db.session.execute(text("SELECT 1"))
            db.session.rollback()
        except Exception as exc:  # any failure means "not healthy", with the reason
            db.session.rollback()
            body = {"status": "error", "database": "unreachable", "error": type(exc).__name__}
            return jsonify(body), 503
        return jsonify(status="ok", database="ok")

    @app.after_request
    def security_headers(response: Any) -> Any:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; media-src 'self' blob:; object-src 'none'; "
            "frame-ancestors 'none'; base-uri 'self'; form-action 'self'",
        )
        if request.path != "/healthz" and not request.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    for code, title in ((403, "Forbidden"), (404, "Not found"), (429, "Too many attempts")):
        app.register_error_handler(
            code,
            lambda e, code=code, title=title: (
                render_template("error.html", code=code, title=title, message=e.description),
                code,
            ),
        )
    return app
