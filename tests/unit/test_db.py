"""The schema is Alembic's: empty databases are created, old ones refused with the command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from nsml_server.db import (
    Database,
    SchemaError,
    check_schema,
    current_revision,
    head_revision,
    upgrade,
    upgrade_command,
)

TABLES = {
    "users",
    "nodes",
    "gpus",
    "allocations",
    "placement_requests",
    "leases",
    "sessions",
    "session_events",
    "session_metric_chunks",
    "session_checkpoints",
    "datasets",
    "dataset_versions",
    "dataset_uploads",
    "dataset_holds",
    "alembic_version",
}


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'nsml.sqlite'}"


def test_an_empty_sqlite_database_is_migrated_to_head(tmp_path: Path) -> None:
    db = Database(sqlite_url(tmp_path))
    assert check_schema(db.engine, db.url) == head_revision()
    assert TABLES <= set(inspect(db.engine).get_table_names())
    assert current_revision(db.engine) == head_revision()


def test_upgrade_is_idempotent(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    upgrade(url)
    upgrade(url)
    assert current_revision(Database(url).engine) == head_revision()


def test_a_database_with_foreign_tables_is_refused(tmp_path: Path) -> None:
    db = Database(sqlite_url(tmp_path))
    with db.engine.begin() as conn:
        conn.execute(text("CREATE TABLE something_else (id INTEGER)"))
    with pytest.raises(SchemaError, match="no NSML schema revision"):
        check_schema(db.engine, db.url)


def test_a_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    db = Database(sqlite_url(tmp_path))
    check_schema(db.engine, db.url)
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'fffffffffff'"))
    with pytest.raises(SchemaError, match="does not know"):
        check_schema(db.engine, db.url)


def test_an_older_database_is_refused_with_the_upgrade_command(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    db = Database(url)
    check_schema(db.engine, url)
    # Stand in for an older release: the revision table says an earlier, known revision.
    upgrade_to_first = "0001"
    if head_revision() == upgrade_to_first:
        pytest.skip("only one revision exists: no older schema to refuse yet")
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from alembic import command; from nsml_server.db import alembic_config; "
            f"command.downgrade(alembic_config({url!r}), {upgrade_to_first!r})",
        ],
        check=True,
    )
    with pytest.raises(SchemaError) as e:
        check_schema(db.engine, url)
    assert upgrade_command(url) in str(e.value)
    assert check_schema(db.engine, url, auto_upgrade=True) == head_revision()


def test_the_upgrade_command_hides_passwords() -> None:
    cmd = upgrade_command("postgresql+psycopg://nsml:s3cret@db.example.org/nsml")
    assert "s3cret" not in cmd and "***" in cmd
    assert cmd.startswith("nsml-server upgrade-db --db-url")


def test_nsml_server_upgrade_db_command(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    r = subprocess.run(
        [str(Path(sys.executable).parent / "nsml-server"), "upgrade-db", "--db-url", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stdout
    assert current_revision(Database(url).engine) == head_revision()


def test_the_server_refuses_to_start_on_a_foreign_database(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    with Database(url).engine.begin() as conn:
        conn.execute(text("CREATE TABLE something_else (id INTEGER)"))
    r = subprocess.run(
        [
            str(Path(sys.executable).parent / "nsml-server"),
            "--db-url",
            url,
            "--no-local-node",
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert "no NSML schema revision" in r.stderr


@pytest.mark.db
def test_an_empty_postgresql_database_is_migrated_to_head(postgres_url: str) -> None:
    db = Database(postgres_url)
    assert check_schema(db.engine, postgres_url) == head_revision()
    assert TABLES <= set(inspect(db.engine).get_table_names())
    # Upgrading again is a no-op; downgrading to nothing and back works on PostgreSQL too.
    upgrade(postgres_url)
    from alembic import command

    from nsml_server.db import alembic_config

    command.downgrade(alembic_config(postgres_url), "base")
    assert "nodes" not in inspect(db.engine).get_table_names()
    upgrade(postgres_url)
    assert current_revision(db.engine) == head_revision()
    db.dispose()


def test_the_migrations_create_exactly_the_tables_the_models_describe(tmp_path: Path) -> None:
    """No model change without a migration: Alembic's comparison finds nothing to do."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from nsml_server.models import Base

    db = Database(sqlite_url(tmp_path))
    check_schema(db.engine, db.url)
    with db.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diffs == []
