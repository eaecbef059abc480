"""Database engine, sessions and the schema check.

Alembic owns the schema. On start the server compares the database's revision with the
newest migration shipped in this package:

- an empty database is brought to the newest revision (first start);
- a database at an older revision is refused with the exact upgrade command, unless the
  operator asked for ``--upgrade-db`` (back the database up first);
- a database *newer* than this code is refused (downgrading the code is not supported).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

log = logging.getLogger("nsml_server.db")


class SchemaError(RuntimeError):
    """The database schema does not match this version of the code."""


def upgrade_command(db_url: str) -> str:
    """The command an operator runs to upgrade *db_url* (password hidden)."""
    return f"nsml-server upgrade-db --db-url '{redact_url(db_url)}'"


def redact_url(db_url: str) -> str:
    """*db_url* with any password replaced by ``***``, for logs and messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(db_url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable database URL>"


def make_engine(db_url: str, **kwargs: Any) -> Engine:
    """Create an engine; SQLite gets WAL, foreign keys and a busy timeout."""
    if db_url.startswith("sqlite"):
        kwargs.setdefault("connect_args", {"timeout": 30, "check_same_thread": False})
    elif "poolclass" not in kwargs:
        # No pre-ping: it costs a round trip per transaction. Connections are recycled
        # instead, and a request that meets a dropped connection fails once and is retried
        # by its client.
        kwargs.setdefault("pool_recycle", 1800)
        kwargs.setdefault("pool_size", 10)
    engine = create_engine(db_url, **kwargs)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    return engine


def alembic_config(db_url: str) -> Config:
    """An Alembic config pointing at the migrations shipped in this package."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest migration revision shipped with this code."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None, "no migrations found"
    return head


def current_revision(engine: Engine) -> str | None:
    """The database's revision, or None for a database without Alembic's table."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(db_url: str, revision: str = "head") -> None:
    """Run the migrations up to *revision* on *db_url*."""
    log.info("Upgrading database %s to %s", redact_url(db_url), revision)
    command.upgrade(alembic_config(db_url), revision)


def check_schema(engine: Engine, db_url: str, *, auto_upgrade: bool = False) -> str:
    """Make sure the schema is the one this code expects; return the revision.

    Raises :class:`SchemaError` with the upgrade command when the database is behind.
    """
    head = head_revision()
    current = current_revision(engine)
    if current == head:
        return head
    if current is None:
        tables = set(inspect(engine).get_table_names())
        if tables:
            raise SchemaError(
                f"The database {redact_url(db_url)} has tables ({', '.join(sorted(tables))}) "
                "but no NSML schema revision. Point --db-url at an empty database or at an "
                "NSML database."
            )
        upgrade(db_url)
        return head
    script = ScriptDirectory.from_config(alembic_config(db_url))
    known = {rev.revision for rev in script.walk_revisions()}
    if current not in known:
        raise SchemaError(
            f"The database {redact_url(db_url)} is at revision {current}, which this version "
            f"of jupyter-nsml does not know (newest known: {head}). Run a newer jupyter-nsml, "
            "or restore a backup taken before the upgrade."
        )
    if auto_upgrade:
        upgrade(db_url)
        return head
    raise SchemaError(
        f"The database {redact_url(db_url)} is at revision {current}; this version needs "
        f"{head}. Back it up, then run:\n    {upgrade_command(db_url)}\n"
        "(or start the server with --upgrade-db)."
    )


class Database:
    """Engine plus session factory. One short session per request; never across an await."""

    def __init__(self, db_url: str, **engine_kwargs: Any) -> None:
        self.url = db_url
        self.engine = make_engine(db_url, **engine_kwargs)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed when the block ends, rolled back when it raises."""
        with self._sessions() as s, s.begin():
            yield s

    def dispose(self) -> None:
        self.engine.dispose()
