"""Alembic environment for the RA app: it owns only the ra_* tables.

The pipeline's tables live in the same database but belong to schema.sql, so
autogenerate is told to ignore everything that is not an RA table (otherwise it
would propose dropping them), and the version table is ra_alembic_version so it
can never clash with another tool's alembic_version.
"""

from __future__ import annotations

import logging
from logging.config import fileConfig
from typing import Any

from alembic import context
from flask import current_app

RA_TABLE_PREFIX = "ra_"
VERSION_TABLE = "ra_alembic_version"

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)
log = logging.getLogger("alembic.env")

target_metadata = current_app.extensions["migrate"].db.metadata


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    if type_ == "table":
        return bool(name) and name.startswith(RA_TABLE_PREFIX)
    table = getattr(obj, "table", None)
    if table is not None:
        return table.name.startswith(RA_TABLE_PREFIX)
    return True


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        include_object=include_object,
        version_table=VERSION_TABLE,
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    url = current_app.extensions["migrate"].db.engine.url.render_as_string(hide_password=False)
    _configure(url=url, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    def process_revision_directives(ctx: Any, revision: Any, directives: list[Any]) -> None:
        if getattr(config.cmd_opts, "autogenerate", False) and directives[0].upgrade_ops.is_empty():
            directives[:] = []
            log.info("No changes in the RA tables.")

    engine = current_app.extensions["migrate"].db.engine
    with engine.connect() as connection:
        _configure(connection=connection, process_revision_directives=process_revision_directives)
        with context.begin_transaction():
            # Two deploys upgrading at once would race on CREATE TABLE.
            connection.exec_driver_sql(
                "SELECT pg_advisory_xact_lock(hashtext('ra_app.migrations'))"
            )
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
