"""Shared test fixtures and the rule for real services.

Tests that need a real service carry a marker (``docker``, ``hub``, ``db``, ``browser``,
``gpu``). When the service is absent the test is skipped with the reason, except for the
services named in ``NSML_TEST_REQUIRE`` (comma separated; ``scripts/test.sh`` sets it to
every service but ``gpu`` in CI): a missing required service fails the test instead, so CI
can never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REQUIRED = {s.strip() for s in os.environ.get("NSML_TEST_REQUIRE", "").split(",") if s.strip()}


def service_missing(service: str, reason: str) -> None:
    """Skip (or fail, when *service* is required) because *service* is not available."""
    if service in REQUIRED:
        pytest.fail(f"required service {service!r} is missing: {reason}", pytrace=False)
    pytest.skip(f"{service}: {reason}")


@pytest.fixture(scope="session")
def docker_client() -> Iterator[object]:
    """A docker-py client for the engine at DOCKER_HOST (default: the local socket)."""
    try:
        import docker
    except ImportError as e:  # pragma: no cover - docker is a hard dependency
        service_missing("docker", f"docker-py is not installed ({e})")
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as e:
        service_missing(
            "docker",
            f"no Docker engine answers ({e}); scripts/test.sh installs and starts one",
        )
    yield client
    client.close()


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Path to a headless-capable Chromium binary."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    service_missing("browser", "no chromium on PATH; scripts/test.sh installs Debian's chromium")
    raise AssertionError("unreachable")


@pytest.fixture()
def nsml_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Clear every NSML_* / JUPYTERHUB_* variable so that a test starts from a known environment."""
    for key in list(os.environ):
        if key.startswith(("NSML_", "JUPYTERHUB_")):
            monkeypatch.delenv(key, raising=False)
    return monkeypatch


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for version in ("17", "16", "15", "14"):
        path = Path(f"/usr/lib/postgresql/{version}/bin/{name}")
        if path.exists():
            return str(path)
    return None


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A private PostgreSQL cluster for this test session; yields a URL of an empty database.

    ``NSML_TEST_POSTGRES_URL`` points at an existing server instead (its database must be
    empty and is left as the tests leave it).
    """
    if os.environ.get("NSML_TEST_POSTGRES_URL"):
        yield os.environ["NSML_TEST_POSTGRES_URL"]
        return
    import pwd
    import socket
    import subprocess
    import tempfile
    import time

    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        service_missing("db", "PostgreSQL is not installed (scripts/test.sh installs it)")
    try:
        pg_user = pwd.getpwnam("postgres")
    except KeyError:
        service_missing("db", "no 'postgres' system user to run the server as")
    tmp = Path(tempfile.mkdtemp(prefix="nsml-pg-"))
    os.chown(tmp, pg_user.pw_uid, pg_user.pw_gid)
    data = tmp / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def as_postgres(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", *cmd],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
        )

    r = as_postgres(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8")
    if r.returncode != 0:
        pytest.fail(f"initdb failed: {r.stderr}")
    opts = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300"
    r = as_postgres(pg_ctl, "-D", str(data), "-o", opts, "-l", str(tmp / "pg.log"), "-w", "start")
    if r.returncode != 0:
        pytest.fail(f"pg_ctl start failed: {r.stderr}\n{(tmp / 'pg.log').read_text()}")
    try:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(
                    f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True
                ) as conn:
                    conn.execute("CREATE DATABASE nsml")
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/nsml"
    finally:
        as_postgres(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(tmp, ignore_errors=True)
