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


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A private PostgreSQL cluster for this test session; yields a URL of an empty database.

    ``NSML_TEST_POSTGRES_URL`` points at an existing server instead (its database must be
    empty and is left as the tests leave it).
    """
    if os.environ.get("NSML_TEST_POSTGRES_URL"):
        yield os.environ["NSML_TEST_POSTGRES_URL"]
        return
    from tests.integration.pgproc import PostgresUnavailable, private_postgres

    try:
        cm = private_postgres()
        url = cm.__enter__()
    except PostgresUnavailable as e:
        service_missing("db", str(e))
    try:
        yield url
    finally:
        cm.__exit__(None, None, None)


# The hub and its image, shared by tests/integration and tests/browser (one hub per session);
# a failed test on that hub reports its state, and work a test leaves running there is named.
from tests.hub_fixtures import (  # noqa: E402, F401
    hub,
    pytest_runtest_makereport,
    pytest_runtest_setup,
    pytest_runtest_teardown,
    pytest_terminal_summary,
    singleuser_image,
)
