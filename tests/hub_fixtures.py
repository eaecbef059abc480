"""The notebook image and the one real hub of a test session, shared by every test folder.

Integration tests (``tests/integration``) and browser tests (``tests/browser``) use the same
``hub``: ``tests/conftest.py`` imports these fixtures, so a session that runs both starts one
hub. The hub's containers and home volumes carry the session's own prefix and are removed at
the end, whatever the tests did.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.hubproc import HubProcess

REPO = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("NSML_NOTEBOOK_IMAGE", "jupyter-nsml/singleuser:latest")
BUILD_SCRIPT = REPO / "hub_config" / "images" / "build.sh"


def proxy_available() -> str | None:
    local = REPO / ".cache" / "proxy" / "node_modules" / ".bin" / "configurable-http-proxy"
    if local.exists():
        return str(local)
    return shutil.which("configurable-http-proxy")


@pytest.fixture(scope="session")
def singleuser_image(docker_client: Any) -> str:
    """The offline-built notebook image, built (incrementally) if it is missing or stale."""
    from tests.conftest import service_missing  # tests/conftest.py imports this module

    if not BUILD_SCRIPT.exists():
        service_missing("docker", f"{BUILD_SCRIPT} is missing")
    r = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--image", IMAGE],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=900,
    )
    if r.returncode != 0:
        pytest.fail(f"image build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return IMAGE


def unique_prefix(kind: str) -> str:
    """A container and volume prefix no other run on this engine has: a test machine's PIDs
    repeat across runs (a fresh PID namespace each time) while its engine may keep what a
    killed run left behind, so the PID alone does not tell runs apart."""
    return f"{kind}{os.getpid()}{secrets.token_hex(3)}"


def remove_deployment(docker_client: Any, prefix: str) -> None:
    """Remove the containers and home volumes of the hub whose prefix is *prefix*."""
    for c in docker_client.containers.list(all=True, sparse=True, filters={"name": prefix}):
        c.remove(force=True)
    for v in docker_client.volumes.list(filters={"label": f"nsml.deployment={prefix}"}):
        v.remove(force=True)


@pytest.fixture(scope="session")
def hub(docker_client: Any, singleuser_image: str) -> Iterator[HubProcess]:
    """One real jupyterhub process (proxy, the `nsml` managed service) for the whole session."""
    from tests.conftest import service_missing

    if proxy_available() is None:
        service_missing(
            "hub", "configurable-http-proxy is not installed (scripts/test.sh installs it)"
        )
    state = Path(tempfile.mkdtemp(prefix="nsml-hub-"))
    prefix = unique_prefix("nsmltest")
    h = HubProcess(
        state,
        env_overrides={"NSML_CONTAINER_PREFIX": prefix, "NSML_NOTEBOOK_IMAGE": singleuser_image},
    )
    try:
        h.start()
        yield h
    finally:
        stop_all_servers(h)
        h.stop()
        remove_deployment(docker_client, prefix)
        shutil.rmtree(state, ignore_errors=True)


def stop_all_servers(h: HubProcess) -> list[str]:
    """Ask *h* to stop every server that runs or is starting (best effort: a hub that is
    already gone is left as it is); the users whose servers were asked to stop."""
    asked: list[str] = []
    try:
        if h.proc is not None:
            for user in h.admin("GET", "/users").json():
                if user.get("server") or user.get("pending"):
                    h.admin("DELETE", f"/users/{user['name']}/server")
                    asked.append(user["name"])
    except Exception:
        pass
    return asked
