"""Fixtures for the RA app: the real app on the test's own PostgreSQL database.

``pipeline_env`` (tests/support/stack.py) gives a fresh database holding the pipeline
schema and a DATABASE_URL for the ra_app role; pipeline rows are seeded through
the pipeline-role ``db_conn``, as the pipeline itself would write them. The helpers
these fixtures use, which tests import too, are tests/support/web.py's.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from ra_app.extensions import db
from ra_app.models import Role
from tests.support.web import add_user, login, make_app


@pytest.fixture
def ra_env(pipeline_env: dict[str, str]) -> dict[str, str]:
    return {**pipeline_env, "SECRET_KEY": "test-secret", "RA_DOUBLE_CODED_SHARE": "0"}


@pytest.fixture
def app(ra_env: dict[str, str]) -> Iterator[Flask]:
    application = make_app(ra_env)
    yield application
    with application.app_context():
        db.engine.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def admin_client(app: Flask) -> tuple[FlaskClient, str]:
    add_user(app, "boss", Role.ADMIN.value)
    c = app.test_client()
    return c, login(c, "boss")


@pytest.fixture
def ra_client(app: Flask) -> tuple[FlaskClient, str]:
    add_user(app, "ann")
    c = app.test_client()
    return c, login(c, "ann")
