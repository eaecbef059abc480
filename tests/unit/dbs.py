"""The databases that unit tests run on: SQLite, and PostgreSQL where a server runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from nsml_server.db import Database, check_schema
from nsml_server.models import Base

BOTH = ["sqlite", pytest.param("postgresql", marks=pytest.mark.db)]
"""Parameters of a ``db`` fixture that runs its tests on each (``request.param``)."""


def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """A database of kind ``request.param`` at the newest schema with no rows.

    SQLite is a new file under *tmp_path*; PostgreSQL is the test session's server
    (``postgres_url``), whose tables are dropped and made again for every test.
    """
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'nsml.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_url")
    database = Database(url)
    with database.engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
        Base.metadata.drop_all(conn)
    check_schema(database.engine, url)
    return database
